import numpy as np
import pytest
import torch

from imageragturbo.retrieval import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
from imageragturbo.model import HSpaceAdapter, RagTurboPipeline, few_step_timesteps, load_model

CAPTIONS = ["a red circle on the left", "two blue squares", "a green triangle at the top", "three red circles"]
PROMPTS = ["a red circle", "two blue squares on the right", "a yellow square above a purple triangle"]


def _database(pipe, name="db", seed=0):
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(len(CAPTIONS), *pipe.latent_shape, generator=gen)
    e, h = pipe.encode_database_rows(z0, CAPTIONS)
    store = InMemoryFeatureStore(e.numpy(), h.numpy().astype(np.float16), CAPTIONS, pipe.components.model_id)
    return RetrievalDatabase(name, ExactSearcher(e.numpy()), store)


def _pipeline(model_dir, trained_adapter=True):
    parts = load_model(model_dir)
    torch.manual_seed(0)
    parts.adapter = HSpaceAdapter(channels=parts.unet.config.block_out_channels[-1], num_heads=4).eval()
    if trained_adapter:
        torch.nn.init.normal_(parts.adapter.proj_out.weight, std=0.2)
    pipe = RagTurboPipeline(parts)
    pipe.add_database(_database(pipe))
    return pipe


@pytest.fixture(scope="module")
def v_pipe(tiny_v_model_dir):
    return _pipeline(tiny_v_model_dir)


@pytest.fixture(scope="module")
def eps_pipe(tiny_model_dir):
    return _pipeline(tiny_model_dir)


def test_few_step_schedule_is_the_papers():
    assert few_step_timesteps(1, 1000) == [999]
    assert few_step_timesteps(2, 1000) == [999, 499]
    assert few_step_timesteps(4, 1000) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="steps must be in"):
        few_step_timesteps(5, 1000)


@pytest.mark.parametrize("mode", ["off", "inject", "adapter"])
@pytest.mark.parametrize("steps", [1, 2])
def test_batch_equals_singles(v_pipe, mode, steps):
    seeds = [11, 2**62 + 5, 0]
    batch = v_pipe(PROMPTS, seeds, mode=mode, steps=steps, k=3, inject_w=[0.8, 0.5, 0.2])
    for i, (prompt, seed, w) in enumerate(zip(PROMPTS, seeds, [0.8, 0.5, 0.2])):
        single = v_pipe([prompt], [seed], mode=mode, steps=steps, k=3, inject_w=w)
        assert torch.equal(batch.latents[i], single.latents[0])  # bit for bit: model/batch_invariance.py
        assert np.array_equal(batch.images[i], single.images[0])
        assert [n.caption for n in batch.neighbors[i]] == [n.caption for n in single.neighbors[0]]


def test_batch_equals_singles_epsilon_model(eps_pipe):
    batch = eps_pipe(PROMPTS, [1, 2, 3], mode="adapter", k=2)
    for i in range(3):
        single = eps_pipe([PROMPTS[i]], [i + 1], mode="adapter", k=2)
        assert torch.equal(batch.latents[i], single.latents[0])


def test_same_seed_same_image_different_seed_different_image(v_pipe):
    a = v_pipe(["a red circle"], [7], mode="adapter")
    b = v_pipe(["a red circle"], [7], mode="adapter")
    c = v_pipe(["a red circle"], [8], mode="adapter")
    assert np.array_equal(a.images, b.images)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)


def test_modes_differ_and_untrained_adapter_equals_off(tiny_v_model_dir, v_pipe):
    off = v_pipe(PROMPTS, [1, 2, 3], mode="off")
    inject = v_pipe(PROMPTS, [1, 2, 3], mode="inject", inject_w=0.3)
    adapter = v_pipe(PROMPTS, [1, 2, 3], mode="adapter")
    assert not torch.allclose(off.latents, inject.latents)
    assert not torch.allclose(off.latents, adapter.latents)
    untrained = _pipeline(tiny_v_model_dir, trained_adapter=False)
    assert torch.equal(untrained(PROMPTS, [1, 2, 3], mode="adapter").latents, off.latents)
    assert torch.equal(untrained(PROMPTS, [1, 2, 3], mode="inject", inject_w=1.0).latents, off.latents)


def test_result_fields(v_pipe):
    result = v_pipe(PROMPTS[:2], [1, 2], mode="adapter", k=3)
    assert result.images.dtype == np.uint8 and result.images.shape == (2, 20, 20, 3)
    assert set(result.timings_ms) == {"text_encode", "retrieve", "denoise", "vae_decode", "postprocess"}
    assert all(ms >= 0 for ms in result.timings_ms.values()) and result.timings_ms["retrieve"] > 0
    assert [len(n) for n in result.neighbors] == [3, 3]
    scores = [n.score for n in result.neighbors[0]]
    assert scores == sorted(scores, reverse=True)
    assert result.lam.shape == (2,) and bool(((result.lam >= -1) & (result.lam <= 1)).all())
    inject = v_pipe(PROMPTS[:1], [1], mode="inject")
    assert len(inject.neighbors[0]) == 1  # injection uses the top-1 neighbour only
    off = v_pipe(PROMPTS[:1], [1], mode="off")
    assert off.neighbors == [[]] and off.lam is None and off.timings_ms["retrieve"] == 0


class _ScoresOnly:
    """The same searcher, claiming nothing about its scores: the pipeline must then gather the
    neighbours' text embeddings and compute the gate from them (``retrieval.gate``)."""

    def __init__(self, searcher):
        self.searcher = searcher

    def search(self, q, k, texts=None):
        return self.searcher.search(q, k, texts)


def test_gate_from_exact_search_scores_equals_the_gathered_gate(v_pipe):
    db = v_pipe.databases["db"]
    assert db.searcher.exact_cosine_scores  # unit keys: the fast path is taken
    gathered = RagTurboPipeline(v_pipe.components, [RetrievalDatabase("db", _ScoresOnly(db.searcher), db.store)])
    fast = v_pipe(PROMPTS, [1, 2, 3], mode="adapter", k=3)
    slow = gathered(PROMPTS, [1, 2, 3], mode="adapter", k=3)
    assert fast.lam.dtype == slow.lam.dtype == torch.float32
    torch.testing.assert_close(fast.lam, slow.lam, atol=1e-6, rtol=0)
    assert (fast.latents - slow.latents).abs().max().item() <= 1e-5
    assert [[n.id for n in row] for row in fast.neighbors] == [[n.id for n in row] for row in slow.neighbors]


def test_exact_caption_is_retrieved_first(v_pipe):
    result = v_pipe(["two blue squares"], [0], mode="adapter", k=2)
    assert result.neighbors[0][0].caption == "two blue squares"
    assert result.neighbors[0][0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[], seeds=[]), "non-empty list"),
        (dict(prompts=["  "], seeds=[1]), "non-empty string"),
        (dict(prompts=["a"], seeds=[1, 2]), "2 seeds for 1 prompts"),
        (dict(prompts=["a"], seeds=[-1]), "seed must be"),
        (dict(prompts=["a"], seeds=[1], mode="fast"), "mode must be one of"),
        (dict(prompts=["a"], seeds=[1], steps=0), "steps must be in"),
        (dict(prompts=["a"], seeds=[1], k=99), "k must be an integer in \\[1, 4\\]"),
        (dict(prompts=["a"], seeds=[1], mode="inject", inject_w=0.0), "inject_w must be in"),
        (dict(prompts=["a"], seeds=[1], mode="inject", inject_w=1e-300), "inject_w must be in"),
        (dict(prompts=["a"], seeds=[1], database="../etc"), "unknown database"),
    ],
)
def test_bad_inputs_raise_value_error_naming_them(v_pipe, kwargs, message):
    prompts, seeds = kwargs.pop("prompts"), kwargs.pop("seeds")
    with pytest.raises(ValueError, match=message):
        v_pipe(prompts, seeds, **kwargs)


def test_database_from_another_model_is_refused(tiny_model_dir, v_pipe):
    other = RagTurboPipeline(load_model(tiny_model_dir))
    with pytest.raises(ValueError, match="was built with model"):
        other.add_database(v_pipe.databases["db"])


def test_adapter_mode_without_adapter_is_refused(tiny_model_dir):
    pipe = RagTurboPipeline(load_model(tiny_model_dir))
    assert "adapter" not in pipe.denoisers
    pipe.add_database(_database(pipe))
    with pytest.raises(ValueError, match="needs a trained H-space adapter"):
        pipe(["a"], [1], mode="adapter")
    with pytest.raises(ValueError, match="no database is loaded"):
        RagTurboPipeline(load_model(tiny_model_dir))(["a"], [1], mode="inject")


def test_x0_parameterisations(v_pipe):
    from imageragturbo.model.schedule import NoiseSchedule

    z0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([600, 20])
    for prediction_type in ("v_prediction", "epsilon", "sample"):
        schedule = NoiseSchedule(v_pipe.schedule.alphas_cumprod, prediction_type)
        z_t = schedule.add_noise(z0, eps, t)
        alpha, sigma = schedule.alpha_sigma(t, z0)
        output = {"v_prediction": alpha * eps - sigma * z0, "epsilon": eps, "sample": z0}[prediction_type]
        torch.testing.assert_close(schedule.predict_x0(output, z_t, t), z0, rtol=1e-5, atol=1e-5)
        one = schedule.predict_x0(output[:1], z_t[:1], 600)  # a scalar t broadcasts too
        torch.testing.assert_close(one, z0[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(v_pipe.schedule.alphas_cumprod, "flow")


# -- start_t: sampling from the top neighbour's latent (retrieval as img2img) -------------------


def _latent_database(pipe, name="with-latents"):
    gen = torch.Generator().manual_seed(7)
    z0 = torch.randn(len(CAPTIONS), *pipe.latent_shape, generator=gen)
    e, h = pipe.encode_database_rows(z0, CAPTIONS)
    store = InMemoryFeatureStore(e.numpy(), h.numpy().astype(np.float16), CAPTIONS, pipe.components.model_id,
                                 z0=z0.numpy())
    return RetrievalDatabase(name, ExactSearcher(e.numpy()), store), z0


@pytest.fixture(scope="module")
def start_pipe(tiny_v_model_dir):
    pipe = _pipeline(tiny_v_model_dir)
    db, z0 = _latent_database(pipe)
    pipe.add_database(db)
    return pipe, z0


@pytest.mark.parametrize("mode", ["off", "adapter"])
def test_start_t_takes_its_step_from_the_top_neighbour_noised_to_t(start_pipe, mode):
    from imageragturbo.model.noise import draw, seed_generators

    pipe, z0 = start_pipe
    t, seed = 499, 5
    result = pipe(["two blue squares"], [seed], mode=mode, k=2, start_t=t, database="with-latents")
    assert result.start_t == t and result.neighbors[0][0].caption == "two blue squares"
    z_t = pipe.schedule.add_noise(z0[CAPTIONS.index("two blue squares")][None], draw(seed_generators([seed]), pipe.latent_shape), t)
    encoded = pipe.encoder(["two blue squares"])
    found = pipe.databases["with-latents"].retrieve(encoded.q.numpy(), 2, texts=["two blue squares"])
    h_retr = torch.from_numpy(found.h) if mode == "adapter" else None
    lam = torch.from_numpy(found.gate) if mode == "adapter" else None
    with torch.inference_mode():
        out = pipe.denoise(pipe.denoisers[mode], z_t, torch.full((1,), t), encoded.ctx, h_retr, lam, torch.full((1,), 0.8))
    expected = pipe.schedule.predict_x0(out, z_t, t)
    torch.testing.assert_close(result.latents, expected, atol=1e-5, rtol=0)


def test_start_t_lower_keeps_more_of_the_neighbour_and_batches_like_singles(start_pipe):
    pipe, z0 = start_pipe
    target = z0[CAPTIONS.index("three red circles")]
    distance = {t: float(((pipe(["three red circles"], [3], mode="off", start_t=t, database="with-latents").latents[0]
                           - target) ** 2).mean()) for t in (50, 500, 950)}
    assert distance[50] < distance[500] < distance[950], distance
    batch = pipe(PROMPTS, [1, 2, 3], mode="adapter", k=2, start_t=249, steps=2, database="with-latents")
    for i, (prompt, seed) in enumerate(zip(PROMPTS, [1, 2, 3])):
        single = pipe([prompt], [seed], mode="adapter", k=2, start_t=249, steps=2, database="with-latents")
        assert torch.equal(batch.latents[i], single.latents[0])


@pytest.mark.parametrize("start_t", [0, 999, 1.5, True, "10"])
def test_bad_start_t_is_refused_naming_it(start_pipe, start_t):
    pipe, _ = start_pipe
    with pytest.raises(ValueError, match="start_t must be an integer in \\[1, 998\\]"):
        pipe(["a"], [1], mode="off", start_t=start_t, database="with-latents")


def test_start_t_needs_a_database_with_latents(start_pipe, tiny_v_model_dir):
    pipe, _ = start_pipe
    with pytest.raises(ValueError, match="start_t needs a database that keeps its images' latents; 'db'"):
        pipe(["a"], [1], mode="off", start_t=100, database="db")
    with pytest.raises(ValueError, match="no database is loaded"):
        RagTurboPipeline(load_model(tiny_v_model_dir))(["a"], [1], mode="off", start_t=100)

