"""Structured scene specs of the shapes world and their captions (docs/world.md).

A :class:`SceneSpec` is what a caption means: a scene kind and its entities.
``caption`` turns a spec into the one caption the grammar allows for it, and
``parse_caption`` turns any caption of the grammar back into the spec, so that
arbitrary prompts can be verified. Text outside the grammar raises
``ValueError`` naming the offending word and its position.

Grammar (docs/world.md, fixed)::

    phrase(1, c, s)  = "a c s"
    phrase(n, c, s)  = "two c ss" | "three c ss"          n = 2, 3
    single  = phrase(1) POS          POS in on the left | on the right |
                                     at the top | at the bottom | in the center
    pair_h  = phrase(1, a) "on the left and" phrase(1, b) "on the right"
    pair_v  = phrase(1, a) "above" phrase(1, b)
    count   = phrase(n), n in {2, 3}
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

# Position name -> caption phrase; single scenes use all five, pair_h uses left/right.
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
POSITIONS: tuple[str, ...] = tuple(POSITION_PHRASES)

KINDS: tuple[str, ...] = ("single", "pair_h", "pair_v", "count")
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}

# The (colour, shape) pairs no training image may contain (docs/world.md, "Held-out compositions").
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("yellow", "square")})
# The long tail (docs/world.md v2): pairs a generator trains on at 1/20 of their natural rate.
TAIL: frozenset[tuple[str, str]] = frozenset({("green", "circle"), ("red", "square")})

# Every word a caption of the grammar can contain; the tokenizer's vocabulary.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "two", "three", *COLOURS, *SHAPES, *PLURALS.values(), "above", "and"]
        + [w for p in POSITION_PHRASES.values() for w in p.split()]
    )
)


@dataclass(frozen=True)
class Entity:
    """``count`` objects of one colour and shape, optionally at a named position."""

    colour: str
    shape: str
    count: int = 1
    position: str | None = None

    def __post_init__(self) -> None:
        if self.colour not in PALETTE:
            raise ValueError(f"colour {self.colour!r} is not one of {COLOURS}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.count not in NUMBER_WORDS:
            raise ValueError(f"count {self.count!r} is not one of {tuple(NUMBER_WORDS)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"position {self.position!r} is not one of {POSITIONS}")

    @property
    def pair(self) -> tuple[str, str]:
        """The (colour, shape) composition, e.g. ``("purple", "triangle")``."""
        return (self.colour, self.shape)

    @property
    def name(self) -> str:
        """``"c s"``, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """A scene kind plus its entities; validated against docs/world.md's table.

    - single: one entity, count 1, position set.
    - pair_h: two entities, count 1, positions ``left`` then ``right``, a != b.
    - pair_v: two entities, count 1, no positions (a is above b), a != b.
    - count: one entity, count 2 or 3, no position.
    """

    kind: str
    entities: tuple[Entity, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        ents = self.entities
        if self.kind == "single":
            if len(ents) != 1 or ents[0].count != 1 or ents[0].position is None:
                raise ValueError(f"a single scene needs one entity with count 1 and a position, got {ents}")
        elif self.kind in ("pair_h", "pair_v"):
            want = ("left", "right") if self.kind == "pair_h" else (None, None)
            if len(ents) != 2 or any(e.count != 1 for e in ents) or tuple(e.position for e in ents) != want:
                raise ValueError(f"a {self.kind} scene needs two count-1 entities with positions {want}, got {ents}")
            if ents[0].pair == ents[1].pair:
                raise ValueError(f"the two objects of a {self.kind} scene must differ, both are {ents[0].name!r}")
        else:
            if len(ents) != 1 or ents[0].count not in (2, 3) or ents[0].position is not None:
                raise ValueError(f"a count scene needs one entity with count 2 or 3 and no position, got {ents}")

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        """The set of (colour, shape) compositions the scene names."""
        return frozenset(e.pair for e in self.entities)

    @property
    def has_held_out(self) -> bool:
        """Whether the scene contains a held-out composition (purple triangle, yellow square)."""
        return bool(self.pairs & HELD_OUT)

    @property
    def has_tail(self) -> bool:
        """Whether the scene contains a tail composition (green circle, red square)."""
        return bool(self.pairs & TAIL)

    @property
    def n_objects(self) -> int:
        return sum(e.count for e in self.entities)


def phrase(entity: Entity) -> str:
    """``phrase(n, c, s)`` of docs/world.md, e.g. ``"a red circle"``, ``"three blue squares"``."""
    noun = entity.shape if entity.count == 1 else PLURALS[entity.shape]
    return f"{NUMBER_WORDS[entity.count]} {entity.colour} {noun}"


def caption(spec: SceneSpec) -> str:
    """The caption of ``spec`` per docs/world.md's grammar (lowercase, single spaces, no punctuation)."""
    ents = spec.entities
    if spec.kind == "single":
        return f"{phrase(ents[0])} {POSITION_PHRASES[ents[0].position]}"
    if spec.kind == "pair_h":
        return f"{phrase(ents[0])} on the left and {phrase(ents[1])} on the right"
    if spec.kind == "pair_v":
        return f"{phrase(ents[0])} above {phrase(ents[1])}"
    return phrase(ents[0])


class _Reader:
    """Cursor over caption words that raises ``ValueError`` naming the bad word and its index."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.split(" ")
        self.i = 0

    def fail(self, expected: str) -> ValueError:
        if self.i >= len(self.words):
            return ValueError(f"caption {self.text!r} ends after word {self.i}; expected {expected}")
        return ValueError(
            f"caption {self.text!r}: unexpected word {self.words[self.i]!r} at position {self.i}; expected {expected}"
        )

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, allowed: tuple[str, ...] | list[str], expected: str) -> str:
        word = self.peek()
        if word not in allowed:
            raise self.fail(expected)
        self.i += 1
        return word

    def expect_phrase(self, words: str) -> None:
        for w in words.split(" "):
            self.take((w,), repr(words))

    def position(self) -> str:
        """Consume one of the five position phrases word by word; return its name."""
        cands = {name: p.split(" ") for name, p in POSITION_PHRASES.items()}
        j = 0
        while True:
            word = self.peek()
            matching = {n: ws for n, ws in cands.items() if ws[j] == word}
            if not matching:
                options = sorted({ws[j] for ws in cands.values()})
                hint = " or 'above'" if j == 0 else ""
                raise self.fail(f"a position phrase word {options}{hint}")
            self.i += 1
            j += 1
            for name, ws in matching.items():
                if len(ws) == j:
                    return name
            cands = matching

    def phrase(self, singular: bool = False) -> Entity:
        if singular:
            number = self.take(("a",), "'a' (the objects of a pair scene are single)")
        else:
            number = self.take(tuple(NUMBER_WORDS.values()), "a number word (a, two, three)")
        count = {v: k for k, v in NUMBER_WORDS.items()}[number]
        colour = self.take(COLOURS, f"a colour {COLOURS}")
        nouns = SHAPES if count == 1 else tuple(PLURALS.values())
        noun = self.take(nouns, f"a {'singular' if count == 1 else 'plural'} shape {nouns}")
        return Entity(colour, noun if count == 1 else noun[:-1], count)


def _scene(text: str, kind: str, entities: tuple[Entity, ...]) -> SceneSpec:
    try:
        return SceneSpec(kind, entities)
    except ValueError as exc:
        raise ValueError(f"caption {text!r}: {exc}") from exc


def parse_caption(text: str) -> SceneSpec:
    """Parse a caption of the grammar back into its :class:`SceneSpec`.

    Raises ``ValueError`` naming the first word (and its index) that leaves the
    grammar, or the rule a well-formed but invalid caption breaks (e.g. a pair
    scene whose two objects are the same).
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a str, got {type(text).__name__}")
    r = _Reader(text)
    first = r.phrase()
    if first.count > 1:
        if r.peek() is not None:
            raise r.fail("the end of the caption after a counted phrase")
        return SceneSpec("count", (first,))
    word = r.peek()
    if word == "above":
        r.i += 1
        second = r.phrase(singular=True)
        if r.peek() is not None:
            raise r.fail("the end of the caption")
        return _scene(text, "pair_v", (first, second))
    pos = r.position()
    if r.peek() is None:
        return SceneSpec("single", (Entity(first.colour, first.shape, 1, pos),))
    if pos != "left":
        raise r.fail("the end of the caption (only 'on the left' may be followed by 'and')")
    r.take(("and",), "'and'")
    second = r.phrase(singular=True)
    r.expect_phrase("on the right")
    if r.peek() is not None:
        raise r.fail("the end of the caption")
    return _scene(
        text,
        "pair_h",
        (Entity(first.colour, first.shape, 1, "left"), Entity(second.colour, second.shape, 1, "right")),
    )


def all_specs() -> list[SceneSpec]:
    """Every scene spec (hence every caption) of the grammar, in a fixed order: 525 specs."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    out = [SceneSpec("single", (Entity(c, s, 1, p),)) for c, s in pairs for p in POSITIONS]
    for kind, positions in (("pair_h", ("left", "right")), ("pair_v", (None, None))):
        out += [
            SceneSpec(kind, (Entity(*a, 1, positions[0]), Entity(*b, 1, positions[1])))
            for a in pairs
            for b in pairs
            if a != b
        ]
    out += [SceneSpec("count", (Entity(c, s, n),)) for c, s in pairs for n in (2, 3)]
    return out


def swap_attribute(text: str, rng: np.random.Generator) -> str:
    """``text`` with one entity's colour or shape changed to another, e.g. ``a red circle on the
    left`` -> ``a red square on the left``.

    Never names a held-out composition, and keeps the scene valid (the two objects of a pair
    still differ). Returns ``text`` unchanged when no such swap exists. Raises ``ValueError``
    for text outside the grammar.
    """
    spec = parse_caption(text)
    options = []
    for i, entity in enumerate(spec.entities):
        options += [(i, replace(entity, colour=c)) for c in COLOURS if c != entity.colour]
        options += [(i, replace(entity, shape=s)) for s in SHAPES if s != entity.shape]
    valid = []
    for i, entity in options:
        entities = spec.entities[:i] + (entity,) + spec.entities[i + 1 :]
        if entity.pair in HELD_OUT or (len(entities) == 2 and entities[0].pair == entities[1].pair):
            continue
        valid.append(SceneSpec(spec.kind, entities))
    if not valid:
        return text
    return caption(valid[rng.integers(len(valid))])
