"""Batch-invariant inference on the CPU: an image is bit-identical alone or in any batch.

The CPU kernels PyTorch picks for a layer depend on the batch: MKL's GEMM on the number of
rows (so a Linear over [B * T, C] rounds a row differently for another B), oneDNN's
convolution on the minibatch size, and GroupNorm on the memory layout, which a slice of a
batch and a lone image report differently. Each difference is one float32 rounding, and
enough of them move a pixel by one level. Inside :func:`batch_invariant` the three layer
types run so that each image is computed by one kernel, on one shape and one memory layout,
whatever batch it is in:

- ``Linear`` and ``Conv2d``: one call per image, on a contiguous (row-major, NCHW) input;
- ``GroupNorm``: on a contiguous input (a batch sliced out of a channels-last tensor, as the
  VAE's attention leaves it, takes another kernel than a lone image does).

The rest of the work (attention, element-wise ops, the VAE's and the UNet's other layers)
already computes each image on its own. Outside the context the layers are the stock ones
(training and export are untouched).
:func:`make_batch_invariant` switches a model's layers to these classes in place. The price
is batching's speed-up (the per-image calls): results/batch-invariance.md.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_state = threading.local()


def active() -> bool:
    return getattr(_state, "on", False)


@contextmanager
def batch_invariant(enabled: bool = True):
    """Run the switched layers batch-invariantly in this thread while the context is open, and
    the element-wise functions of :data:`ITEMWISE_FUNCTIONS` one item at a time."""
    previous = active()
    _state.on = enabled
    try:
        if enabled and not previous:
            with _ItemwiseElementwise():
                yield
        else:
            yield
    finally:
        _state.on = previous


# Vectorised element-wise kernels (AVX-512: 16 floats a step) compute a tensor's last
# (numel mod width) elements on a scalar path whose transcendental functions (Sleef vs libm)
# round differently. A lone image's tail lies inside a batch's vector steps, so an
# activation over a batch rounds an item differently from the same activation over the item
# alone whenever an item's size is not a multiple of the width (measured: the tiny test
# models on an AVX-512 CPU; the AVX2 machines these tests passed on before happened to
# divide). Run one item at a time, each item takes the lone image's path.
ITEMWISE_FUNCTIONS = frozenset({
    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.mish,
    torch.sigmoid, torch.tanh, torch.exp, torch.erf, torch.nn.functional.softplus,
    torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.exp, torch.Tensor.erf,
})


class _ItemwiseElementwise(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ITEMWISE_FUNCTIONS and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 \
                and not kwargs.get("inplace", False):
            # Contiguous always: a strided input (a chunk, a slice) takes another kernel.
            x, rest = args[0], args[1:]
            return torch.cat([func(x[i : i + 1].contiguous(), *rest, **kwargs) for i in range(x.shape[0])])
        return func(*args, **kwargs)


class ItemwiseLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not active():
            return super().forward(x)
        if x.dim() < 2:
            return super().forward(x.contiguous())
        return torch.cat([super(ItemwiseLinear, self).forward(x[i : i + 1].contiguous()) for i in range(x.shape[0])])


class ItemwiseConv2d(torch.nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not active():
            return super().forward(x)
        return torch.cat([super(ItemwiseConv2d, self).forward(x[i : i + 1].contiguous()) for i in range(x.shape[0])])


class ContiguousGroupNorm(torch.nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous() if active() else x)


_SWAPS = {torch.nn.Linear: ItemwiseLinear, torch.nn.Conv2d: ItemwiseConv2d, torch.nn.GroupNorm: ContiguousGroupNorm}


def make_batch_invariant(*models: torch.nn.Module | None) -> None:
    """Switch every stock Linear, Conv2d and GroupNorm of ``models`` to its batch-invariant
    subclass (same parameters, same state dict; the stock behaviour outside the context)."""
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            swap = _SWAPS.get(type(module))
            if swap is not None:
                module.__class__ = swap
