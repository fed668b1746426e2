"""Beyond the paper: the neighbours' tokens as gated extra keys/values of the decoder's cross-attention."""

import torch

from imageragturbo.model import HSpaceAdapter, load_model
from imageragturbo.model.denoiser import RagDenoiser
from imageragturbo.model.retrieval_attention import decoder_cross_attentions


def _denoisers(model_dir):
    parts = load_model(model_dir, base_only=True)
    unet = parts.unet
    c = int(unet.config.block_out_channels[-1])
    layers = decoder_cross_attentions(unet)
    torch.manual_seed(0)
    adapter = HSpaceAdapter(channels=c, num_heads=4, xattn_ctx_dim=int(unet.config.cross_attention_dim),
                            xattn_layers=len(layers)).eval()
    return parts, adapter, RagDenoiser(unet, adapter, "adapter"), RagDenoiser(unet, None, "off"), layers


def _inputs(parts, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = parts.unet.config.sample_size
    z = torch.randn(2, parts.unet.config.in_channels, size, size, generator=gen)
    ctx = torch.randn(2, 8, parts.unet.config.cross_attention_dim, generator=gen)
    c = int(parts.unet.config.block_out_channels[-1])
    h_size = size // 2 ** (len(parts.unet.config.block_out_channels) - 1)
    h_retr = torch.randn(2, k, c, h_size, h_size, generator=gen) * 3
    return z, torch.tensor([999, 999]), ctx, h_retr


@torch.no_grad()
def test_zero_gates_change_nothing_and_open_gates_read_the_neighbours(tiny_model_dir):
    parts, adapter, denoiser, off, layers = _denoisers(tiny_model_dir)
    assert layers, "the tiny UNet has decoder cross-attention"
    z, t, ctx, h_retr = _inputs(parts)
    lam = torch.tensor([0.9, 0.6])
    base = off(z, t, ctx)
    # Untrained: the H-space adapter and the gates start at zero, so this is the plain UNet.
    assert torch.equal(denoiser(z, t, ctx, h_retr, lam), base)
    adapter.xattn.gates.fill_(0.5)
    a = denoiser(z, t, ctx, h_retr, lam)
    b = denoiser(z, t, ctx, h_retr.flip(0), lam)
    assert (a - base).abs().max() > 1e-4 and (a - b).abs().max() > 1e-4
    # lambda = 0 (the no-retrieval control) silences the path; mode off never sees it.
    assert torch.allclose(denoiser(z, t, ctx, h_retr, torch.zeros(2)), base, atol=1e-6)
    assert torch.equal(off(z, t, ctx), base)


def test_saved_adapter_keeps_the_path(tiny_model_dir, tmp_path):
    parts, adapter, _, _, layers = _denoisers(tiny_model_dir)
    with torch.no_grad():
        adapter.xattn.gates.fill_(0.25)
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = HSpaceAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.xattn is not None and torch.equal(loaded.xattn.gates, adapter.xattn.gates)
    assert HSpaceAdapter(channels=adapter.config.channels, num_heads=4).xattn is None  # the paper's adapter
