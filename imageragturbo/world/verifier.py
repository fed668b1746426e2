"""A TIFA-like, model-free verifier for shapes-world images (docs/world.md "The verifier").

From a caption's spec come yes/no and counting questions, each in one category:

==========  ======================================================  =================
category    question                                                 asked for
==========  ======================================================  =================
existence   is there a ``c s``?                                      every entity
count       how many ``c s``?                                        every entity
position    is the ``c s`` ``POS``?                                  single, pair_h
relation    is ``a`` left of ``b``? / is ``a`` above ``b``?          pair_h / pair_v
extras      are there objects that the caption does not name?        every scene
==========  ======================================================  =================

They are answered on the image by an analytic detector (:func:`detect`):

1. Background: the per-channel median of low-chroma pixels (docs/world.md's background is
   gray with a small per-channel shift).
2. Colour: each pixel is modelled as ``bg + alpha * (c - bg)`` (a palette colour ``c``
   partly covering the background, which is exactly how anti-aliased edges are drawn);
   the palette colour with the smallest residual wins, and the pixel is foreground
   if ``alpha >= 0.5`` and the colour explains most of its difference from the
   background. This tolerates soft edges, blur and off-colour generations.
3. Objects: 8-connected components of the foreground, at least ``MIN_AREA_PX`` pixels,
   coloured by majority (split by colour when two colours each hold a large share).
4. Shape: a triangle (apex up) puts its mass low in its bounding box, so the vertical
   skewness of the coverage is strongly negative; a square fills its bounding box,
   a circle fills about pi/4 of it. Thresholds were set halfway between the feature
   distributions of ground-truth renders and of renders blurred by a 3x3 box filter.
5. Position: the bounding-box centre (the object centre of docs/world.md's table for all
   three shapes), classified to the nearest docs/world.md placement range, i.e. thresholds
   halfway between ranges. Relations compare centres.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from imageragturbo.world.render import SINGLE_RANGES, SQUARE_HALF_SIDE, PlacedObject, coverage
from imageragturbo.world.spec import COLOURS, PALETTE, POSITION_PHRASES, SceneSpec, caption, parse_caption

CATEGORIES: tuple[str, ...] = ("existence", "count", "position", "relation", "extras")

MIN_AREA_PX = 6
# A component whose second colour holds this share of its coverage is two touching objects.
SPLIT_SHARE = 0.35
ALPHA_FG = 0.5
# The residual of the colour model may be at most this fraction of the explained difference.
MAX_RESIDUAL_RATIO = 0.6
# Pixels whose channel spread (max - min) is below this are background candidates.
BG_SPREAD = 30.0
# pair_h: left of centre means left.
PAIR_H_SPLIT_X = 16.0

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # [5, 3]


@dataclass(frozen=True)
class Detection:
    """One detected object: colour, shape, fitted centre ``(x, y)`` and size ``r`` in pixels, mask area in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    area: int
    r: float
    fit_errors: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Answer:
    """One question, its category, the answer the caption implies and the answer read off the image."""

    question: str
    category: str
    expected: bool | int
    answered: bool | int

    @property
    def correct(self) -> bool:
        return self.expected == self.answered


@dataclass(frozen=True)
class VerifierResult:
    """Verification of one image: ``score`` is the fraction of questions right, ``strict`` all right."""

    caption: str
    score: float
    strict: bool
    per_category: dict[str, tuple[int, int]]  # category -> (correct, total)
    answers: list[Answer]
    detections: list[Detection]


@dataclass(frozen=True)
class BenchmarkResult:
    """Aggregate over prompts: mean score, strict fraction, per-category accuracy (TIFA-style)."""

    n: int
    mean_score: float
    strict: float
    per_category: dict[str, float]  # category -> accuracy over all its questions
    per_category_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    per_kind: dict[str, float] = field(default_factory=dict)  # scene kind -> mean score

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "mean_score": self.mean_score,
            "strict": self.strict,
            "per_category": self.per_category,
            "per_category_counts": {k: list(v) for k, v in self.per_category_counts.items()},
            "per_kind": self.per_kind,
        }


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a bool [H, W] mask: (int32 [H, W] with 0 = none, count)."""
    h, w = mask.shape
    big = np.iinfo(np.int32).max
    lab = np.where(mask, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), big)
    # Min-label propagation: every pixel takes the smallest label among its 8 neighbours
    # until nothing changes; at 32x32 this converges in a few dozen cheap passes.
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = lab
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                m = np.minimum(m, p[dy : dy + h, dx : dx + w])
        m = np.where(mask, m, big)
        if np.array_equal(m, lab):
            break
        lab = m
    lab = np.where(mask, lab, 0)
    uniq = np.unique(lab[mask])
    remap = np.zeros(h * w + 1, dtype=np.int32)
    remap[uniq] = np.arange(1, len(uniq) + 1, dtype=np.int32)
    return remap[lab], len(uniq)


def colour_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel palette index, coverage and foreground mask of an RGB image.

    Args:
        image: uint8 or float [H, W, 3] RGB in 0..255.
    Returns:
        (colour index int64 [H, W] into ``COLOURS``, alpha float32 [H, W], foreground bool [H, W]).
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
    spread = img.max(-1) - img.min(-1)
    bg_pixels = img[spread < BG_SPREAD]
    if len(bg_pixels) < 0.2 * spread.size:
        # Almost nothing gray (a failed generation): fall back to the lower-chroma half.
        bg_pixels = img[spread <= np.median(spread)]
    bg = np.median(bg_pixels, axis=0)  # [3]
    d = img - bg  # [H, W, 3]
    v = _PALETTE_RGB - bg  # [5, 3]
    vv = (v * v).sum(-1)  # [5]
    alpha = np.einsum("hwc,kc->hwk", d, v) / vv  # [H, W, 5]
    resid = np.linalg.norm(d[..., None, :] - alpha[..., None] * v, axis=-1)  # [H, W, 5]
    resid = np.where(alpha > 0, resid, np.inf)
    k = resid.argmin(-1)
    a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    r = np.take_along_axis(resid, k[..., None], -1)[..., 0]
    explained = a * np.sqrt(vv[k])
    fg = (a >= ALPHA_FG) & (r <= MAX_RESIDUAL_RATIO * explained)
    return k, a.astype(np.float32), fg


# Area of a shape of size r, in units of r**2 (docs/world.md's shapes).
_AREA_PER_R2 = {"circle": np.pi, "square": (2 * SQUARE_HALF_SIDE) ** 2, "triangle": 2.0}


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box filter of a float [H, W] map with edge padding."""
    h, w = x.shape
    p = np.pad(x, 1, mode="edge")
    return sum(p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    h, w = mask.shape
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask |= p[dy : dy + h, dx : dx + w]
    return mask


def fit_shape(target: np.ndarray) -> tuple[str, float, float, float, dict[str, float]]:
    """Fit each shape template to one object's coverage map and keep the best.

    Args:
        target: float32 [32, 32], the object's coverage in [0, 1] (zero off the object).
    Returns:
        (shape, centre x, centre y, r, {shape: mean squared error of its best template}).

    For each shape the size r follows from the coverage's area and the centre from its
    centroid (a triangle's centroid lies r/3 below its centre); the template is drawn by the
    renderer itself, sharp and once box-blurred, so that blurry generations still match the
    shape they were meant to be. Comparing squared errors is what separates a square from a
    circle at this resolution, where their thresholded masks differ by a few corner pixels.
    """
    area = float(target.sum())
    ys, xs = np.mgrid[0 : target.shape[0], 0 : target.shape[1]].astype(np.float32) + 0.5
    cx = float((target * xs).sum() / area)
    cy = float((target * ys).sum() / area)
    region = _dilate(target > 0.05, 2)
    errors: dict[str, float] = {}
    fits: dict[str, tuple[float, float, float]] = {}
    for shape, per_r2 in _AREA_PER_R2.items():
        r = float(np.sqrt(area / per_r2))
        y = cy - r / 3.0 if shape == "triangle" else cy
        tmpl = coverage(PlacedObject("red", shape, cx, y, r))
        err = min(float(((t - target)[region] ** 2).mean()) for t in (tmpl, _box3(tmpl)))
        errors[shape] = err
        fits[shape] = (cx, y, r)
    best = min(errors, key=errors.get)
    return (best, *fits[best], errors)


def _fit_detection(comp: np.ndarray, colour: str, coverage_map: np.ndarray) -> Detection:
    """Fit a shape to one component (bool [H, W]) given its soft coverage (float32 [H, W])."""
    shape, x, y, r, errors = fit_shape(coverage_map)
    return Detection(colour, shape, x, y, int(comp.sum()), r, errors)


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an RGB image (uint8 [32, 32, 3]), sorted left to right, then top to bottom.

    Components are found on the foreground regardless of colour, because generated objects
    are often colour-mixed (a magenta triangle's pixels split between red and purple, which
    per-colour components would break into fragments of no recognisable shape). A component
    takes its majority colour, unless a second colour holds at least ``SPLIT_SHARE`` of its
    coverage: then it is two touching objects and is split by colour.
    """
    k, alpha, fg = colour_alpha(image)
    a = np.clip(alpha, 0.0, 1.0)
    labels, n = _label_components(fg)
    out = []
    for j in range(1, n + 1):
        comp = labels == j
        if comp.sum() < MIN_AREA_PX:
            continue
        mass = np.array([a[comp & (k == ci)].sum() for ci in range(len(COLOURS))])
        order = np.argsort(-mass)
        if mass[order[1]] >= SPLIT_SHARE * mass.sum():
            for ci in order[:2]:
                sub_labels, n_sub = _label_components(comp & (k == ci))
                for jj in range(1, n_sub + 1):
                    sub = sub_labels == jj
                    if sub.sum() >= MIN_AREA_PX:
                        rim = _dilate(sub, 1) & (k == ci)
                        out.append(_fit_detection(sub, COLOURS[ci], np.where(rim, a, 0.0).astype(np.float32)))
            continue
        # The object's soft coverage: its own pixels plus its anti-aliased rim.
        rim = _dilate(comp, 1) & (alpha > 0)
        out.append(_fit_detection(comp, COLOURS[order[0]], np.where(rim, a, 0.0).astype(np.float32)))
    return sorted(out, key=lambda d: (d.x, d.y))


def single_position(x: float, y: float) -> str:
    """The single-scene position whose placement range is nearest to centre (x, y)."""
    def dist(name: str) -> float:
        (xa, xb), (ya, yb) = SINGLE_RANGES[name]
        dx = max(xa - x, 0.0, x - xb)
        dy = max(ya - y, 0.0, y - yb)
        return dx * dx + dy * dy

    return min(SINGLE_RANGES, key=dist)


def _at(det: Detection, position: str, kind: str) -> bool:
    if kind == "pair_h":
        return det.x < PAIR_H_SPLIT_X if position == "left" else det.x > PAIR_H_SPLIT_X
    return single_position(det.x, det.y) == position


def questions_and_answers(spec: SceneSpec, detections: Sequence[Detection]) -> list[Answer]:
    """Ask every question of ``spec`` (see module docstring) and answer it from ``detections``."""
    answers: list[Answer] = []
    by_pair: dict[tuple[str, str], list[Detection]] = {}
    for det in detections:
        by_pair.setdefault(det.pair, []).append(det)
    for e in spec.entities:
        found = by_pair.get(e.pair, [])
        answers.append(Answer(f"is there a {e.name}?", "existence", True, len(found) > 0))
        answers.append(Answer(f"how many {e.name}s?", "count", e.count, len(found)))
    for e in spec.entities:
        if e.position is not None:
            found = by_pair.get(e.pair, [])
            hit = any(_at(d, e.position, spec.kind) for d in found)
            answers.append(Answer(f"is the {e.name} {POSITION_PHRASES[e.position]}?", "position", True, hit))
    if spec.kind in ("pair_h", "pair_v"):
        a, b = spec.entities
        da, db = by_pair.get(a.pair, []), by_pair.get(b.pair, [])
        if spec.kind == "pair_h":
            hit = any(p.x < q.x for p in da for q in db)
            answers.append(Answer(f"is the {a.name} left of the {b.name}?", "relation", True, hit))
        else:
            hit = any(p.y < q.y for p in da for q in db)
            answers.append(Answer(f"is the {a.name} above the {b.name}?", "relation", True, hit))
    named = {e.pair: e.count for e in spec.entities}
    extra = any(p not in named or len(ds) > named[p] for p, ds in by_pair.items())
    answers.append(Answer("are there objects that the caption does not name?", "extras", False, extra))
    return answers


def verify(image: np.ndarray, prompt: str | SceneSpec) -> VerifierResult:
    """Verify one image (uint8 [32, 32, 3] RGB) against a caption of the grammar or its spec.

    Raises ``ValueError`` (from :func:`parse_caption`) if the caption is outside the grammar.
    """
    if isinstance(prompt, SceneSpec):
        spec, text = prompt, caption(prompt)
    else:
        spec, text = parse_caption(prompt), prompt
    detections = detect(image)
    answers = questions_and_answers(spec, detections)
    per_cat: dict[str, tuple[int, int]] = {}
    for ans in answers:
        c, t = per_cat.get(ans.category, (0, 0))
        per_cat[ans.category] = (c + int(ans.correct), t + 1)
    n_right = sum(a.correct for a in answers)
    return VerifierResult(text, n_right / len(answers), n_right == len(answers), per_cat, answers, detections)


def aggregate(results: Iterable[VerifierResult]) -> BenchmarkResult:
    """Benchmark score over per-image results: mean, strict fraction, per-category and per-kind accuracy."""
    results = list(results)
    if not results:
        raise ValueError("aggregate() needs at least one VerifierResult, got none")
    counts = {c: [0, 0] for c in CATEGORIES}
    kinds: dict[str, list[float]] = {}
    for res in results:
        for cat, (c, t) in res.per_category.items():
            counts[cat][0] += c
            counts[cat][1] += t
        kinds.setdefault(parse_caption(res.caption).kind, []).append(res.score)
    return BenchmarkResult(
        n=len(results),
        mean_score=float(np.mean([r.score for r in results])),
        strict=float(np.mean([r.strict for r in results])),
        per_category={c: (v[0] / v[1] if v[1] else float("nan")) for c, v in counts.items()},
        per_category_counts={c: (v[0], v[1]) for c, v in counts.items()},
        per_kind={k: float(np.mean(v)) for k, v in sorted(kinds.items())},
    )


def verify_batch(images: Iterable[np.ndarray], prompts: Iterable[str | SceneSpec]) -> BenchmarkResult:
    """Verify images against prompts pairwise and aggregate (see :func:`aggregate`)."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return aggregate(verify(img, p) for img, p in zip(images, prompts))
