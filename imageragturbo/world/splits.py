"""The shapes world's data splits and fixed evaluation prompt lists (docs/world.md v2).

Splits, by who may see them:

- ``train``: the generators' stream (teacher, student, adapter): no purple triangle or yellow
  square; a scene holding a tail pair (green circle, red square) is kept with probability 1/20.
- ``universal``: the universal components' stream (VAE, text encoder / CLIP): every
  composition at its natural rate, like the web SD's VAE and OpenCLIP saw.
- ``test-seen``: neither a held-out nor a tail pair; ``test-tail``: at least one tail pair and
  no held-out pair; ``test-held``: at least one held-out pair.
- ``database``: every composition at its natural rate; one database per style renders the
  same scenes on that style's background.

Styles: every image has one (``render.STYLES``). Where the caller names none it is drawn
uniformly from the item's own style stream, so the scene (layout, colours, noise) of item ``i``
is the same whatever its style.

Kind mix: every split draws its kind uniformly from single, pair_h, pair_v, count
(``render.KIND_PROBS``), then colours/shapes uniformly from the split's pool,
positions uniformly, counts uniformly from {2, 3}.

Determinism: item ``i`` of ``world_pairs(split, n, seed)`` depends only on
``(split, seed, i)`` through ``numpy.random.SeedSequence([split code, stream, seed, i])``;
the split code keeps the streams of different splits disjoint, so test-seen
images are never train images even for equal seeds. Evaluation prompts use
their own stream and a fixed seed, so ``eval_prompts(split, n)`` is the same
list everywhere (the first 100 of ``n = 200`` equal ``n = 100``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from imageragturbo.world.render import SPLITS, render, sample_spec, sample_style
from imageragturbo.world.spec import SceneSpec, caption

_SPLIT_CODE = {"train": 101, "test-seen": 202, "test-held": 303, "database": 404, "universal": 505, "test-tail": 606}
_PAIRS_STREAM = 1
_EVAL_STREAM = 2
_STYLE_STREAM = 7  # distinct from every other stream (pretrain_clip uses 3)
EVAL_SEED = 20261122


def _split_code(split: str) -> int:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return _SPLIT_CODE[split]


def item_rng(split: str, seed: int, index: int, stream: int = _PAIRS_STREAM) -> np.random.Generator:
    """The generator of item ``index`` of a split's stream (see module docstring)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([_split_code(split), stream, seed, index]))


def item_style(split: str, seed: int, index: int) -> str:
    """The uniformly drawn style of item ``index`` (its own stream: the scene does not depend on it)."""
    return sample_style(item_rng(split, seed, index, stream=_STYLE_STREAM))


def world_pair(split: str, seed: int, index: int, style: str | None = None) -> tuple[np.ndarray, str, SceneSpec]:
    """One (image uint8 [32, 32, 3], caption, spec) triple of ``split``, on ``style`` (None: drawn)."""
    rng = item_rng(split, seed, index)
    spec = sample_spec(rng, split)
    return render(spec, rng, style or item_style(split, seed, index)), caption(spec), spec


def iter_world_pairs(
    split: str, n: int | None, seed: int = 0, start: int = 0, style: str | None = None
) -> Iterator[tuple[np.ndarray, str, SceneSpec]]:
    """Items ``start, start+1, ...`` of a split (endless if ``n`` is None)."""
    _split_code(split)
    i = start
    while n is None or i < start + n:
        yield world_pair(split, seed, i, style)
        i += 1


def world_pairs(split: str, n: int, seed: int = 0, style: str | None = None) -> list[tuple[np.ndarray, str, SceneSpec]]:
    """``n`` (image uint8 [32, 32, 3], caption, spec) triples of ``split``."""
    return list(iter_world_pairs(split, n, seed, style=style))


def world_arrays(split: str, n: int, seed: int = 0, style: str | None = None) -> tuple[np.ndarray, list[str], list[SceneSpec]]:
    """Like :func:`world_pairs` but images stacked: uint8 [n, 32, 32, 3], captions, specs."""
    pairs = world_pairs(split, n, seed, style)
    if not pairs:
        return np.zeros((0, 32, 32, 3), np.uint8), [], []
    images, captions, specs = zip(*pairs)
    return np.stack(images), list(captions), list(specs)


def eval_prompts(split: str, n: int = 200) -> list[tuple[str, int]]:
    """The fixed evaluation prompts of a split: ``n`` (caption, seed) pairs.

    The seed is for the generator's initial noise; the same (caption, seed) list is
    returned on every machine. ``test-seen``, ``test-tail`` and ``test-held`` are meant for
    evaluation, but any split is accepted.
    """
    out = []
    for i in range(n):
        rng = item_rng(split, EVAL_SEED, i, stream=_EVAL_STREAM)
        spec = sample_spec(rng, split)
        out.append((caption(spec), int(rng.integers(0, 2**31 - 1))))
    return out
