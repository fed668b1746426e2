import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_model_dir

from imageragturbo.model import RagTurboPipeline, load_model
from imageragturbo.paths import TRAINING_CONFIGS
from imageragturbo.model.loading import load_teacher_unet
from imageragturbo.model.schedule import NoiseSchedule
from imageragturbo.model.text import PromptEncoder
from imageragturbo.model.unet_split import SplitUNet
from imageragturbo.training import ladd, ladd_losses


@pytest.fixture(scope="module")
def world_like_model(tmp_path_factory):
    # 32x32 world renders -> 16x16 latents with the tiny two-block VAE.
    return build_tiny_model_dir(tmp_path_factory.mktemp("ladd_model"), unet="sd_like", sample_size=16,
                                prediction_type="v_prediction")


def _config(model_dir, mode, **overrides):
    values = dict(
        mode=mode, model_dir=str(model_dir), teacher_unet="auto", database="world:24",
        synthetic_pairs=8, teacher_steps=2, steps=2, batch_size=6, micro_batch_size=6, k=2, lora_rank=2,
        adapter_heads=4, disc_channels=8, num_threads=1, eval_prompts=4, eval_every=2, checkpoint_every_s=0,
    )
    values.update(overrides)
    return ladd.load_config(None, **values)


def test_adapter_run_trains_only_adapter_and_lora_and_exports_a_loadable_model(world_like_model, tmp_path):
    out = ladd.run(_config(world_like_model, "adapter"), tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2] and "d" not in history[0]
    assert all(torch.isfinite(torch.tensor([h["d"], h["adv"], h["distill"], h["lpips"]])).all() for h in history[1:])
    assert 0.0 <= history[-1]["verifier_test_seen"] <= 1.0
    assert (out / "adapter" / "config.json").is_file() and (out / "unet_lora").is_dir()
    # The exported directory loads through the Foundation loader (LoRA fused, adapter attached).
    parts = load_model(out)
    assert parts.adapter is not None
    base = load_model(world_like_model)
    changed = [n for n, p in parts.unet.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[n])]
    assert changed and all("up_blocks" in n and "attn" in n for n in changed), "only decoder attention may change"
    assert parts.model_id == base.model_id  # the encoder is untouched: an index stays valid


def test_resume_continues_from_the_checkpoint(world_like_model, tmp_path):
    ladd.run(_config(world_like_model, "adapter", steps=1, text_drop=0.5, text_swap=0.5), tmp_path / "run")
    ladd.run(_config(world_like_model, "adapter", steps=2, text_drop=0.5, text_swap=0.5), tmp_path / "run", resume=True)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2]  # step 0: the starting point
    # text_swap runs also score test-seen with swapped generator prompts (retrieval by the truth)
    assert all(0.0 <= h["verifier_test_seen_swapped"] <= 1.0 for h in history)
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").read_text())["step"] == 2


def test_copy_term_is_logged_changes_the_update_and_needs_an_adapter_run(world_like_model, tmp_path):
    def adapter_after_one_step(name, **overrides):
        out = ladd.run(_config(world_like_model, "adapter", steps=1, eval_prompts=0, **overrides), tmp_path / name)
        history = [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
        return load_model(out).adapter.state_dict(), history[-1]

    plain, plain_losses = adapter_after_one_step("plain")
    copied, copy_losses = adapter_after_one_step("copy", copy_weight=1.0)
    assert "copy" not in plain_losses and copy_losses["copy"] > 0 and torch.isfinite(torch.tensor(copy_losses["copy"]))
    assert any(not torch.equal(plain[k], copied[k]) for k in plain)  # same seed: only the copy term differs
    dropped, dropped_losses = adapter_after_one_step("copy_text_drop", copy_weight=1.0, copy_text_drop=True)
    assert dropped_losses["copy"] != copy_losses["copy"]  # the copy pass saw the empty prompt
    assert any(not torch.equal(copied[k], dropped[k]) for k in copied)
    started, started_losses = adapter_after_one_step("copy_start", copy_weight=1.0, copy_start_t=499)
    assert started_losses["copy"] != copy_losses["copy"]  # the copy pass started from the neighbour
    assert any(not torch.equal(copied[k], started[k]) for k in copied)
    ladd.run(_config(world_like_model, "adapter", steps=1, copy_weight=1.0, copy_start_t=499), tmp_path / "scored")
    history = [json.loads(line) for line in (tmp_path / "scored" / "history.jsonl").read_text().splitlines()]
    assert all(0.0 <= h["verifier_test_seen_start"] <= 1.0 for h in history)  # also scored from the neighbour
    with pytest.raises(ValueError, match="copy_text_drop"):
        ladd.run(_config(world_like_model, "adapter", copy_text_drop=True), tmp_path / "bad_drop")
    for bad in ({"copy_start_t": 499}, {"copy_weight": 1.0, "copy_start_t": 499, "retrieval": False},
                {"copy_weight": 1.0, "copy_start_t": 999}):
        # no copy term, the control (its input would carry the neighbour), t outside [1, T)
        with pytest.raises(ValueError, match="copy_start_t"):
            ladd.run(_config(world_like_model, "adapter", **bad), tmp_path / "bad_start")
    with pytest.raises(ValueError, match="copy_weight"):
        ladd.run(_config(world_like_model, "student", copy_weight=1.0), tmp_path / "bad")


def test_text_swap_needs_shapes_world_prompts(world_like_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="text_swap"):
        ladd.run(_config(world_like_model, "adapter", prompts=str(prompts), text_swap=0.5), tmp_path / "run")
    with pytest.raises(ValueError, match="text_swap"):
        ladd.run(_config(world_like_model, "student", text_swap=0.5), tmp_path / "run")


def test_student_run_changes_the_unet_and_keeps_the_teacher(world_like_model, tmp_path):
    out = ladd.run(_config(world_like_model, "student", eval_prompts=0), tmp_path / "run")
    student = load_model(out).unet
    teacher = load_model(world_like_model).unet
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    assert (out / "teacher" / "config.json").is_file()


def _one_step_grads(model_dir, mode):
    """Run the loop's pieces for one iteration and report which parameters got gradients."""
    config = _config(model_dir, mode)
    parts = load_model(model_dir)
    teacher = load_model(model_dir).unet.float().requires_grad_(False)
    generator = ladd.build_generator(config, parts, teacher)
    split = SplitUNet(teacher)
    heads = ladd_losses.DiscriminatorHeads(ladd_losses.LatentDiscriminator.stage_channels(teacher), 32, 8)
    disc = ladd_losses.LatentDiscriminator(split, heads)
    pipe = RagTurboPipeline(parts)
    z0 = torch.randn(2, 4, 16, 16)
    encoded = pipe.encoder(["a red circle", "two blue squares"])
    enc = type(encoded)(ctx=encoded.ctx.clone(), q=encoded.q.clone())
    e, h = pipe.encode_database_rows(z0, ["a red circle", "two blue squares"])
    h = h.clone()
    h_retr, lam = (h[:, None], torch.ones(2)) if mode == "adapter" else (None, None)
    t = torch.tensor([999, 499])
    x0_hat = pipe.schedule.predict_x0(generator(torch.randn_like(z0), t, enc.ctx, h_retr, lam), z0, t)
    loss_d = sum(torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
                 for r, f in zip(disc(z0, t, enc.ctx, enc.q), disc(x0_hat.detach(), t, enc.ctx, enc.q)))
    loss_d.backward()
    d_step = {n for n, p in generator.named_parameters() if p.grad is not None}
    heads_d = all(p.grad is not None for p in heads.parameters())
    heads.zero_grad(set_to_none=True)
    heads.requires_grad_(False)
    loss_g = -sum(f.mean() for f in disc(x0_hat, t, enc.ctx, enc.q)) + ladd_losses.latent_perceptual_loss(split, enc.ctx[:1], x0_hat, z0)
    loss_g.backward()
    g_step = {n for n, p in generator.named_parameters() if p.grad is not None}
    assert all(p.grad is None for p in teacher.parameters())
    return d_step, heads_d, g_step, dict(generator.named_parameters())


def test_gradients_reach_only_the_intended_parameters(world_like_model):
    d_step, heads_d, g_step, params = _one_step_grads(world_like_model, "adapter")
    assert not d_step and heads_d, "D's step must touch only the discriminator heads"
    assert g_step and all(("lora_" in n) or n.startswith("adapter.") for n in g_step)
    assert any(n.startswith("adapter.") for n in g_step) and any("lora_" in n for n in g_step)
    d_step, heads_d, g_step, params = _one_step_grads(world_like_model, "student")
    assert not d_step and heads_d
    assert g_step == {n for n, p in params.items() if p.requires_grad} and len(g_step) > 50


def test_discriminator_heads_are_spectrally_normalised():
    head = ladd_losses.DiscriminatorHead(16, 8, 4)
    names = {n for n, _ in head.named_parameters()}
    assert any("parametrizations.weight.original" in n for n in names)
    sn_modules = [m for m in head.modules() if hasattr(m, "parametrizations")]
    assert len(sn_modules) == 3


def test_sd_turbo_config_runs_one_step_with_tiny_models_of_the_same_layout(world_like_model, tmp_path):
    config = ladd.load_config(TRAINING_CONFIGS / "ladd_adapter_sdturbo.json")
    assert (config.batch_size, config.lr, config.disc_lr, config.steps, config.alpha, config.beta) == (
        2048, 1e-5, 1e-5, 20000, 2.5, 1.0
    )
    assert config.student_timesteps == (999,)
    tiny = dataclasses_replace(config, model_dir=str(world_like_model), teacher_unet=str(world_like_model / "unet"),
                               prompts="world:train", database="world:16", synthetic_pairs=4, teacher_steps=2,
                               steps=1, batch_size=4, micro_batch_size=4, eval_prompts=0, num_threads=1,
                               mixed_precision="no", adapter_heads=4)
    out = ladd.run(tiny, tmp_path / "run")
    assert (out / "adapter" / "config.json").is_file()


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_install_replaces_parts_and_the_student_keeps_its_teacher(world_like_model, tmp_path):
    import shutil

    model = shutil.copytree(world_like_model, tmp_path / "model")
    student_export = ladd.run(_config(model, "student", eval_prompts=0, steps=1), tmp_path / "student")
    ladd.install(student_export, model, "student")
    assert (model / "teacher").is_dir() and not list(model.glob(".*"))
    assert load_model(model).model_id != load_model(world_like_model).model_id  # a new UNet: indexes must be rebuilt
    teacher = load_teacher_unet(model)
    original = load_model(world_like_model).unet
    assert all(torch.equal(a, b.half().float()) for a, b in zip(teacher.parameters(), original.parameters()))
    adapter_export = ladd.run(_config(model, "adapter", eval_prompts=0, steps=1), tmp_path / "adapter")
    ladd.install(adapter_export, model, "adapter")
    assert load_model(model).adapter is not None


def test_decoder_lora_targets_reach_the_up_block_resnets_and_reload(world_like_model, tmp_path):
    out = ladd.run(_config(world_like_model, "adapter", steps=1, lora_targets="decoder", eval_prompts=0), tmp_path / "run")
    parts = load_model(out)
    base = dict(load_model(world_like_model).unet.named_parameters())
    changed = [n for n, p in parts.unet.named_parameters() if not torch.equal(p, base[n])]
    assert any("resnets" in n and "conv" in n for n in changed) and any("attn" in n for n in changed)
    assert all(n.startswith("up_blocks") for n in changed), "only the decoder may change"
    with pytest.raises(ValueError, match="lora_targets"):
        ladd.run(_config(world_like_model, "adapter", lora_targets="everything"), tmp_path / "bad")


@pytest.mark.parametrize("blocks", ["mid", "encoder"])
def test_a_student_without_decoder_cross_attention_keeps_the_teachers_weights_and_serves(
    world_like_model, tmp_path, blocks
):
    out = ladd.run(_config(world_like_model, "student", steps=1, student_text_blocks=blocks, eval_prompts=0), tmp_path / "run")
    student = load_model(out).unet
    teacher = load_teacher_unet(out)
    assert not any(getattr(b, "has_cross_attention", False) for b in student.up_blocks)
    assert student.mid_block.has_cross_attention
    reads_text = [getattr(b, "has_cross_attention", False) for b in student.down_blocks]
    assert reads_text == [blocks == "encoder" and getattr(b, "has_cross_attention", False) for b in teacher.down_blocks]
    assert any(reads_text) == (blocks == "encoder")
    # The exported student serves: one step through the pipeline gives images.
    images = RagTurboPipeline.from_pretrained(out)(["a red circle on the left"], [0], mode="off").images
    assert images.shape[0] == 1
    with pytest.raises(ValueError, match="student_text_blocks"):
        ladd.run(_config(world_like_model, "student", student_text_blocks="decoder"), tmp_path / "bad")


@pytest.mark.parametrize("path", sorted(TRAINING_CONFIGS.glob("ladd_*.json")), ids=lambda p: p.name)
def test_every_shipped_ladd_config_loads(path):
    config = ladd.load_config(path)  # unknown keys and bad types raise
    assert config.mode in path.name


def test_exclude_phrases_leaves_those_captions_out_of_synthetic_and_real_pairs(world_like_model, tmp_path):
    config = _config(world_like_model, "student", synthetic_pairs=40, database="world:60")
    parts = load_model(world_like_model, base_only=True)
    teacher = load_teacher_unet(world_like_model)
    full = ladd.prepare_data(config, parts, teacher, tmp_path)
    phrase = next(c for c in full.syn_captions if " circle" in c).split(" circle")[0].split()[-1] + " circle"
    assert any(phrase in c for c in _captions(full.real.store))
    # The same cache read back, with the phrase excluded: only those pairs go.
    kept = ladd.prepare_data(dataclasses.replace(config, exclude_phrases=(phrase,)), parts, teacher, tmp_path)
    expected = [i for i, c in enumerate(full.syn_captions) if phrase not in c]
    assert kept.syn_captions == [full.syn_captions[i] for i in expected] and len(expected) < 40
    assert torch.equal(kept.syn_z0, full.syn_z0[expected]) and torch.equal(kept.syn_noise, full.syn_noise[expected])
    real = _captions(kept.real.store)
    assert real and not any(phrase in c for c in real)
    assert real == [c for c in _captions(full.real.store) if phrase not in c]


def _captions(store):
    return store.captions(np.arange(len(store))[None])[0]


def test_swapped_evaluation_feeds_the_generator_a_swapped_prompt_and_retrieves_by_the_truth(world_like_model, monkeypatch):
    from imageragturbo.model.schedule import NoiseSchedule
    from imageragturbo.model.text import PromptEncoder
    from imageragturbo.world.spec import parse_caption

    config = _config(world_like_model, "adapter", eval_prompts=6)
    parts = load_model(world_like_model, base_only=True)
    database = ladd.real_database(config, RagTurboPipeline(parts))[0]
    generator = ladd.build_generator(config, parts, load_teacher_unet(world_like_model))
    encode = PromptEncoder(parts.tokenizer, parts.text_encoder)
    seen_texts, searched = [], []
    search = database.searcher.search

    class Recording:
        def __call__(self, texts):
            seen_texts.append(list(texts))
            return encode(texts)

    def recording_search(q, k, **kwargs):
        searched.append(q.copy())
        return search(q, k, **kwargs)

    monkeypatch.setattr(database.searcher, "search", recording_search)
    schedule = NoiseSchedule.from_scheduler(parts.scheduler)
    score = ladd.evaluate(config, parts, generator, schedule, Recording(), database, "test-seen", swapped=True)
    assert 0.0 <= score <= 1.0
    truth, swapped = seen_texts
    assert len(truth) == len(swapped) == 6
    for a, b in zip(truth, swapped):
        assert a != b and parse_caption(b) is not None  # one attribute swapped, still the grammar
    np.testing.assert_allclose(searched[0], encode(truth).q.numpy(), rtol=1e-5)  # retrieval by the true caption


def test_style_targets_train_with_restyled_targets_and_score_the_style_match(world_like_model, tmp_path):
    config = _config(world_like_model, "adapter", style_targets=True)
    parts = load_model(world_like_model, base_only=True)
    data = ladd.prepare_data(config, parts, load_teacher_unet(world_like_model).float().eval(), tmp_path)
    # The same 24 scenes in three styles; the synthetic targets re-styled once per style.
    assert data.styled.styles == ("dim", "grey", "bright")
    assert data.styled.z0.shape[:2] == (3, 24) and data.styled.h.shape[:2] == (3, 24)
    assert data.syn_z0_styled.shape == (3, *data.syn_z0.shape)
    assert not torch.equal(data.syn_z0_styled[0], data.syn_z0_styled[2])
    ladd.run(config, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    scored = [h for h in history if "verifier_test_seen" in h]
    assert [h["step"] for h in scored] == [0, 2] and all(0.0 <= h["style_match"] <= 1.0 for h in scored)
    with pytest.raises(ValueError, match="style_targets"):
        ladd.run(_config(world_like_model, "adapter", style_targets=True, database=str(tmp_path)), tmp_path / "bad")


def test_retrieval_off_control_trains_the_same_parameter_set_and_reads_nothing(world_like_model, tmp_path):
    def after_one_step(name, **overrides):
        config = _config(world_like_model, "adapter", steps=1, eval_prompts=0, style_targets=True, **overrides)
        out = ladd.run(config, tmp_path / name)
        trained = load_file(str(tmp_path / name / "checkpoints" / "step_00000001" / "generator_trainable.safetensors"))
        return trained, load_model(out)

    with_retrieval, _ = after_one_step("adapter")
    control, control_model = after_one_step("control", retrieval=False)
    assert set(control) == set(with_retrieval)  # same trainable parameters, LoRA and adapter
    # The adapter starts at zero output, so step 1 moves the LoRA alike; only the gated adapter
    # receives a gradient when something retrieved reaches the image.
    assert all(torch.equal(control[k], with_retrieval[k]) for k in control if "lora" in k)
    assert any(not torch.equal(control[k], with_retrieval[k]) for k in control if k.startswith("adapter."))
    # Gate 0: the control's output does not depend on what is retrieved.
    pipe = RagTurboPipeline(control_model)
    database = ladd.real_database(_config(world_like_model, "adapter", style_targets=True), pipe)[0]
    config = _config(world_like_model, "adapter", retrieval=False, style_targets=True)
    prompts = [("a red circle on the left", 1), ("two blue squares", 2)]
    gen = ladd.build_generator(config, control_model, load_teacher_unet(world_like_model))
    gen.adapter.load_state_dict(control_model.adapter.state_dict())
    schedule = NoiseSchedule.from_scheduler(control_model.scheduler)
    encoder = PromptEncoder(control_model.tokenizer, control_model.text_encoder)
    h = np.asarray(database.store.h_features(np.arange(len(database.store))[None]))[0]
    a = ladd.one_step_images(config, control_model, gen, schedule, encoder, database, prompts)
    b = ladd.one_step_images(config, control_model, gen, schedule, encoder, database, prompts, h_rows=h * 0 + 5.0)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="adapter run"):
        ladd.run(_config(world_like_model, "student", retrieval=False), tmp_path / "bad")


def test_teacher_samples_are_cached_by_what_they_depend_on_and_extended_on_demand(world_like_model, tmp_path, monkeypatch):
    from imageragturbo.training import teacher_samples

    monkeypatch.setenv("IRT_CACHE_DIR", str(tmp_path / "cache"))
    parts = load_model(world_like_model, base_only=True)
    teacher = load_teacher_unet(world_like_model)
    calls = []
    real_sample = teacher_samples.sample_multistep

    def counting(*args, **kwargs):
        calls.append(len(args[4]))
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(teacher_samples, "sample_multistep", counting)
    # A 1-step run of 6 items at real_fraction 0.25 draws 4 synthetic pairs: only those are sampled.
    short = ladd.prepare_data(_config(world_like_model, "student", steps=1, synthetic_pairs=40), parts, teacher, tmp_path)
    assert len(short.syn_captions) == 4 and calls == [4]
    # A longer run extends the same cache by the missing pairs; the first 4 are the same.
    longer = ladd.prepare_data(_config(world_like_model, "student", steps=2, synthetic_pairs=40), parts, teacher, tmp_path)
    assert len(longer.syn_captions) == 8 and calls == [4, 4]
    assert torch.equal(longer.syn_z0[:4], short.syn_z0) and longer.syn_captions[:4] == short.syn_captions
    ladd.prepare_data(_config(world_like_model, "student", steps=2, synthetic_pairs=40), parts, teacher, tmp_path)
    assert calls == [4, 4]  # all cached
    # Another guidance scale is another cache.
    ladd.prepare_data(_config(world_like_model, "student", steps=1, synthetic_pairs=40, cfg_scale=2.0), parts, teacher, tmp_path)
    assert calls == [4, 4, 4] and len(list((tmp_path / "cache" / "teacher_samples").glob("*.safetensors"))) == 2


def test_adapter_xattn_run_trains_the_gates_and_the_control_keeps_them_shut(world_like_model, tmp_path):
    def gates(name, **overrides):
        out = ladd.run(_config(world_like_model, "adapter", steps=2, eval_prompts=0, adapter_xattn=True, **overrides),
                       tmp_path / name)
        return load_model(out).adapter.xattn.gates.detach()

    assert gates("xattn").abs().max() > 0  # step 1 opens them, step 2 moves the tokens
    assert torch.equal(gates("control", retrieval=False), torch.zeros(len(gates("xattn"))))


def test_copy_targets_are_the_first_neighbour_in_the_target_style():
    from imageragturbo.training.ladd_data import StyledRows

    class Store:
        def latents(self, ids):
            return np.asarray(ids, dtype=np.float16)[:, :, None, None, None] * np.ones((1, 1, 4, 2, 2), np.float16)

    z0 = np.arange(3 * 5, dtype=np.float32).reshape(3, 5, 1, 1, 1) * np.ones((1, 1, 4, 2, 2), np.float32)
    styled = StyledRows(styles=("dim", "grey", "bright"), z0=z0, h=np.zeros((3, 5, 1, 1, 1), np.float32))
    first = np.array([4, 0, 2])
    style_idx = np.array([2, 0, 1])
    out = ladd.copy_targets(Store(), styled, style_idx, first)
    assert out.dtype == np.float32 and out.shape == (3, 4, 2, 2)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [2 * 5 + 4, 0 * 5 + 0, 1 * 5 + 2])  # style s, row i
    plain = ladd.copy_targets(Store(), None, None, first)
    np.testing.assert_array_equal(plain[:, 0, 0, 0], first)  # the stored latents of those rows
