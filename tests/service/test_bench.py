"""`imageragturbo bench service` against a live server (small n: the numbers themselves are
measured by the bench run recorded in results/service.md, not here)."""

import json

from serving import ServerThread

from imageragturbo.cli import main
from imageragturbo.service import ServiceSettings, create_app
from imageragturbo.service.bench import parse_server_timing, update_markdown


def test_parse_server_timing():
    header = "queue_wait;dur=0.25, text_encode;dur=2.5, retrieve;dur=1e-3, bogus, denoise;dur=31.0"
    assert parse_server_timing(header) == {"queue_wait": 0.25, "text_encode": 2.5, "retrieve": 0.001, "denoise": 31.0}


def test_update_markdown_replaces_only_its_own_section(tmp_path):
    page = tmp_path / "service.md"
    update_markdown(page, "tiny", "### tiny\nold\n", "# Title\n")
    update_markdown(page, "shapes-v1", "### shapes-v1\nnumbers\n", "# Title\n")
    update_markdown(page, "tiny", "### tiny\nnew\n", "# Title\n")
    text = page.read_text()
    assert text.startswith("# Title\n") and "old" not in text
    assert text.index("### tiny\nnew") < text.index("### shapes-v1\nnumbers")


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
    text = page.read_text()
    assert "<!-- bench:tiny-test -->" in text and "| 4 | 12 | 12 | 0 |" in text and "Server overhead at concurrency 1" in text
    assert "c=4:" in capsys.readouterr().out
