"""The shapes world (v2): scene specs and captions, renderer, styles, splits, verifier."""

from imageragturbo.world.render import render, sample_spec
from imageragturbo.world.spec import Entity, SceneSpec, caption, parse_caption
from imageragturbo.world.splits import eval_prompts, world_pairs
from imageragturbo.world.style import read_style, restyle
from imageragturbo.world.verifier import BenchmarkResult, VerifierResult, aggregate, verify, verify_batch

__all__ = [
    "BenchmarkResult",
    "Entity",
    "SceneSpec",
    "VerifierResult",
    "aggregate",
    "caption",
    "eval_prompts",
    "parse_caption",
    "read_style",
    "render",
    "restyle",
    "sample_spec",
    "verify",
    "verify_batch",
    "world_pairs",
]
