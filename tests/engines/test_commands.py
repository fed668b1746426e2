"""`imageragturbo export` and `imageragturbo bench latency` end to end (the engines' fixtures)."""

import json

from imageragturbo.benchmarks.latency import REPORT_BEGIN, REPORT_END, STAGES
from imageragturbo.cli import main
from imageragturbo.engines import read_manifest


def test_export_command_writes_the_requested_graphs(adapter_model_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(adapter_model_dir), "--out", str(out), "--graphs", "text_encoder,vae_decode"]) == 0
    assert list(read_manifest(out).graphs) == ["text_encoder", "vae_decode"]
    err = capsys.readouterr().err
    assert "max rel err vs torch" in err and "manifest.json" in err
    assert main(["export", "--model", str(adapter_model_dir), "--out", str(out), "--graphs", "unet"]) == 2
    assert "unknown graph 'unet'" in capsys.readouterr().err


def test_bench_latency_runs_the_protocol_and_reports(adapter_model_dir, exported, tmp_path, capsys):
    _, engine_dir = exported
    report = tmp_path / "results" / "latency.md"
    report.parent.mkdir()
    report.write_text("# Latency\n\nHand-written notes stay.\n")
    out = tmp_path / "latency.json"
    argv = ["bench", "latency", "--engines", "torch,onnxruntime", "--modes", "off,adapter", "--n", "2", "--warmup", "1",
            "--db-size", "12", "--model", str(adapter_model_dir), "--engine-dir", str(engine_dir),
            "--json", str(out), "--report", str(report), "--profile", "1"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "runs"} and data["machine"]["threads"] == 1
    assert [(r["engine"], r["mode"]) for r in data["runs"]] == [
        ("torch", "off"), ("torch", "adapter"), ("onnxruntime", "off"), ("onnxruntime", "adapter")
    ]
    for run in data["runs"]:
        assert run["n"] == 2 and set(run["stages"]) == set(STAGES)
        for stats in run["stages"].values():
            assert set(stats) == {"mean_ms", "p50_ms", "p90_ms"} and stats["p90_ms"] >= stats["p50_ms"] >= 0
        assert (run["stages"]["retrieve"]["p50_ms"] > 0) == (run["mode"] == "adapter")
    assert data["profile"]["onnxruntime"]["denoise_adapter"][0]["ms"] > 0
    text = report.read_text()
    assert text.startswith("# Latency\n\nHand-written notes stay.") and REPORT_BEGIN in text and REPORT_END in text
    assert "| onnxruntime | adapter |" in text and "x faster" in text
    assert (report.parent / "latency.png").stat().st_size > 1000
    assert main(["bench", "latency", "--engines", "onnx", "--json", str(out), "--model", str(adapter_model_dir)]) == 2
    assert "unknown engine 'onnx'" in capsys.readouterr().err
