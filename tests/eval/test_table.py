"""`eval table` (v2): rows over seed sets with standard errors, per composition, the style table."""

import json

import numpy as np

from imageragturbo.eval.table import ROWS, Estimate, RandomRowSearcher, run_table, seed_set


def test_seed_sets_are_disjoint_slices_of_the_fixed_list():
    sets = [seed_set("test-tail", 5, j, 3) for j in range(3)]
    flat = [p for s in sets for p in s]
    assert len(flat) == 15 and sets[0] == seed_set("test-tail", 5, 0, 7)  # the first set never moves
    assert len({seed for _, seed in flat}) == 15


def test_estimate_is_the_mean_and_its_standard_error():
    e = Estimate.of([0.5, 0.7, 0.6])
    assert abs(e.mean - 0.6) < 1e-12 and abs(e.se - 0.1 / np.sqrt(3)) < 1e-12
    assert str(e) == "0.600 ± 0.058"


def test_random_row_searcher_ignores_meaning_but_is_deterministic():
    s = RandomRowSearcher(50)
    q = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    ids, _ = s.search(q, 3)
    assert ids.shape == (4, 3) and (ids < 50).all() and np.array_equal(ids, s.search(q, 3)[0])


def test_table_on_a_toy_world_model(tiny_world_model, tmp_path):
    report = run_table(tiny_world_model, tmp_path, n=3, seed_sets=2, k=2)
    names = {row.name for _, row in ROWS} | {"VAE round trip (ceiling)"}
    assert set(report["fidelity"]) == names
    for row in report["fidelity"].values():
        assert set(row) == {"test-seen", "test-tail", "test-held", "test-held/purple triangle", "test-held/yellow square"}
        assert len(row["test-seen"]["per_set"]) == 2
    diff = report["adapter_minus_control"]["test-tail"]
    adapter = report["fidelity"]["ImageRAGTurbo 1-step (adapter)"]["test-tail"]["per_set"]
    control = report["fidelity"]["no-retrieval finetune (gate 0)"]["test-tail"]["per_set"]
    assert np.allclose(diff["per_set"], np.subtract(adapter, control))
    student_start = report["fidelity"]["student 1-step, neighbour start t=499"]["test-tail"]["per_set"]
    assert np.allclose(report["minus_control"]["student 1-step, neighbour start t=499"]["test-tail"]["per_set"],
                       np.subtract(student_start, control))
    assert set(report["minus_control"]) == {"ImageRAGTurbo 1-step (adapter)", "ImageRAGTurbo 1-step, neighbour start t=499",
                                            "student 1-step, neighbour start t=499", "student 1-step, neighbour start t=249"}
    # retrieval alone: the same student weights with and without the neighbour start
    student = report["fidelity"]["student 1-step (off)"]["test-tail"]["per_set"]
    assert set(report["minus_student"]) == {"student 1-step, neighbour start t=499", "student 1-step, neighbour start t=249"}
    assert np.allclose(report["minus_student"]["student 1-step, neighbour start t=499"]["test-tail"]["per_set"],
                       np.subtract(student_start, student))
    assert set(report["style"]) == {"student (off)", "no-retrieval finetune", "injection w=0.8", "ImageRAGTurbo (adapter)",
                                    "student, neighbour start t=499"}
    assert all(set(v) == {"grey", "bright", "dim"} for v in report["style"].values())
    md = (tmp_path / "fidelity.md").read_text()
    assert "adapter − no-retrieval control (paired)" in md and "± " in md
    assert "student, neighbour start t=499 − no-retrieval control (paired)" in md
    assert "student, neighbour start t=249 − student (paired: retrieval alone)" in md
    assert (tmp_path / "fidelity.png").is_file() and (tmp_path / "style_grid.png").is_file()
    assert json.loads((tmp_path / "fidelity.json").read_text())["seed_sets"] == 2
