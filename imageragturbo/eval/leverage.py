"""Where a UNet's output comes from: how much of it each input path controls.

The method steers generation through the H-space (the mid-block output), which presumes that H
carries the image's content, as Kwon et al. found for Stable Diffusion. Whether a given UNet
works that way is measurable: run the split UNet on a batch of prompts, then again with one
path fed from *another* prompt of the batch (the same noise), and report the relative change
of the output, ``||out' - out|| / ||out||``:

- ``h``: only the H-feature comes from the other prompt (what an H-space edit can reach);
- ``encoder``: H and every skip feature come from the other prompt (the whole encoder side);
- ``decoder_text``: the decoder's cross-attention context is the other prompt's;
- ``h_zero``: H is zeroed.

A path whose swap barely moves the output carries little of the prompt's content there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imageragturbo.errors import ConfigError
from imageragturbo.model.text import PromptEncoder
from imageragturbo.model.unet_split import SplitUNet

PATHS = ("h", "encoder", "decoder_text", "h_zero")


@dataclass(frozen=True)
class Leverage:
    """Relative output change per path (see the module docstring) at one timestep."""

    unet: str
    timestep: int
    n: int
    change: dict[str, float]

    def as_dict(self) -> dict:
        return {"unet": self.unet, "timestep": self.timestep, "n": self.n, **self.change}


@torch.no_grad()
def measure_leverage(
    unet, encoder: PromptEncoder, prompts: list[str], timestep: int, *, seed: int = 0, name: str = "unet"
) -> Leverage:
    """Swap each path with the next prompt's (``roll`` by one over the batch) and measure.

    ``prompts`` must hold at least two different prompts (else a swap changes nothing and the
    numbers would mean nothing).
    """
    if len(set(prompts)) < 2:
        raise ConfigError(f"need at least two different prompts to swap paths between, got {sorted(set(prompts))}")
    split = SplitUNet(unet)
    ctx = encoder(prompts).ctx.to(next(unet.parameters()).dtype)
    other = ctx.roll(1, 0)
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    z = torch.randn(len(prompts), config.in_channels, size, size, generator=torch.Generator().manual_seed(seed)).to(ctx.dtype)
    t = torch.full((len(prompts),), timestep, dtype=torch.int64)
    enc = split.encode(z, t, ctx)
    enc_other = split.encode(z, t, other)
    base = split.decode(enc.h, enc.skips, enc.temb, ctx).float()

    def change(out: torch.Tensor) -> float:
        return float((out.float() - base).norm() / base.norm().clamp_min(1e-12))

    return Leverage(
        unet=name,
        timestep=timestep,
        n=len(prompts),
        change={
            "h": change(split.decode(enc_other.h, enc.skips, enc.temb, ctx)),
            "encoder": change(split.decode(enc_other.h, enc_other.skips, enc.temb, ctx)),
            "decoder_text": change(split.decode(enc.h, enc.skips, enc.temb, other)),
            "h_zero": change(split.decode(torch.zeros_like(enc.h), enc.skips, enc.temb, ctx)),
        },
    )


def leverage_markdown(rows: list[Leverage], model: str) -> str:
    lines = [
        f"Relative change of the UNet output when one path comes from another prompt (model `{model}`, "
        f"{rows[0].n} prompts, same noise):",
        "",
        "| UNet | t | H only | H + skips (encoder) | decoder text | H zeroed |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        c = r.change
        lines.append(f"| {r.unet} | {r.timestep} | {c['h']:.3f} | {c['encoder']:.3f} | {c['decoder_text']:.3f} | {c['h_zero']:.3f} |")
    return "\n".join(lines) + "\n"
