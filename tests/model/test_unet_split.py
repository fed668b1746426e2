import pytest
import torch
from tiny_models import UNET_CONFIGS, tiny_unet

from imageragturbo.model import SplitUNet


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_encode_decode_equals_unet(name, batch):
    unet = tiny_unet(name)
    split = SplitUNet(unet)
    size = UNET_CONFIGS[name]["sample_size"]
    gen = torch.Generator().manual_seed(batch)
    z_t = torch.randn(batch, 4, size, size, generator=gen)
    ctx = torch.randn(batch, 7, 32, generator=gen)
    t = torch.tensor([999, 500, 3][:batch])
    with torch.no_grad():
        expected = unet(z_t, t, ctx).sample
        enc = split.encode(z_t, t, ctx)
        got = split.decode(enc.h, enc.skips, enc.temb, ctx)
    assert enc.h.shape[:2] == (batch, UNET_CONFIGS[name]["block_out_channels"][-1])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_h_space_shape_and_decoder_uses_h():
    unet = tiny_unet("sd_like")
    split = SplitUNet(unet)
    z_t, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([999, 999])
    with torch.no_grad():
        enc = split.encode(z_t, t, ctx)
        out = split.decode(enc.h, enc.skips, enc.temb, ctx)
        out_edited = split.decode(enc.h + 1.0, enc.skips, enc.temb, ctx)
    assert enc.h.shape == (2, 64, 4, 4)
    assert len(enc.skips) == 1 + 2 * 1 + 1  # conv_in + (resnets + downsampler) + last block's resnet
    assert (out - out_edited).abs().max() > 1e-3


def test_refuses_unsupported_configs():
    config = dict(UNET_CONFIGS["sd_like"], class_embed_type="timestep")
    from diffusers import UNet2DConditionModel

    with pytest.raises(ValueError, match="class_embed_type"):
        SplitUNet(UNet2DConditionModel(**config))


# SD 2.1's UNet config (stabilityai/stable-diffusion-2-1-base, unet/config.json), built with
# random weights: the real model's shape, split-checked once at a small latent size.
SD21_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    act_fn="silu",
    attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True,
)


@pytest.mark.slow
def test_sd21_shaped_unet_split():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_UNET_CONFIG).eval()
    assert sum(p.numel() for p in unet.parameters()) > 800e6
    split = SplitUNet(unet)
    # 32x32 latents (256 px): H-space 1280 x 4 x 4, as docs/facts.md measured.
    z_t, ctx, t = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 1024), torch.tensor([999])
    with torch.no_grad():
        expected = unet(z_t, t, ctx).sample
        enc = split.encode(z_t, t, ctx)
        got = split.decode(enc.h, enc.skips, enc.temb, ctx)
    assert enc.h.shape == (1, 1280, 4, 4)
    assert len(enc.skips) == 12
    assert (got - expected).abs().max().item() <= 1e-5
