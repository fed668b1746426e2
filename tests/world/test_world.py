"""Renderer, grammar, splits and verifier of the shapes world (docs/world.md)."""

from __future__ import annotations

import numpy as np
import pytest

from imageragturbo.world.render import (
    COUNT_RANGE,
    MIN_CENTRE_DISTANCE,
    PAIR_H_RANGES,
    PAIR_V_RANGES,
    R_RANGE,
    SINGLE_RANGES,
    STYLE_NAMES,
    STYLES,
    TAIL_RATE,
    layout,
    render,
    sample_spec,
)
from imageragturbo.world.spec import (
    COLOURS,
    HELD_OUT,
    KINDS,
    POSITIONS,
    SHAPES,
    TAIL,
    Entity,
    SceneSpec,
    all_specs,
    caption,
    parse_caption,
    swap_attribute,
)
from imageragturbo.world.style import read_style, restyle
from imageragturbo.world.splits import eval_prompts, item_rng, item_style, world_arrays, world_pair
from imageragturbo.world.verifier import CATEGORIES, aggregate, detect, verify, verify_batch


def _specs(split: str, n: int) -> list[SceneSpec]:
    return [sample_spec(item_rng(split, 0, i), split) for i in range(n)]


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Simulate a generated image: 3x3 box blur plus Gaussian noise (sigma 4)."""
    f = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    b = sum(f[dy : dy + 32, dx : dx + 32] for dy in range(3) for dx in range(3)) / 9.0
    b += rng.normal(0.0, 4.0, b.shape)
    return np.clip(np.rint(b), 0, 255).astype(np.uint8)


# ---- renderer ----------------------------------------------------------------------------


def test_render_is_deterministic_and_uint8():
    a = world_pair("train", 5, 17)
    b = world_pair("train", 5, 17)
    assert a[0].dtype == np.uint8 and a[0].shape == (32, 32, 3)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
    spec = parse_caption("three yellow triangles")
    assert render(spec, np.random.default_rng(3)).tobytes() == render(spec, np.random.default_rng(3)).tobytes()
    assert render(spec, np.random.default_rng(3)).tobytes() != render(spec, np.random.default_rng(4)).tobytes()


def test_splits_use_disjoint_streams():
    train = world_arrays("train", 20, seed=0)[0]
    seen = world_arrays("test-seen", 20, seed=0)[0]
    train_bytes = {im.tobytes() for im in train}
    assert not any(im.tobytes() in train_bytes for im in seen)


def test_placement_ranges_sizes_and_distances():
    rng = np.random.default_rng(0)
    for spec in all_specs():
        for _ in range(3):
            objs = layout(spec, rng)
            assert len(objs) == spec.n_objects
            for o in objs:
                assert R_RANGE[0] <= o.r <= R_RANGE[1]
            if spec.kind == "single":
                (xa, xb), (ya, yb) = SINGLE_RANGES[spec.entities[0].position]
                assert xa <= objs[0].x <= xb and ya <= objs[0].y <= yb, (spec, objs)
            elif spec.kind in ("pair_h", "pair_v"):
                ranges = PAIR_H_RANGES if spec.kind == "pair_h" else PAIR_V_RANGES
                for o, e, ((xa, xb), (ya, yb)) in zip(objs, spec.entities, ranges):
                    assert (o.colour, o.shape) == e.pair
                    assert xa <= o.x <= xb and ya <= o.y <= yb, (spec, objs)
            else:
                for o in objs:
                    assert COUNT_RANGE[0][0] <= o.x <= COUNT_RANGE[0][1]
                    assert COUNT_RANGE[1][0] <= o.y <= COUNT_RANGE[1][1]
            for i in range(len(objs)):
                for j in range(i + 1, len(objs)):
                    d = np.hypot(objs[i].x - objs[j].x, objs[i].y - objs[j].y)
                    assert d >= MIN_CENTRE_DISTANCE, (spec, objs)


@pytest.mark.parametrize("style", STYLE_NAMES)
def test_background_band_of_each_style_and_palette_is_exact(style):
    low, high = STYLES[style]
    for i in range(20):
        img, _, _ = world_pair("database", 0, i, style=style)
        ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(int)
        # g in the band, per-channel shift <= 8, noise sigma <= 4 (the median removes the noise).
        grey = np.median(ring, axis=0)
        assert low - 8 <= grey.min() and grey.max() <= high + 8, (style, grey)
    big = render(parse_caption("a blue square in the center"), np.random.default_rng(1), style).astype(int)
    assert np.abs(big[16, 16] - np.array([40, 80, 230])).max() <= 20


def test_style_read_out_is_exact_on_renders():
    for split in ("train", "universal", "test-held", "database"):
        for i in range(150):
            style = STYLE_NAMES[i % 3]
            assert read_style(world_pair(split, 4, i, style=style)[0]) == style
    with pytest.raises(ValueError, match="32, 32, 3"):
        read_style(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="style 'sepia'"):
        render(parse_caption("a red circle on the left"), np.random.default_rng(0), "sepia")


def test_restyle_moves_the_background_and_keeps_the_objects():
    images, captions, _ = world_arrays("database", 120, seed=12, style="grey")
    rng = np.random.default_rng(0)
    for style in STYLE_NAMES:
        moved = [restyle(im, style, rng) for im in images]
        assert all(read_style(im) == style for im in moved), style
        assert verify_batch(moved, captions).mean_score >= 0.99, style
    with pytest.raises(ValueError, match="style 'sepia'"):
        restyle(images[0], "sepia", rng)


def test_same_scene_in_every_style_and_styles_drawn_uniformly():
    scenes = [world_pair("database", 1, 7, style=s) for s in STYLE_NAMES]
    assert len({c for _, c, _ in scenes}) == 1
    # Only the background differs: the object pixels sit at the same places.
    fg = [np.abs(im.astype(int) - np.median(im[0], axis=0)).max(-1) > 60 for im, _, _ in scenes]
    assert (fg[0] == fg[2]).mean() > 0.97
    counts = {s: 0 for s in STYLE_NAMES}
    for i in range(3000):
        counts[item_style("train", 0, i)] += 1
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values()), counts
    assert item_style("train", 0, 5) == read_style(world_pair("train", 0, 5)[0])


# ---- splits ------------------------------------------------------------------------------


def test_database_covers_every_kind_pair_and_position():
    specs = _specs("database", 1500)
    assert {s.kind for s in specs} == set(KINDS)
    assert {e.pair for s in specs for e in s.entities} == {(c, sh) for c in COLOURS for sh in SHAPES}
    assert {e.position for s in specs for e in s.entities if s.kind == "single"} == set(POSITIONS)
    assert any(s.has_held_out for s in specs)


def test_generator_stream_never_holds_a_held_out_pair():
    for split in ("train", "test-seen", "test-tail"):
        specs = _specs(split, 2000)
        assert not any(s.has_held_out for s in specs), split
        assert {s.kind for s in specs} == set(KINDS)


def test_generator_stream_holds_tail_pairs_near_one_twentieth_of_their_natural_rate():
    n = 20_000
    train = _specs("train", n)
    natural = [s for s in _specs("universal", n) if not s.has_held_out]  # the same pool, untilted
    p_nat = sum(s.has_tail for s in natural) / len(natural)
    p_train = sum(s.has_tail for s in train) / n
    # Keeping a tail scene with probability 1/20: odds(tail) fall by exactly 20.
    odds_ratio = (p_nat / (1 - p_nat)) / (p_train / (1 - p_train))
    assert 1 / TAIL_RATE * 0.8 < odds_ratio < 1 / TAIL_RATE * 1.25, (p_nat, p_train, odds_ratio)
    assert {p for s in train for p in s.pairs} >= set(TAIL)  # rare, never absent


def test_universal_stream_and_database_hold_every_composition_at_its_natural_rate():
    for split in ("universal", "database"):
        specs = _specs(split, 3000)
        pairs = [e.pair for s in specs for e in s.entities]
        rate = {p: pairs.count(p) / len(pairs) for p in set(pairs)}
        assert set(rate) == {(c, sh) for c in COLOURS for sh in SHAPES}, split
        assert max(rate.values()) < 2 * min(rate.values()), (split, rate)


def test_test_seen_and_test_tail_splits():
    seen, tail = _specs("test-seen", 1000), _specs("test-tail", 1000)
    assert not any(s.has_tail for s in seen)
    assert all(s.has_tail and not s.has_held_out for s in tail)
    assert {p for s in tail for p in s.pairs} >= set(TAIL)
    assert {s.kind for s in tail} == set(KINDS)


def test_test_held_only_held_out_scenes():
    specs = _specs("test-held", 1000)
    assert all(s.has_held_out for s in specs)
    assert {p for s in specs for p in s.pairs} >= set(HELD_OUT)
    assert {s.kind for s in specs} == set(KINDS)


def test_eval_prompts_are_fixed_and_in_split():
    a = eval_prompts("test-held", 50)
    assert a == eval_prompts("test-held", 50) and a == eval_prompts("test-held", 200)[:50]
    assert all(parse_caption(c).has_held_out for c, _ in a)
    assert not any(parse_caption(c).has_held_out for c, _ in eval_prompts("test-seen", 200))
    assert all(parse_caption(c).has_tail for c, _ in eval_prompts("test-tail", 200))
    assert len({seed for _, seed in eval_prompts("test-seen", 200)}) == 200
    with pytest.raises(ValueError, match="validation"):
        eval_prompts("validation", 3)


# ---- grammar -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,text",
    [
        (SceneSpec("count", (Entity("red", "circle", 2),)), "two red circles"),
        (SceneSpec("count", (Entity("green", "triangle", 3),)), "three green triangles"),
        (SceneSpec("single", (Entity("yellow", "square", 1, "center"),)), "a yellow square in the center"),
        (SceneSpec("single", (Entity("purple", "circle", 1, "bottom"),)), "a purple circle at the bottom"),
        (
            SceneSpec("pair_h", (Entity("blue", "square", 1, "left"), Entity("green", "circle", 1, "right"))),
            "a blue square on the left and a green circle on the right",
        ),
        (
            SceneSpec("pair_v", (Entity("red", "circle"), Entity("blue", "triangle"))),
            "a red circle above a blue triangle",
        ),
    ],
)
def test_caption_grammar(spec, text):
    assert caption(spec) == text
    assert parse_caption(text) == spec


def test_parse_round_trip_on_every_caption():
    specs = all_specs()
    # 15 pairs: 75 singles, 210 + 210 ordered pairs of distinct compositions, 30 counts.
    assert len(specs) == 525 and len({caption(s) for s in specs}) == 525
    for spec in specs:
        text = caption(spec)
        assert text == text.lower() and "  " not in text and text.strip() == text
        assert parse_caption(text) == spec


@pytest.mark.parametrize(
    "text,needle",
    [
        ("a red hexagon on the left", "'hexagon' at position 2"),
        ("a red circle on the middle", "'middle' at position 5"),
        ("two red circle", "'circle' at position 2"),
        ("A red circle on the left", "'A' at position 0"),
        ("a red circle", "ends after word 3"),
        ("three blue squares on the left", "'on' at position 3"),
        ("a red circle on the left and a blue square", "ends after word 10"),
        ("a red circle at the top and a blue square on the right", "'and' at position 6"),
        ("a red circle above a red circle", "must differ"),
        ("a red circle above two blue squares", "'two' at position 4"),
        ("", "'' at position 0"),
        ("a red circle  on the left", "'' at position 3"),
    ],
)
def test_parse_errors_name_the_bad_word(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_caption(text)


# ---- verifier ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_renders():
    """900 ground-truth renders, 150 per split (styles drawn uniformly), from a seed no other test uses."""
    out = []
    for split in ("train", "test-seen", "test-tail", "test-held", "universal", "database"):
        images, captions, _ = world_arrays(split, 150, seed=99)
        out += list(zip(images, captions))
    return out


def test_verifier_on_ground_truth_renders(fresh_renders):
    bench = verify_batch([im for im, _ in fresh_renders], [c for _, c in fresh_renders])
    assert bench.n == 900
    assert bench.mean_score >= 0.99, bench
    assert bench.strict >= 0.97, bench
    assert set(bench.per_category) == set(CATEGORIES)
    assert all(bench.per_category[c] >= 0.98 for c in CATEGORIES), bench.per_category
    assert set(bench.per_kind) == set(KINDS)


@pytest.mark.parametrize("style", STYLE_NAMES)
def test_verifier_on_ground_truth_renders_of_every_style(style):
    images, captions, _ = world_arrays("database", 300, seed=98, style=style)
    bench = verify_batch(list(images), captions)
    assert bench.mean_score >= 0.99, (style, bench)


def test_verifier_rejects_shuffled_captions(fresh_renders):
    images = [im for im, _ in fresh_renders]
    captions = [c for _, c in fresh_renders]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(captions))
    # A caption of another random scene (skip the rare identical caption).
    pairs = [(images[i], captions[j]) for i, j in enumerate(perm) if captions[i] != captions[j]]
    bench = verify_batch([p[0] for p in pairs], [p[1] for p in pairs])
    assert bench.mean_score < 0.5, bench
    assert bench.strict < 0.05, bench


def test_verifier_on_blurred_noisy_renders(fresh_renders):
    rng = np.random.default_rng(1)
    bench = verify_batch([_degrade(im, rng) for im, _ in fresh_renders], [c for _, c in fresh_renders])
    # Measured 0.999+ on this set; generated images are blurrier than ground truth.
    assert bench.mean_score >= 0.98, bench


def test_verifier_answers_and_categories():
    spec = parse_caption("a red circle on the left and a blue triangle on the right")
    img = render(spec, np.random.default_rng(0))
    res = verify(img, spec)
    assert res.score == 1.0 and res.strict
    assert res.per_category == {"existence": (2, 2), "count": (2, 2), "position": (2, 2), "relation": (1, 1), "extras": (1, 1)}
    assert [d.pair for d in res.detections] == [("red", "circle"), ("blue", "triangle")]
    # The same image against the mirrored caption: objects exist, but positions and relation fail.
    mirrored = verify(img, "a blue triangle on the left and a red circle on the right")
    wrong = {a.category for a in mirrored.answers if not a.correct}
    assert wrong == {"position", "relation"} and not mirrored.strict
    assert mirrored.score == pytest.approx(5 / 8)
    # A blank background: nothing exists, nothing extra.
    blank = np.full((32, 32, 3), 180, np.uint8)
    assert detect(blank) == []
    res_blank = verify(blank, "three green squares")
    assert [(a.category, a.answered) for a in res_blank.answers] == [("existence", False), ("count", 0), ("extras", False)]
    bench = aggregate([res, mirrored, res_blank])
    assert bench.per_category_counts["relation"] == (1, 2)
    with pytest.raises(ValueError, match="hexagon"):
        verify(img, "a red hexagon on the left")


def test_verifier_distinguishes_every_shape_and_colour():
    rng = np.random.default_rng(5)
    for c in COLOURS:
        for s in SHAPES:
            for pos in POSITIONS:
                spec = SceneSpec("single", (Entity(c, s, 1, pos),))
                dets = detect(render(spec, rng))
                assert [(d.colour, d.shape) for d in dets] == [(c, s)], (spec, dets)


def test_swap_attribute_changes_one_attribute_and_never_names_a_held_out_composition():
    rng = np.random.default_rng(0)
    for spec in all_specs():
        if spec.has_held_out:
            continue
        text = caption(spec)
        swapped = parse_caption(swap_attribute(text, rng))  # a valid scene of the grammar
        assert not swapped.has_held_out
        assert swapped.kind == spec.kind
        differences = [
            (a.colour != b.colour) + (a.shape != b.shape) + (a.count != b.count) + (a.position != b.position)
            for a, b in zip(spec.entities, swapped.entities)
        ]
        assert sorted(differences)[-1] == 1 and sum(differences) == 1, (text, caption(swapped))
    with pytest.raises(ValueError):
        swap_attribute("a cat on the left", rng)
