"""`imageragturbo bench soak`: the outcome bookkeeping, and one short soak of a real `serve`
subprocess on the tiny model (small --requests: the numbers themselves are measured by the run
recorded in results/soak.md, not here)."""

import json

import pytest

from imageragturbo.benchmarks.soak import SigtermResult, SoakResult
from imageragturbo.benchmarks.soak_clients import CLIENT_LEFT, KINDS, SCHEDULE, SENDERS, SERVER_CLOSED, kind_of
from imageragturbo.benchmarks.soak_report import render_markdown
from imageragturbo.cli import main


def test_the_schedule_sends_every_kind_and_mostly_normal_requests():
    assert set(SCHEDULE) == set(KINDS) == set(SENDERS)
    assert SCHEDULE.count("normal") == 12 and all(SCHEDULE.count(k) == 1 for k in KINDS if k != "normal")
    assert [kind_of(i) for i in range(20)] == [kind_of(i + 40) for i in range(20)]


def test_outcomes_are_normal_on_purpose_or_unexpected():
    assert KINDS["normal"].classify("200") == "normal"
    assert KINDS["normal"].classify("503") == "unexpected"
    assert KINDS["normal"].classify(SERVER_CLOSED) == "unexpected"
    assert KINDS["malformed_json"].classify("422") == "on purpose"
    assert KINDS["malformed_json"].classify("500") == "unexpected"
    assert KINDS["oversize_body"].classify("413") == "on purpose"
    assert KINDS["unknown_database"].classify("404") == "on purpose"
    assert KINDS["disconnect_waiting"].classify(CLIENT_LEFT) == "on purpose"
    # a slow client: answered (the server waited) or cut off by a read timeout, both fine
    assert [KINDS["slow_headers"].classify(o) for o in ("200", "408", SERVER_CLOSED, "500")] == [
        "normal", "on purpose", "on purpose", "unexpected"]


def _result(**outcomes) -> SoakResult:
    result = SoakResult(model="m", requests=sum(sum(c.values()) for c in outcomes.values()), concurrency=2,
                        machine={"cpu": "cpu", "cores": 2, "load_avg_at_start": [1.0, 1.0, 1.0]}, server={},
                        settings={"max_batch": 8}, outcomes=outcomes)
    result.sigterm = SigtermResult(in_flight=4, outcomes={"200": 3, SERVER_CLOSED: 1}, answered_after_signal=2, lost=1,
                                   refused_new_after_s=0.05, exit_code=-15, exit_s=0.4)
    result.rss_checkpoints = [{"requests": 10, "rss_bytes": 100 * 2**20}, {"requests": 40, "rss_bytes": 101 * 2**20}]
    result.rss_growth_pct = 1.0
    return result


def test_by_class_adds_up_and_unexpected_includes_the_sigterm():
    result = _result(normal={"200": 20, "500": 1}, malformed_json={"422": 2}, slow_headers={"200": 1, "408": 1})
    table = result.by_class()
    assert table["200"] == {"normal": 21, "on purpose": 0, "unexpected": 0}
    assert table["500"] == {"normal": 0, "on purpose": 0, "unexpected": 1}
    assert table["408"]["on purpose"] == 1 and table["422"]["on purpose"] == 2
    assert sum(sum(row.values()) for row in table.values()) == result.requests == 25
    assert result.unexpected() == {"500": 1, SERVER_CLOSED: 1}
    text = render_markdown(result)
    assert "| **all** | 21 | 3 | 1 | 25 |" in text
    assert "| requests lost at SIGTERM (written, never answered) | 1 | 0: **missed** |" in text
    assert "| RSS growth between them | +1.00% |" in text and "server RSS at 40 requests (MiB) | 101.0" in text


@pytest.mark.slow
def test_bench_soak_against_a_real_server(tiny_model_dir, tmp_path, capsys):
    out, page = tmp_path / "soak.json", tmp_path / "soak.md"
    argv = ["bench", "soak", "--model", str(tiny_model_dir), "--requests", "100", "--concurrency", "3",
            "--json", str(out), "--out", str(page)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    outcomes = result["outcomes"]
    # every request counted once, in the share the schedule gives its kind
    assert sum(sum(counts.values()) for counts in outcomes.values()) == 100
    assert {kind: sum(counts.values()) for kind, counts in outcomes.items()} == {
        kind: 5 * SCHEDULE.count(kind) for kind in KINDS}
    by_class = result["by_class"]
    assert sum(sum(row.values()) for row in by_class.values()) == 100
    # normal requests all answered, faults answered as they were meant to be: nothing unexpected
    assert outcomes["normal"] == {"200": 60} and result["normal_ok"] == 60
    assert result["unexpected"] == {} and not any(row["unexpected"] for row in by_class.values())
    assert outcomes["oversize_body"] == {"413": 5} and outcomes["unknown_database"] == {"404": 5}
    assert outcomes["malformed_json"] == outcomes["wrong_types"] == outcomes["oversize_prompt"] == {"422": 5}
    assert outcomes["disconnect_mid_body"] == outcomes["disconnect_waiting"] == {CLIENT_LEFT: 5}
    assert 0 < result["normal_p50_ms"] <= result["normal_p99_ms"]
    # the server counted every request that reached the app: all but, at most, the half-sent bodies
    # (their connection may end before the app sees them) and slow clients cut off by a read timeout
    slow_cut = sum(n for outcome, n in outcomes["slow_headers"].items() if outcome != "200")
    counted = sum(result["server_counts"].values())
    assert 100 - slow_cut - 5 <= counted <= 100 - slow_cut, result["server_counts"]
    assert result["server_counts"]["413"] == 5 and result["server_counts"]["404"] == 5
    assert result["server_counts"]["422"] >= 15
    # RSS at a quarter and at the end; SIGTERM with 2 x concurrency requests in flight, none lost
    assert [c["requests"] for c in result["rss_checkpoints"]] == [25, 100]
    assert all(c["rss_bytes"] > 0 for c in result["rss_checkpoints"]) and result["rss_growth_pct"] is not None
    sigterm = result["sigterm"]
    assert sigterm["in_flight"] == 6 and sigterm["lost"] == 0 and sigterm["outcomes"] == {"200": 6}
    assert sigterm["exit_code"] in (0, -15) and sigterm["refused_new_after_s"] is not None
    assert result["targets"]["no_unexpected_5xx"] and result["targets"]["none_lost_at_sigterm"]
    text = page.read_text()
    assert text.startswith("# Soak") and f"<!-- bench:soak:{tiny_model_dir.name} -->" in text
    assert "| **all** | " in text and "imageragturbo bench soak --requests 100 --concurrency 3" in text
    assert "| requests lost at SIGTERM (written, never answered) | 0 | 0: met |" in capsys.readouterr().out
