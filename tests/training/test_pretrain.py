"""20-step smoke runs of the three pretraining commands: checkpoint, resume, export, load back."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

from imageragturbo.training import pretrain_clip, pretrain_teacher, pretrain_vae
from imageragturbo.training.checkpoints import checkpoint_dirs, config_from_json, latest_checkpoint

TINY_VAE = {
    "steps": 20, "batch_size": 4, "block_out_channels": [8, 16, 16], "norm_num_groups": 4,
    "scaling_images": 64, "eval_images": 16, "checkpoint_every_s": 0, "num_threads": 1,
}
TINY_CLIP = {
    "steps": 20, "batch_size": 16, "warmup_steps": 5, "images_per_caption": 2, "text_hidden": 32, "text_layers": 1,
    "text_heads": 2, "text_intermediate": 64, "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2,
    "vision_intermediate": 64, "patch_size": 8, "checkpoint_every_s": 0, "eval_database": 100, "eval_queries": 10,
    "num_threads": 1,
}
TINY_TEACHER = {
    "steps": 20, "batch_size": 4, "warmup_steps": 5, "block_out_channels": [32, 32], "attention_heads": 2,
    "train_images": 64, "checkpoint_every_s": 0, "eval_every_s": 1e9, "eval_prompts": 4, "eval_steps": 2,
    "num_threads": 1,
}


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _step(ckpt) -> int:
    return json.loads((ckpt / "state.json").read_text())["step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """VAE and CLIP smoke runs: 12 steps, then resumed to 20; shared by the teacher test."""
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for name, module, tiny in (("vae", pretrain_vae, TINY_VAE), ("clip", pretrain_clip, TINY_CLIP)):
        config = _write(root / f"{name}.json", tiny)
        module.main(config, root / name, steps=12)
        assert _step(latest_checkpoint(root / name)) == 12
        metrics = module.main(config, root / name, resume=True)
        assert metrics["steps"] == 20
        out[name] = (root / name, metrics)
    return out


def test_checkpoint_layout(runs):
    out, _ = runs["vae"]
    dirs = checkpoint_dirs(out)
    assert [_step(d) for d in dirs] == [19, 20]  # the newest two are kept
    ckpt = dirs[-1]
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["step"] == 20 and saved["config"]["block_out_channels"] == [8, 16, 16]
    # One checkpoint format for every run: optimizers.pt holds {name: state_dict}.
    opt_state = torch.load(ckpt / "optimizers.pt", weights_only=True)["optimizer"]
    assert isinstance(opt_state["param_groups"][0]["lr"], float)
    assert (ckpt / "vae.safetensors").is_file()


def test_vae_exports_with_measured_scaling(runs):
    out, metrics = runs["vae"]
    vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True)
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert metrics["scaling_factor"] != 0.18215  # measured, not the SD default
    z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert z.shape == (1, 4, 8, 8)
    assert 0.0 <= metrics["verifier_recon"] <= 1.0 and metrics["verifier_ground_truth"] >= 0.99


def test_clip_exports_tokenizer_text_encoder_and_clip(runs):
    out, metrics = runs["clip"]
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", local_files_only=True)
    clip = CLIPModel.from_pretrained(out / "clip", local_files_only=True)
    assert text_encoder.config.eos_token_id == tok.eos_token_id != 2
    ids = tok(["a red circle on the left", "a zebra"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert ids[1, 2].item() == tok.unk_token_id
    with torch.no_grad():
        enc = text_encoder(input_ids=ids)
        # pooler_output is read at the end-of-text token (index 7 for a 6-word caption).
        torch.testing.assert_close(enc.pooler_output[0], enc.last_hidden_state[0, 7])
        # The exported text tower is the CLIP's text tower.
        torch.testing.assert_close(clip.text_model(input_ids=ids).pooler_output, enc.pooler_output)
        assert clip.get_image_features(pixel_values=torch.zeros(2, 3, 32, 32)).pooler_output.shape == (2, 32)
    for key in ("held_top1_entities", "held_absent_top4_entities", "seen_absent_top4_entities", "zero_shot_acc"):
        assert 0.0 <= metrics[key] <= 1.0


def test_teacher_smoke_resumes_and_loads(runs, tmp_path):
    vae_out, _ = runs["vae"]
    clip_out, _ = runs["clip"]
    config = _write(tmp_path / "teacher.json", {**TINY_TEACHER, "vae_dir": str(vae_out / "vae"), "clip_dir": str(clip_out)})
    pretrain_teacher.main(config, tmp_path / "teacher", steps=12)
    assert _step(latest_checkpoint(tmp_path / "teacher")) == 12
    result = pretrain_teacher.main(config, tmp_path / "teacher", resume=True)
    assert result["step"] == 20
    assert 0.0 <= result["test-seen_2step"] <= 1.0 and 0.0 <= result["test-seen_1step"] <= 1.0
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "teacher" / "unet", local_files_only=True)
    assert unet.config.cross_attention_dim == 32 and unet.config.sample_size == 8
    sched = DDIMScheduler.from_pretrained(tmp_path / "teacher" / "scheduler", local_files_only=True)
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]  # one step starts from pure noise
    assert float(sched.alphas_cumprod[-1]) < 1e-6


def test_config_refuses_unknown_keys(tmp_path):
    path = _write(tmp_path / "bad.json", {"stepz": 3})
    with pytest.raises(ValueError, match="stepz"):
        config_from_json(pretrain_vae.VaeConfig, path)
    cfg = config_from_json(pretrain_teacher.TeacherConfig, None, steps=7)
    assert cfg.steps == 7 and isinstance(cfg.block_out_channels, tuple)


def test_checkpoints_of_older_runs_resume(tmp_path):
    # A run checkpointed before the one format (a single optimizer.pt) still resumes.
    from imageragturbo.training.checkpoints import load_checkpoint, save_checkpoint
    from imageragturbo.training.pretrain_vae import VaeConfig

    module = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=0.5)
    path = save_checkpoint(tmp_path, 3, VaeConfig(), {"m": module}, opt, {"elapsed_s": 1.0})
    torch.save(torch.load(path / "optimizers.pt", weights_only=True)["optimizer"], path / "optimizer.pt")
    (path / "optimizers.pt").unlink()
    fresh = torch.optim.AdamW(module.parameters(), lr=0.1)
    assert load_checkpoint(path, {"m": module}, fresh)["elapsed_s"] == 1.0
    assert fresh.param_groups[0]["lr"] == 0.5
