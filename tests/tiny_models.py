"""Tiny seeded models built from configs, saved in diffusers' layout (no download, ever).

Used by every test folder: ``build_tiny_model_dir(path)`` writes a complete model directory
(CLIP BPE tokenizer from a hand-made vocabulary, CLIPTextModel, UNet2DConditionModel,
AutoencoderKL or AutoencoderTiny, scheduler) that ``load_model`` reads like SD-Turbo's.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_DIM = 32

# Two UNet shapes: an SD-like two-level one, and a three-level one with linear projections,
# two layers per block and per-block head sizes (SD 2.1's style), at an odd latent size.
UNET_CONFIGS = {
    "sd_like": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "three_level": dict(
        sample_size=10,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
}


def tiny_unet(name: str = "sd_like", seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[name]).eval()


def write_clip_tokenizer(path: Path) -> None:
    """A CLIP BPE tokenizer over single characters plus a few merges: any ASCII prompt
    tokenizes, and it loads through the same ``AutoTokenizer`` path as SD-Turbo's."""
    path.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    tokens = list(chars) + [c + "</w>" for c in chars] + ["re", "red</w>", "ci", "cir"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\nc i\nci r\n")
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 16,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )


def tiny_text_encoder(vocab_size: int, eos_id: int, bos_id: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config).eval()


def tiny_vae(kind: str = "kl", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "kl":
        # Two blocks: one 2x downsampling, 16x16 pixels <-> 8x8x4 latents.
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
            scaling_factor=0.5,
        ).eval()
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).eval()


def build_tiny_model_dir(
    path: Path,
    *,
    unet: str = "sd_like",
    vae: str = "kl",
    prediction_type: str = "epsilon",
    seed: int = 0,
    sample_size: int | None = None,
) -> Path:
    """Write a complete tiny model directory at ``path`` and return it (``sample_size``
    overrides the UNet's default latent size)."""
    path = Path(path)
    write_clip_tokenizer(path / "tokenizer")
    vocab = json.loads((path / "tokenizer" / "vocab.json").read_text())
    text_encoder = tiny_text_encoder(len(vocab), vocab["<|endoftext|>"], vocab["<|startoftext|>"], seed)
    text_encoder.save_pretrained(path / "text_encoder")
    unet_model = tiny_unet(unet, seed)
    if sample_size is not None:
        unet_model.register_to_config(sample_size=sample_size)
    unet_model.save_pretrained(path / "unet")
    vae_model = tiny_vae(vae, seed)
    vae_model.save_pretrained(path / "vae")
    if prediction_type == "v_prediction":
        scheduler = DDIMScheduler(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
        )
    else:
        scheduler = EulerDiscreteScheduler(prediction_type=prediction_type, timestep_spacing="trailing")
    scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", type(vae_model).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
