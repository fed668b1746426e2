import pytest

from imageragturbo.benchmarks.latency import (
    REPORT_BEGIN,
    REPORT_END,
    STAGES,
    LatencyResult,
    LatencyRun,
    derived_ratios,
    stage_stats,
    update_report,
)


def test_stats_and_ratios():
    assert stage_stats([1.0, 2.0, 3.0, 4.0]) == {"mean_ms": 2.5, "p50_ms": 2.5, "p90_ms": 3.7}
    with pytest.raises(ValueError, match="no samples"):
        stage_stats([])

    def run(engine, mode, denoise, total):
        stages = {s: stage_stats([1.0]) for s in STAGES}
        stages["denoise"], stages["total"] = stage_stats([denoise]), stage_stats([total])
        return LatencyRun(engine, mode, 1, stages)

    result = LatencyResult({}, [run("torch", "off", 9.0, 12.0), run("onnxruntime", "off", 3.0, 5.0),
                                run("onnxruntime", "adapter", 3.1, 5.1)])
    lines = derived_ratios(result)
    assert any("3.00x faster" in line for line in lines)
    assert any(line.startswith("onnxruntime: `adapter` total p50 5.100 ms vs `off` 5.000 ms: +2.0%") for line in lines)


def test_update_report_replaces_only_its_block(tmp_path):
    report = tmp_path / "latency.md"
    report.write_text(f"# Latency\n\nintro\n\n{REPORT_BEGIN}\nold table\n{REPORT_END}\n\n## Profile\nnotes\n")
    update_report(report, "new table")
    assert report.read_text() == f"# Latency\n\nintro\n\n{REPORT_BEGIN}\nnew table\n{REPORT_END}\n\n## Profile\nnotes\n"


def test_update_report_creates_or_appends(tmp_path):
    fresh = tmp_path / "new.md"
    update_report(fresh, "table")
    assert fresh.read_text() == f"# Latency\n\n{REPORT_BEGIN}\ntable\n{REPORT_END}\n"
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n")
    update_report(notes, "table")
    assert notes.read_text().startswith("# Notes\n\n" + REPORT_BEGIN)


def test_interleaving_does_not_put_adapter_after_off_of_the_same_engine():
    """A rotation of (engine, mode) pairs put `adapter` right after `off` of the same engine
    3 times in 4, with that engine's shared parts warm in cache; a random order does not."""
    from types import SimpleNamespace

    from imageragturbo.benchmarks.latency import run_latency_bench

    calls = []

    def fake(engine):
        def pipe(prompts, seeds, mode, k):
            calls.append((engine, mode))
            return SimpleNamespace(timings_ms=dict.fromkeys(STAGES[:-1], 1.0))

        return pipe

    prompts = [(f"prompt {i}", i) for i in range(400)]
    run_latency_bench({"a": fake("a"), "b": fake("b")}, ["off", "adapter"], prompts, warmup=0, machine={})
    assert len(calls) == 1600 and calls[:4] != calls[4:8]
    after_own_off = sum(prev == (cur[0], "off") for prev, cur in zip(calls, calls[1:]) if cur[1] == "adapter")
    assert 0.15 < after_own_off / 800 < 0.45  # ~1/4 by chance; the rotation gave 3/4
