"""`imageragturbo bench service` against a live server (small n: the numbers themselves are
measured by the bench run recorded in results/service.md, not here)."""

import json
import os

import torch
from serving import ServerThread

from imageragturbo.cli import main
from imageragturbo.service import ServiceSettings, create_app


def test_bench_service_cli_against_a_running_server(tiny_pipe, tmp_path, capsys):
    settings = ServiceSettings(max_batch=8, batch_wait_ms=5)
    with ServerThread(create_app(tiny_pipe, settings, model_name="tiny")) as server:
        out, page = tmp_path / "bench.json", tmp_path / "service.md"
        argv = ["bench", "service", "--url", server.url, "--label", "tiny-test", "--concurrency", "1,4",
                "--n", "12", "--warmup", "2", "--mode", "off", "--json", str(out), "--md", str(page)]
        assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-test" and result["request"] == {"steps": 1, "mode": "off"}
    assert [level["concurrency"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        assert level["ok"] == 12 and level["errors"] == {}
        assert 0 < level["pipeline_p50_ms"] < level["p50_ms"] <= level["p99_ms"]
        assert level["throughput_rps"] > 0 and level["mean_batch_size"] >= 1
    assert result["levels"][0]["mean_batch_size"] == 1.0  # one client: never batched
    assert result["overhead_p50_ms"] == round(result["levels"][0]["p50_ms"] - result["levels"][0]["pipeline_p50_ms"], 3)
    assert result["overhead_per_request_p50_ms"] == result["levels"][0]["overhead_p50_ms"] > 0
    text = page.read_text()
    assert "<!-- bench:tiny-test -->" in text and "| 4 | 12 | 12 | 0 |" in text and "Server overhead at concurrency 1" in text
    assert "c=4:" in capsys.readouterr().out


class _FakeServer:
    """What bench.start_server returns, for a server that is in fact a ServerThread."""

    pid = os.getpid()

    def send_signal(self, signum):
        pass

    def wait(self, timeout=None):
        return 0

    def poll(self):
        return None


def test_bench_service_passes_engine_and_threads_to_the_server_it_starts(bare_pipe, tmp_path, monkeypatch, capsys):
    from imageragturbo.benchmarks import service as bench

    started = []
    with ServerThread(create_app(bare_pipe, ServiceSettings(), model_name="tiny")) as server:

        def start_server(model, indexes, extra_env, log_path, serve_args=()):
            started.append((model, list(serve_args)))
            return _FakeServer(), server.url

        monkeypatch.setattr(bench, "start_server", start_server)
        out, page = tmp_path / "bench.json", tmp_path / "service.md"
        argv = ["bench", "service", "--model", str(tmp_path), "--engine", "onnxruntime", "--engine-dir", "/exports/x",
                "--threads", "1", "--concurrency", "1", "--n", "3", "--warmup", "1", "--json", str(out), "--md", str(page)]
        assert main(argv) == 0
    assert started == [(tmp_path, ["--engine", "onnxruntime", "--engine-dir", "/exports/x", "--threads", "1"])]
    result = json.loads(out.read_text())
    assert result["model"] == f"{tmp_path.name} (onnxruntime)"  # a section of its own next to torch's
    assert result["server"]["threads"] == torch.get_num_threads()  # what the (fake) server reports
    assert "nice_client" in result["conditions"] and "other_busy" in result["conditions"]
    text = page.read_text()
    assert "--engine onnxruntime --engine-dir /exports/x --threads 1" in text
    assert "Per-request server overhead at concurrency 1" in text


def test_bench_service_refuses_server_flags_with_url(capsys):
    argv = ["bench", "service", "--url", "http://127.0.0.1:9", "--threads", "2", "--json", "/tmp/never.json"]
    assert main(argv) == 2
    assert "--threads configure the server the bench starts; with --url the server is already running" in capsys.readouterr().err
