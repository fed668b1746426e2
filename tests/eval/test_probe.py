import json

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model_dir

from imageragturbo.cli import main
from imageragturbo.eval.probe import probe_latents, probe_split
from imageragturbo.retrieval import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
from imageragturbo.retrieval.build import build_database
from imageragturbo.retrieval.pairs import WorldPairs
from imageragturbo.model import RagTurboPipeline, load_model

# The tiny tokenizer keeps 16 characters: prompts that differ early, so each retrieves its own row.
PROMPTS = [("a yellow square on the left", 11), ("two purple triangles", 12), ("three red circles", 13)]


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("probe_model"), sample_size=16, prediction_type="v_prediction")


def _pipe(world_model, h_rows):
    """The bare model with a database of one row per prompt: its own caption, a random latent,
    and the H-feature ``h_rows(encoded prompts)``."""
    pipe = RagTurboPipeline(load_model(world_model, base_only=True))
    captions = [c for c, _ in PROMPTS]
    encoded = pipe.encoder(captions)
    z0 = torch.randn(len(captions), *pipe.latent_shape, generator=torch.Generator().manual_seed(1))
    store = InMemoryFeatureStore(encoded.q.numpy(), h_rows(pipe, encoded).numpy(), captions, pipe.components.model_id, z0=z0.numpy())
    pipe.add_database(RetrievalDatabase("db", ExactSearcher(encoded.q.numpy()), store))
    return pipe, z0


def _own_h(pipe, encoded):
    """Each prompt's own H at t = T from its seed's noise: what the one-step pass computes."""
    z_T = torch.stack([torch.randn(pipe.latent_shape, generator=torch.Generator().manual_seed(s)) for _, s in PROMPTS])
    t = torch.full((len(PROMPTS),), pipe.num_train_timesteps - 1)
    with torch.inference_mode():
        return pipe.split.encode(z_T, t, encoded.ctx).h


@torch.inference_mode()
def test_each_probe_takes_the_neighbour_through_its_own_path(world_model):
    pipe, z0 = _pipe(world_model, _own_h)
    latents = probe_latents(pipe, PROMPTS, timesteps=(499,), h_timesteps=(249,), noise_sigmas=(0.2,))
    assert list(latents) == ["off", "neighbour image", "neighbour H", "neighbour H at t=249", "neighbour at t=499",
                             "neighbour + latent noise σ=0.2"]
    # the noised neighbour row is the stored latent moved by noise of that scale, no model
    spread = (latents["neighbour + latent noise σ=0.2"] - z0).std()
    assert 0.15 < float(spread) < 0.25
    # off is the pipeline's own one-step output; the neighbour image is the stored latent
    off = pipe([c for c, _ in PROMPTS], [s for _, s in PROMPTS], mode="off").latents
    torch.testing.assert_close(latents["off"], off)
    torch.testing.assert_close(latents["neighbour image"], z0)
    # a neighbour whose H is the target's own leaves the output unchanged ...
    torch.testing.assert_close(latents["neighbour H"], latents["off"])
    # ... and another H changes it
    other, _ = _pipe(world_model, lambda p, e: torch.randn_like(_own_h(p, e)) * 3)
    other_latents = probe_latents(other, PROMPTS, timesteps=(), h_timesteps=(249,))
    assert not torch.allclose(other_latents["neighbour H"], latents["off"], atol=1e-3)
    # the H at t is computed from the neighbour's latent, not read from the store: the same
    # stored latents give the same output whatever H the store holds
    torch.testing.assert_close(other_latents["neighbour H at t=249"], latents["neighbour H at t=249"])
    assert not torch.allclose(latents["neighbour H at t=249"], latents["off"], atol=1e-3)
    # the noised neighbour reaches the UNet: a different stored latent, a different x0
    moved = latents["neighbour at t=499"] - latents["off"]
    assert float(moved.abs().max()) > 1e-3


def test_probe_split_scores_every_probe_and_needs_a_database(world_model):
    pipe, _ = _pipe(world_model, _own_h)
    rows = probe_split(pipe, PROMPTS, "test-held")
    assert [r.name for r in rows] == ["off", "neighbour image", "neighbour H", "neighbour H at t=249",
                                      "neighbour H at t=499", "neighbour H at t=749", "neighbour at t=99",
                                      "neighbour at t=249", "neighbour at t=499", "neighbour at t=749",
                                      "neighbour + latent noise σ=0.1", "neighbour + latent noise σ=0.2",
                                      "neighbour + latent noise σ=0.3"]
    assert all(r.n == 3 and 0.0 <= r.mean_score <= 1.0 and r.split == "test-held" for r in rows)
    mse = {r.name: r.latent_mse for r in rows}
    assert mse["neighbour image"] == 0.0 and all(v > 0 for k, v in mse.items() if k != "neighbour image")
    bare = RagTurboPipeline(load_model(world_model, base_only=True))
    with pytest.raises(ValueError, match="retrieval database"):
        probe_latents(bare, PROMPTS)


def test_eval_probe_command(world_model, tmp_path, capsys):
    pipe = RagTurboPipeline(load_model(world_model, base_only=True))
    index = tmp_path / "index"
    build_database(pipe, WorldPairs(24), index, batch_size=12, chunk_size=12, progress=False)
    out = tmp_path / "probe.json"
    code = main(["eval", "probe", "--model", str(world_model), "--index", str(index), "--n", "3",
                 "--prompts", "test-held", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| probe | test-held |" in printed and "| neighbour image |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 13 and all(np.isfinite(r["mean_score"]) and np.isfinite(r["latent_mse"]) and r["n"] == 3 for r in rows)
    # a bad fit setting is a clear error, not a traceback
    assert main(["eval", "probe", "--model", str(world_model), "--fit-lr", "0"]) == 2
    assert "--fit-lr must be > 0" in capsys.readouterr().err
    # no index: a clear error naming the model, not a traceback
    assert main(["eval", "probe", "--model", str(world_model), "--n", "2"]) == 2
    assert "retrieval database" in capsys.readouterr().err


def test_the_fitted_h_brings_the_output_closer_to_the_neighbour(world_model):
    pipe, z0 = _pipe(world_model, _own_h)
    latents = probe_latents(pipe, PROMPTS, timesteps=(), fit_steps=40)
    fitted = latents["H fitted to the neighbour (40 steps)"]
    off_error = torch.nn.functional.mse_loss(latents["off"], z0)
    assert torch.nn.functional.mse_loss(fitted, z0) < 0.9 * off_error
    assert all(p.grad is None for p in pipe.components.unet.parameters())
