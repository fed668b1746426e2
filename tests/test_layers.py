"""The package's layering: every import between its parts runs down, never up.

Walks every ``import`` in ``imageragturbo/`` (module level and inside functions alike) and
asserts that each edge between two top-level parts is one of the allowed ones below.
"""

import ast
from collections import defaultdict
from pathlib import Path

import imageragturbo

PACKAGE = Path(imageragturbo.__file__).parent
LEAVES = {"errors", "paths", "machine", "modes", "lazy"}
"""Small modules any part may use; they import nothing of the package."""
ALLOWED = {
    "world": set(),
    "retrieval": {"world"},
    "model": {"retrieval", "world"},
    "engines": {"model"},
    "generate": {"model", "engines"},
    "training": {"model", "retrieval", "world"},
    "eval": {"model", "retrieval", "world", "generate"},
    "service": {"model", "retrieval", "engines"},
    "benchmarks": {"model", "retrieval", "world", "engines", "service"},
    "cli": {"world", "retrieval", "model", "engines", "generate", "training", "eval", "service", "benchmarks"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _part(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported_parts(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = node.module.split(".")
            if names[0] == "imageragturbo":
                found.update([names[1]] if len(names) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"relative import at line {node.lineno}: the package uses absolute imports")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("imageragturbo."))
    return found


def _edges() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(path)
        for target in _imported_parts(ast.parse(path.read_text(), filename=str(path))):
            if target != source:
                edges[source][target].append(str(path.relative_to(PACKAGE)))
    return edges


def test_every_import_runs_down_the_layers():
    bad = []
    for source, targets in _edges().items():
        assert source in ALLOWED or source in LEAVES, f"new top-level part {source!r}: give it a layer in ALLOWED"
        allowed = set() if source in LEAVES else ALLOWED[source] | LEAVES
        bad += [f"{source} -> {target} ({', '.join(files)})" for target, files in targets.items() if target not in allowed]
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_nothing_imports_the_cli_and_retrieval_knows_no_model():
    edges = _edges()
    assert [s for s, t in edges.items() if "cli" in t and s != "__main__"] == []
    assert "model" not in edges["retrieval"]  # the row encoder is passed in


def test_the_walk_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from imageragturbo.model.pipeline import open_pipeline\n")
    assert _imported_parts(tree) == {"model"}
