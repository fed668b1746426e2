"""Background styles (docs/world.md v2): reading an image's style, and re-styling an image.

Styles are the part of an image that no caption names and only a database carries
(``render.STYLES``: the band of the background's base grey). :func:`read_style` reads it back
exactly from a render; :func:`restyle` moves an image's background into another style's band
while keeping its objects, which is how a generator's synthetic targets (the teacher's samples,
drawn on whatever background the teacher chose) get the style their neighbours come from.
"""

from __future__ import annotations

import numpy as np

from imageragturbo.world.render import SIZE, STYLE_NAMES, STYLE_THRESHOLDS, STYLES
from imageragturbo.world.verifier import BG_SPREAD, colour_alpha


def _ring(image: np.ndarray) -> np.ndarray:
    """The outer one-pixel ring of an image [32, 32, 3]: float32 [124, 3]."""
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)


def background_grey(image: np.ndarray) -> float:
    """The mean over R, G, B of the outer ring's median colour (docs/world.md's style read-out)."""
    image = np.asarray(image)
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected an image of shape [{SIZE}, {SIZE}, 3], got {image.shape}")
    return float(np.median(_ring(image), axis=0).mean())


def style_of_grey(grey: float) -> str:
    """The style whose band a background grey falls in (thresholds halfway between the bands)."""
    low, high = STYLE_THRESHOLDS
    return "dim" if grey < low else ("grey" if grey < high else "bright")


def read_style(image: np.ndarray) -> str:
    """The style of an image (uint8 [32, 32, 3]): exact on renders, since object centres lie
    in [6, 26] and r <= 5, so the outer ring is always background."""
    return style_of_grey(background_grey(image))


def restyle(image: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (uint8 [32, 32, 3]) with its background moved into ``style``'s band: uint8 [32, 32, 3].

    Each pixel is ``bg + a * (c - bg)`` for a palette colour ``c`` with coverage ``a`` (the
    verifier's colour model, which is how renders are drawn), so the same objects on a new
    background ``bg'`` are ``pixel + (1 - a) * (bg' - bg)``. The new base grey is drawn
    uniformly from the band; the old per-channel shift and the pixel noise are kept.
    """
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLE_NAMES}")
    img = np.asarray(image, dtype=np.float32)
    bg = np.median(_ring(img), axis=0)  # [3]
    _, alpha, _ = colour_alpha(img)
    grey_pixel = (img.max(-1) - img.min(-1)) < BG_SPREAD
    a = np.where(grey_pixel, 0.0, np.clip(alpha, 0.0, 1.0))[..., None]
    new_bg = bg - bg.mean() + rng.uniform(*STYLES[style])
    return np.clip(np.rint(img + (1.0 - a) * (new_bg - bg)), 0, 255).astype(np.uint8)
