"""An SD-Turbo-layout model directory with random weights, for the paper's latency protocol at
true scale without downloading anything.

Latency does not depend on the weights, only on the architectures: the UNet of SD 2.1-base
(SD-Turbo's), the OpenCLIP ViT-H/14 text tower as ``CLIPTextModel`` (SD 2's penultimate-layer
encoder: 23 layers), ``AutoencoderKL`` (or TAESD's ``AutoencoderTiny``) and an H-space adapter
of the paper's ~36 M parameters. :func:`parameter_counts` counts them on the meta device
(nothing allocated); :func:`write_random_model` writes a directory the loader opens like
SD-Turbo's. The tokenizer is a character-level CLIP BPE (any ASCII prompt tokenizes; real
SD-Turbo ships its own).
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from imageragturbo.model.adapter import HSpaceAdapter

SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
TAESD = dict(latent_channels=4)
OPENCLIP_H14_TEXT = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
)
PAPER_ADAPTER = dict(channels=1280, num_heads=20, num_layers=3, ff_mult=1)
"""Three cross-attention layers with a feed-forward each over the 1280-channel H-space:
36.1 M parameters, the paper's adapter size (~36 M)."""
TOY = dict(
    unet=dict(SD21_UNET, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=64, attention_head_dim=(2, 4)),
    text=dict(OPENCLIP_H14_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              projection_dim=64),
    adapter=dict(channels=64, num_heads=4, num_layers=1, ff_mult=1),
)
"""The same families shrunk to seconds on a CPU (the GPU check's toy run and the tests)."""
PUBLISHED = {"unet": 865.9e6, "vae": 83.7e6, "text_encoder": 340e6, "adapter": 36e6}
"""Published parameter counts (SD 2.1's UNet, its VAE, OpenCLIP ViT-H/14's text tower, the
paper's adapter)."""


def _text_config(vocab: dict[str, int], toy: bool = False) -> CLIPTextConfig:
    eos = vocab["<|endoftext|>"]
    # The real tower's 49,408-token embedding, so the parameter count is the published one.
    return CLIPTextConfig(vocab_size=49408, eos_token_id=eos, bos_token_id=vocab["<|startoftext|>"],
                          pad_token_id=eos, **(TOY["text"] if toy else OPENCLIP_H14_TEXT))


def _vocab() -> dict[str, int]:
    chars = string.ascii_lowercase + string.digits + ",.'-"
    tokens = list(chars) + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def write_char_tokenizer(path: Path, max_length: int = 77) -> dict[str, int]:
    """A CLIP BPE tokenizer over single characters, loadable by ``AutoTokenizer``."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = _vocab()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    return vocab


def _parts(tiny_vae: bool, toy: bool = False) -> dict[str, tuple[type, dict]]:
    return {
        "unet": (UNet2DConditionModel, TOY["unet"] if toy else SD21_UNET),
        "vae": (AutoencoderTiny, TAESD) if tiny_vae or toy else (AutoencoderKL, SD_VAE),
        "adapter": (HSpaceAdapter, TOY["adapter"] if toy else PAPER_ADAPTER),
    }


def parameter_counts(tiny_vae: bool = False) -> dict[str, int]:
    """Each part's parameter count, built on the meta device (no memory allocated)."""
    counts = {}
    with torch.device("meta"):
        for name, (cls, config) in _parts(tiny_vae).items():
            counts[name] = sum(p.numel() for p in cls(**config).parameters())
        counts["text_encoder"] = sum(p.numel() for p in CLIPTextModel(_text_config(_vocab())).parameters())
    return counts


def write_random_model(out: str | Path, *, tiny_vae: bool = False, toy: bool = False, seed: int = 0,
                       overwrite: bool = False) -> Path:
    """Write the SD-Turbo-layout directory ``out`` (fp16 safetensors, random weights: ~2.6 GB;
    with ``tiny_vae`` TAESD's decoder instead of SD's VAE; ``toy``: :data:`TOY`'s sizes, with
    TAESD). Built under ``out.partial`` and renamed into place when complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    vocab = write_char_tokenizer(tmp / "tokenizer")
    CLIPTextModel(_text_config(vocab, toy)).half().save_pretrained(tmp / "text_encoder", variant="fp16")
    classes = {}
    for name, (cls, config) in _parts(tiny_vae, toy).items():
        module = cls(**config).half()
        module.save_pretrained(tmp / name, variant="fp16")
        classes[name] = cls.__name__
        del module
    EulerDiscreteScheduler(prediction_type="epsilon", timestep_spacing="trailing").save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", classes["unet"]],
        "vae": ["diffusers", classes["vae"]],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
