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
