"""Rendering shapes-world scenes (docs/world.md): sampling specs, placing objects, drawing.

Everything is a pure function of a ``numpy.random.Generator``, so the same seed
gives the same bytes. Drawing is vectorised numpy: each object's coverage is
computed on a 4x supersampled 128x128 grid and box-downsampled to 32x32, which
gives the anti-aliased edges docs/world.md fixes, cheaply enough to draw images as they are
needed (results/design-notes.md).

Coordinates are continuous pixels: pixel ``(row i, col j)`` covers
``[j, j+1) x [i, i+1)``, so an object centre at ``x = 16`` sits on the border
between columns 15 and 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imageragturbo.world.spec import COLOURS, HELD_OUT, KINDS, PALETTE, POSITIONS, SHAPES, TAIL, Entity, SceneSpec

SIZE = 32
SUPERSAMPLE = 4
R_RANGE = (4.0, 5.0)
MIN_CENTRE_DISTANCE = 12.0
SQUARE_HALF_SIDE = 0.88  # times r
MIN_GAP = 1.5  # px between the bounding boxes of two objects in a count scene

# Centre ranges (x range, y range) in pixels, docs/world.md's placement table.
SINGLE_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((6, 9), (12, 20)),
    "right": ((23, 26), (12, 20)),
    "top": ((12, 20), (6, 9)),
    "bottom": ((12, 20), (23, 26)),
    "center": ((14, 18), (14, 18)),
}
PAIR_H_RANGES = (((6, 10), (10, 22)), ((22, 26), (10, 22)))  # a, b
PAIR_V_RANGES = (((10, 22), (6, 10)), ((10, 22), (22, 26)))  # a, b
COUNT_RANGE = ((6, 26), (6, 26))

# Background styles (docs/world.md v2): the base grey g of an image is drawn from its style's band.
# No caption names the style; only a database (one per style) carries it.
STYLES: dict[str, tuple[float, float]] = {"dim": (40, 80), "grey": (120, 170), "bright": (200, 240)}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)
DEFAULT_STYLE = "grey"
# The outer ring's mean grey separates the bands at these values (docs/world.md).
STYLE_THRESHOLDS = (100.0, 185.0)
BACKGROUND_SHIFT = 8
NOISE_SIGMA_MAX = 4.0

# Splits (see splits.py): ``train`` feeds the generators, ``universal`` the VAE and CLIP.
SPLITS: tuple[str, ...] = ("train", "universal", "test-seen", "test-tail", "test-held", "database")
# A generator's training stream keeps an image holding a tail pair with this probability.
TAIL_RATE = 1 / 20
# Kind mix per split (probabilities in KINDS order). Equal: counting and relations are the hard
# parts, and an equal mix keeps every kind visible in 100-prompt evaluation subsets.
KIND_PROBS: dict[str, tuple[float, ...]] = {s: (0.25, 0.25, 0.25, 0.25) for s in SPLITS}

_ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
_SEEN_PAIRS = [p for p in _ALL_PAIRS if p not in HELD_OUT]
_HELD_PAIRS = sorted(HELD_OUT)
_TAIL_PAIRS = sorted(TAIL)
_COMMON_PAIRS = [p for p in _SEEN_PAIRS if p not in TAIL]
# A split whose every scene holds one of these pairs draws one object from them.
_REQUIRED = {"test-held": (_HELD_PAIRS, _ALL_PAIRS), "test-tail": (_TAIL_PAIRS, _SEEN_PAIRS)}


@dataclass(frozen=True)
class PlacedObject:
    """One object to draw: colour name, shape name, centre ``(x, y)`` in pixels, size ``r`` in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    r: float


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


def _draw_spec(rng: np.random.Generator, split: str) -> SceneSpec:
    kind = KINDS[rng.choice(len(KINDS), p=KIND_PROBS[split])]

    def pick(options: list[tuple[str, str]]) -> tuple[str, str]:
        return options[rng.integers(len(options))]

    if split in _REQUIRED:
        required, others = _REQUIRED[split]
    else:
        pools = {"train": _SEEN_PAIRS, "test-seen": _COMMON_PAIRS}
        required, others = None, pools.get(split, _ALL_PAIRS)
    if kind in ("single", "count"):
        c, s = pick(required or others)
        if kind == "single":
            return SceneSpec("single", (Entity(c, s, 1, POSITIONS[rng.integers(len(POSITIONS))]),))
        return SceneSpec("count", (Entity(c, s, int(rng.integers(2, 4))),))
    if required:
        # One required object, the other any allowed pair that differs, in random order.
        a = pick(required)
        b = pick([p for p in others if p != a])
        if rng.random() < 0.5:
            a, b = b, a
    else:
        a = pick(others)
        b = pick([p for p in others if p != a])
    positions = ("left", "right") if kind == "pair_h" else (None, None)
    return SceneSpec(kind, (Entity(*a, 1, positions[0]), Entity(*b, 1, positions[1])))


def sample_spec(rng: np.random.Generator, split: str) -> SceneSpec:
    """Draw a random scene spec allowed in ``split`` (docs/world.md v2's rules).

    - ``train`` (the generators' stream): never a held-out pair; a scene holding a tail pair is
      kept with probability ``TAIL_RATE`` (else redrawn), so tail pairs appear at 1/20 of
      their natural rate;
    - ``universal`` (the VAE's and CLIP's) and ``database``: every composition, natural rate;
    - ``test-seen``: neither a held-out nor a tail pair; ``test-tail``: at least one tail pair
      and no held-out pair; ``test-held``: at least one held-out pair.
    """
    _check_split(split)
    while True:
        spec = _draw_spec(rng, split)
        if split != "train" or not spec.has_tail or rng.random() < TAIL_RATE:
            return spec


def sample_style(rng: np.random.Generator) -> str:
    """A style drawn uniformly (docs/world.md: where nothing else is said)."""
    return STYLE_NAMES[rng.integers(len(STYLE_NAMES))]


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLE_NAMES}")


def _uniform_in(rng: np.random.Generator, ranges: tuple[tuple[float, float], tuple[float, float]]) -> tuple[float, float]:
    (x0, x1), (y0, y1) = ranges
    return float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))


def layout(spec: SceneSpec, rng: np.random.Generator) -> list[PlacedObject]:
    """Place the objects of ``spec`` per docs/world.md's table; centres are >= 12 px apart."""
    def size() -> float:
        return float(rng.uniform(*R_RANGE))

    ents = spec.entities
    if spec.kind == "single":
        e = ents[0]
        return [PlacedObject(e.colour, e.shape, *_uniform_in(rng, SINGLE_RANGES[e.position]), size())]
    if spec.kind in ("pair_h", "pair_v"):
        ranges = PAIR_H_RANGES if spec.kind == "pair_h" else PAIR_V_RANGES
        # The ranges are >= 12 px apart along the split axis, so no rejection is needed.
        return [PlacedObject(e.colour, e.shape, *_uniform_in(rng, rg), size()) for e, rg in zip(ents, ranges)]
    e = ents[0]
    iu = np.triu_indices(e.count, 1)
    for _ in range(10_000):
        xy = rng.uniform(COUNT_RANGE[0][0], COUNT_RANGE[0][1], size=(e.count, 2))
        rs = rng.uniform(*R_RANGE, size=e.count)
        d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        # docs/world.md also says objects never touch: two squares 12 px apart on a diagonal would
        # overlap, so the half-extents' boxes must keep a gap as well.
        half = rs * (SQUARE_HALF_SIDE if e.shape == "square" else 1.0)
        gap = (np.abs(xy[:, None] - xy[None]) - (half[:, None] + half[None])[..., None]).max(-1)
        if np.all(d[iu] >= MIN_CENTRE_DISTANCE) and np.all(gap[iu] >= MIN_GAP):
            return [PlacedObject(e.colour, e.shape, float(x), float(y), float(r)) for (x, y), r in zip(xy, rs)]
    raise RuntimeError(f"could not place {e.count} objects >= {MIN_CENTRE_DISTANCE} px apart")


# Supersample centres in pixel units, shared by every draw: [128] each.
_SS = (np.arange(SIZE * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE


def coverage(obj: PlacedObject) -> np.ndarray:
    """Fraction of each pixel the object covers: float32 [32, 32] in [0, 1]."""
    # Only a window around the object is evaluated; r <= 5 and the triangle's corners are
    # within r*sqrt(2) < 8 px of the centre.
    x0 = max(int(obj.x) - 8, 0)
    x1 = min(int(obj.x) + 9, SIZE)
    y0 = max(int(obj.y) - 8, 0)
    y1 = min(int(obj.y) + 9, SIZE)
    xs = _SS[x0 * SUPERSAMPLE : x1 * SUPERSAMPLE][None, :] - obj.x
    ys = _SS[y0 * SUPERSAMPLE : y1 * SUPERSAMPLE][:, None] - obj.y
    r = obj.r
    if obj.shape == "circle":
        inside = xs * xs + ys * ys <= r * r
    elif obj.shape == "square":
        h = SQUARE_HALF_SIDE * r
        inside = (np.abs(xs) <= h) & (np.abs(ys) <= h)
    elif obj.shape == "triangle":
        # Apex (0, -r), base corners (+-r, r): half-width at height ys is (ys + r) / 2.
        inside = (ys <= r) & (np.abs(xs) <= (ys + r) * 0.5)
    else:
        raise ValueError(f"shape {obj.shape!r} is not one of {SHAPES}")
    win = inside.astype(np.float32).reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[y0:y1, x0:x1] = win
    return out


def draw(objects: list[PlacedObject], rng: np.random.Generator, style: str = DEFAULT_STYLE) -> np.ndarray:
    """Draw objects over a noisy grey background of ``style``'s band: uint8 [32, 32, 3]."""
    _check_style(style)
    g = rng.uniform(*STYLES[style])
    bg = g + rng.uniform(-BACKGROUND_SHIFT, BACKGROUND_SHIFT, size=3)
    img = np.broadcast_to(bg.astype(np.float32), (SIZE, SIZE, 3)).copy()
    for obj in objects:
        a = coverage(obj)[..., None]
        img = img * (1.0 - a) + np.asarray(PALETTE[obj.colour], dtype=np.float32) * a
    sigma = rng.uniform(0.0, NOISE_SIGMA_MAX)
    img += rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(spec: SceneSpec, rng: np.random.Generator, style: str = DEFAULT_STYLE) -> np.ndarray:
    """Render ``spec`` on ``style``'s background: uint8 [32, 32, 3] (HWC, RGB), deterministic given ``rng``'s state."""
    return draw(layout(spec, rng), rng, style)

