"""int8 H-features: one scale per row and channel.

``h [N, C, h, w]`` is stored as ``q int8 [N, C, h, w]`` and ``scale [N, C]`` (float16 by
default), with ``h ~ q * scale``: symmetric, ``scale = max|h| over the channel's h*w positions
/ 127``, ``q = round(h / scale)`` in [-127, 127]. The error of a value is at most half a step,
``scale / 2``, and the relative RMS error about ``1 / (127 * sqrt(12))`` of a channel's max
(0.0029 on the bundled model's databases: results/retrieval.md, tests/retrieval/test_quantize.py). On
the bundled model it moves adapter-mode images by at most one grey level
(tests/retrieval/test_int8_store.py).

At SD's H-space (1280 x 8 x 8) a row is 80 KiB + 2.5 KiB of scales instead of 160 KiB: the
paper's 0.63 M rows are 49.6 GiB instead of 96 GiB.
"""

from __future__ import annotations

import numpy as np

QMAX = 127


def quantize_h(h: np.ndarray, scale_dtype: str | np.dtype = np.float16) -> tuple[np.ndarray, np.ndarray]:
    """h float [N, C, ...] -> (q int8 [N, C, ...], scale [N, C] of ``scale_dtype``).

    The scale is rounded up to the next value its dtype holds (never down), so that
    ``|h| <= 127 * scale`` for every value: no code is clipped, and the stored pair reconstructs
    within half a step, ``|h - q * scale| <= scale / 2``. A channel of zeros gets scale 0 and
    codes 0; a scale below float16's smallest (subnormal) value is raised to it, so a tiny
    channel keeps its codes too. A scale that overflows the dtype raises ValueError.
    """
    h = np.asarray(h, dtype=np.float32)
    if h.ndim < 3:
        raise ValueError(f"H-features must be [N, C, ...], got shape {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("H-features hold NaN or infinite values; nothing to quantise")
    scale_dtype = np.dtype(scale_dtype)
    spatial = tuple(range(2, h.ndim))
    absmax = np.abs(h).max(axis=spatial).astype(np.float64)
    with np.errstate(over="ignore"):
        scale = (absmax / QMAX).astype(scale_dtype)
        short = scale.astype(np.float64) * QMAX < absmax  # rounded down (or to 0): one step up
        scale = np.where(short, np.nextafter(scale, np.array(np.inf, scale_dtype)), scale).astype(scale_dtype)
    if not np.isfinite(scale).all():
        raise ValueError(f"an H-feature channel's max {absmax.max():.4g} overflows a {scale_dtype.name} scale; "
                         "use float32 scales")
    s32 = scale.astype(np.float32).reshape(*scale.shape, *(1,) * len(spatial))
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s32 > 0, np.rint(h / np.where(s32 > 0, s32, 1)), 0)
    q = np.clip(codes, -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize_h(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q int8 [..., C, h, w] and scale [..., C] -> float32 [..., C, h, w] (one pass)."""
    q = np.asarray(q)
    s = np.asarray(scale, dtype=np.float32)
    return np.multiply(q, s.reshape(*s.shape, *(1,) * (q.ndim - s.ndim)), dtype=np.float32)
