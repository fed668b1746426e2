"""The GPU check end to end at toy scale on the CPU (what the GPU host runs at SD-Turbo scale)."""

import json

from imageragturbo.cli import main


def test_the_gpu_check_runs_end_to_end_at_toy_scale(tmp_path, capsys):
    assert main(["bench", "gpu-check", "--toy", "--no-tests", "--device", "cpu", "--n", "3", "--db-rows", "32",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("GPU check (p50 ms per image) on cpu (float32), 3 prompts")
    assert "torch: adapter over off" in printed
    result = json.loads((tmp_path / "latency-gpu-check.json").read_text())
    assert {(r["engine"], r["mode"]) for r in result["rows"]} == {("torch", "off"), ("torch", "adapter")}
    assert all(r["total_ms"] > 0 and r["denoise"] > 0 for r in result["rows"])
    assert set(result["steps_s"]) == {"model", "database", "latency"}
    page = (tmp_path / "latency-gpu.md").read_text()
    assert "| torch | adapter |" in page and "(toy scale)" in page
    # a second run reuses the model and database and rewrites the one section
    assert main(["bench", "gpu-check", "--toy", "--no-tests", "--device", "cpu", "--n", "2", "--db-rows", "32",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "latency-gpu.md").read_text().count("<!-- gpu-check -->") == 1
