import json
import shutil

import pytest
import torch
from peft import LoraConfig
from tiny_models import build_tiny_model_dir

from imageragturbo.model import HSpaceAdapter, ModelLoadError, load_model

LORA_TARGETS = r".*up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_loads_sd_turbo_layout(tiny_model_dir):
    parts = load_model(tiny_model_dir)
    assert type(parts.text_encoder).__name__ == "CLIPTextModel"
    assert type(parts.tokenizer).__name__.startswith("CLIPTokenizer")
    assert type(parts.vae).__name__ == "AutoencoderKL"
    assert type(parts.scheduler).__name__ == "EulerDiscreteScheduler"
    assert parts.adapter is None
    assert not any(p.requires_grad for p in parts.unet.parameters())
    assert load_model(tiny_model_dir).model_id == parts.model_id


def test_loads_tiny_vae_and_v_prediction(tiny_v_model_dir):
    parts = load_model(tiny_v_model_dir)
    assert type(parts.vae).__name__ == "AutoencoderTiny"
    assert parts.scheduler.config.prediction_type == "v_prediction"
    assert float(parts.scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR


def test_model_id_changes_with_weights(tmp_path, tiny_model_dir):
    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    assert load_model(other).model_id != load_model(tiny_model_dir).model_id


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model_index.json").unlink(), "model_index.json"),
        (lambda d: (d / "model_index.json").write_text("{not json"), "malformed JSON in .*model_index.json"),
        (lambda d: shutil.rmtree(d / "vae"), "missing folder: .*vae"),
        (lambda d: (d / "unet" / "config.json").unlink(), "missing file: .*unet/config.json"),
        (lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "no \\*.safetensors file in .*unet"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").write_text("[1, 2]"), "scheduler_config.json"),
        (lambda d: [p.unlink() for p in (d / "tokenizer").iterdir()], "tokenizer has none of"),
    ],
)
def test_broken_model_dir_names_the_file(model_copy, damage, message):
    damage(model_copy)
    with pytest.raises(ModelLoadError, match=message):
        load_model(model_copy)


def test_pickled_weights_are_refused(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(model_copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_model(model_copy)


def test_truncated_weights_name_the_part(model_copy):
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot load vae"):
        load_model(model_copy)


def test_unknown_class_is_refused(model_copy):
    config_path = model_copy / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "VQModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported vae class 'VQModel'"):
        load_model(model_copy)


def test_adapter_is_loaded_and_checked(model_copy):
    HSpaceAdapter(channels=64, num_heads=4).save_pretrained(model_copy / "adapter")
    assert load_model(model_copy).adapter is not None
    HSpaceAdapter(channels=32, num_heads=4).save_pretrained(model_copy / "adapter")
    with pytest.raises(ModelLoadError, match="adapter channels 32 do not match"):
        load_model(model_copy)


def test_decoder_lora_is_fused(model_copy):
    parts = load_model(model_copy)
    unet = parts.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    z, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.randn(1, 16, 32)
    with torch.no_grad():
        expected = unet(z, t, ctx).sample
    unet.save_lora_adapter(model_copy / "unet_lora")
    fused = load_model(model_copy).unet
    assert not any("lora" in name for name, _ in fused.named_parameters())
    with torch.no_grad():
        got = fused(z, t, ctx).sample
    base = load_model(model_copy, lora_dir=None)
    assert (got - expected).abs().max() < 1e-4
    assert base.model_id == parts.model_id  # the identity is the base model's, before LoRA


# -- fp16 variants ---------------------------------------------------------------------------------


def _only_fp16(model_dir, part, cls):
    """Re-save ``part`` as fp16 weights under the variant name only (``model.fp16.safetensors``,
    ``diffusion_pytorch_model.fp16.safetensors``), as SD-Turbo's fp16 downloads are."""
    part_dir = model_dir / part
    model = cls.from_pretrained(part_dir)
    for weights in part_dir.glob("*.safetensors"):
        weights.unlink()
    model.half().save_pretrained(part_dir, variant="fp16")
    assert [p.name for p in part_dir.glob("*.safetensors")] in (["model.fp16.safetensors"],
                                                                 ["diffusion_pytorch_model.fp16.safetensors"])


def test_every_part_loads_from_its_fp16_variant_alone(model_copy, tiny_model_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    HSpaceAdapter(channels=64, num_heads=4).save_pretrained(model_copy / "adapter")
    _only_fp16(model_copy, "text_encoder", CLIPTextModel)
    _only_fp16(model_copy, "unet", UNet2DConditionModel)
    _only_fp16(model_copy, "vae", AutoencoderKL)
    _only_fp16(model_copy, "adapter", HSpaceAdapter)
    parts = load_model(model_copy)  # float32 modules from fp16 files
    reference = load_model(tiny_model_dir)
    assert parts.adapter is not None
    for name in ("text_encoder", "unet", "vae"):
        got, want = getattr(parts, name), getattr(reference, name)
        assert next(got.parameters()).dtype == torch.float32
        for (key, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
            assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2), (name, key)


def test_plain_weights_are_preferred_over_the_variant(model_copy):
    from imageragturbo.model.loading import _variant, _weights_file

    unet = model_copy / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors")
    assert _weights_file(unet).name == "diffusion_pytorch_model.safetensors" and _variant(unet) is None
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    assert _variant(unet) == "fp16"
    (unet / "diffusion_pytorch_model.fp16.safetensors").rename(unet / "diffusion_pytorch_model.fp16-00001-of-00001.safetensors")
    assert _variant(unet) == "fp16"


# -- hub ids, offline, from the local Hugging Face cache --------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_fake_hub_cache(cache, repo_id, model_dir, commit=COMMIT):
    """Lay ``model_dir`` out as huggingface_hub caches a download: blobs named by content hash,
    snapshot files symlinked to them, refs/main holding the commit."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_id_resolves_offline_from_the_local_cache(tiny_model_dir, tmp_path, monkeypatch, no_network):
    from imageragturbo.model.loading import resolve_model_dir

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    snapshot = build_fake_hub_cache(cache, "stabilityai/sd-turbo", tiny_model_dir)
    assert resolve_model_dir("stabilityai/sd-turbo") == snapshot
    assert resolve_model_dir(f"stabilityai/sd-turbo@{COMMIT}") == snapshot
    parts = load_model("stabilityai/sd-turbo")
    assert parts.model_dir == snapshot
    assert parts.model_id == load_model(tiny_model_dir).model_id
    # HF_HOME/hub when HF_HUB_CACHE is not set
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model_dir("stabilityai/sd-turbo") == snapshot


def test_hub_id_not_cached_says_where_it_looked_and_how_to_fill_it(tmp_path, monkeypatch, no_network):
    cache = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model("stabilityai/sd-turbo")
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message
    assert str(cache / "models--stabilityai--sd-turbo") in message
    assert "hf download stabilityai/sd-turbo" in message and "HF_HUB_CACHE" in message


def test_generate_takes_a_cached_hub_id(tiny_v_model_dir, tmp_path, monkeypatch, no_network):
    from imageragturbo.cli import main

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    build_fake_hub_cache(cache, "someone/tiny-turbo", tiny_v_model_dir)
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--mode", "off", "--model", "someone/tiny-turbo", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


# -- the default model: IRT_MODEL, the checkout, ./models/shapes-v2 -----------------------------------


def test_default_model_dir_order(tmp_path, monkeypatch, tiny_model_dir):
    from imageragturbo import paths

    monkeypatch.setattr(paths, "BUNDLED_MODEL", tmp_path / "site-packages" / "models" / "shapes-v2")
    monkeypatch.delenv("IRT_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    # a wheel install, outside a checkout: the missing checkout path, with advice
    assert paths.default_model_dir() == paths.BUNDLED_MODEL
    with pytest.raises(ModelLoadError, match="not part of an installed wheel: pass --model DIR, or set IRT_MODEL="):
        load_model(paths.default_model_dir())
    # run from the root of a checkout
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "shapes-v2")
    assert paths.default_model_dir() == tmp_path / "models" / "shapes-v2"
    # the package's own checkout (an editable install) comes first
    shutil.copytree(tiny_model_dir, paths.BUNDLED_MODEL)
    assert paths.default_model_dir() == paths.BUNDLED_MODEL
    # IRT_MODEL above all, named in the error when it is wrong
    monkeypatch.setenv("IRT_MODEL", str(tmp_path / "elsewhere"))
    assert paths.default_model_dir() == tmp_path / "elsewhere"
    with pytest.raises(ModelLoadError, match="from IRT_MODEL="):
        load_model(paths.default_model_dir())


@pytest.mark.slow
def test_wheel_install_finds_its_model_or_says_how(tmp_path, tiny_v_model_dir):
    """A non-editable install (a wheel in a fresh venv that reuses this venv's dependencies):
    outside a checkout it has no bundled model and says how to set IRT_MODEL; with IRT_MODEL it
    generates; its package data (training configs, the playground) came along."""
    import os
    import site
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"  # a copy, so the build writes nothing into the working tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "imageragturbo", src / "imageragturbo", ignore=shutil.ignore_patterns("__pycache__"))
    run = dict(capture_output=True, text=True, timeout=600)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheels"), "-q"], **run)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheels").glob("imageragturbo-*.whl"))
    venv = tmp_path / "venv"
    made = subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], **run)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    target = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 **run).stdout.strip())
    # this venv's site-packages as a plain path: its dependencies, not its editable imageragturbo
    (target / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "-q", str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("IRT_MODEL", "PYTHONPATH")} | {"OMP_NUM_THREADS": "1"}
    where = subprocess.run([python, "-c", "import imageragturbo.paths as p; print(p.PACKAGE_DIR); "
                            "print(sorted(x.name for x in p.TRAINING_CONFIGS.glob('*.json'))[:1]); "
                            "print((p.PACKAGE_DIR / 'service' / 'static' / 'playground.html').is_file())"],
                           cwd=tmp_path, env=env, **run)
    assert where.returncode == 0, where.stderr
    package_dir, configs, static = where.stdout.split("\n")[:3]
    assert Path(package_dir).is_relative_to(venv) and configs != "[]" and static == "True"
    script = venv / "bin" / "imageragturbo"
    argv = [str(script), "generate", "a red circle", "--mode", "off", "--out", str(tmp_path / "x.png")]
    missing = subprocess.run(argv, cwd=tmp_path, env=env, **run)
    assert missing.returncode == 2
    assert "not part of an installed wheel" in missing.stderr and "IRT_MODEL=" in missing.stderr
    found = subprocess.run(argv, cwd=tmp_path, env=env | {"IRT_MODEL": str(tiny_v_model_dir)}, **run)
    assert found.returncode == 0, found.stderr
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_takes_a_cached_hub_id_and_names_the_model_after_it(tiny_v_model_dir, tmp_path, monkeypatch, no_network):
    from imageragturbo.errors import ConfigError
    from imageragturbo.service.serve import resolve_served_model

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    snapshot = build_fake_hub_cache(cache, "someone/tiny-turbo", tiny_v_model_dir)
    assert resolve_served_model("someone/tiny-turbo") == (snapshot, "tiny-turbo")
    assert resolve_served_model(f"someone/tiny-turbo@{COMMIT}") == (snapshot, "tiny-turbo")
    assert resolve_served_model(tiny_v_model_dir) == (tiny_v_model_dir, tiny_v_model_dir.name)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_served_model("someone/absent")
    with pytest.raises(ConfigError, match="model directory not found"):
        resolve_served_model(tmp_path / "nowhere")


def test_the_server_answers_under_the_hub_id_s_name(tiny_v_model_dir, tmp_path, monkeypatch, no_network):
    from fastapi.testclient import TestClient

    from imageragturbo.service import ServiceSettings
    from imageragturbo.service.serve import open_app, resolve_served_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    build_fake_hub_cache(tmp_path / "hub", "someone/tiny-turbo", tiny_v_model_dir)
    model_dir, name = resolve_served_model("someone/tiny-turbo")
    app = open_app(model_dir, ServiceSettings(warmup=False, verify_databases=False), model_name=name)
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-turbo"]
