import json

import numpy as np

from imageragturbo.cli import main
from imageragturbo.benchmarks.retrieval.data import exact_topk
from imageragturbo.benchmarks.retrieval.store import pca_channels, store_sizes

FIELDS = ("searcher", "build_s", "p50_ms", "p99_ms", "recall_at_10", "peak_rss_gb", "index_bytes")


def test_bench_retrieval_small_run_writes_every_field(tmp_path, tiny_model_dir):
    out = tmp_path / "bench.json"
    code = main(["bench", "retrieval", "--n", "2000", "--dim", "32", "--queries", "60", "--h-rows", "16",
                 "--model", str(tiny_model_dir), "--effect-pairs", "16", "--effect-prompts", "4",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "r.md")])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2000 and result["dim"] == 32 and result["searcher"] == "scann"
    for entry in [result, *result["peers"]]:
        for field in FIELDS:
            assert field in entry, field
        assert 0 <= entry["recall_at_10"] <= 1 and entry["p50_ms"] <= entry["p99_ms"]
        assert entry["index_bytes"] > 0 and entry["peak_rss_gb"] > 0 and entry["build_s"] >= 0
    # Peers that are not installed are listed as skipped, never silently dropped.
    ran = {p["searcher"] for p in result["peers"]} | {p["searcher"] for p in result["skipped_peers"]}
    assert ran == {"faiss-hnsw", "faiss-ivf", "hnswlib"}
    assert result["recall_at_10"] >= 0.95  # an easy set: some swept setting reaches the target
    assert result["gather"]["k"] == 4 and result["gather"]["warm_p50_ms"] > 0
    assert set(result["quantisation_effect"]["variants"]) == {"int8_per_channel", "pca_16_of_64", "pca_16_of_64_int8"}
    report = (tmp_path / "r.md").read_text()
    assert "| scann |" in report and "## Machine" in report


def test_exact_topk_streams_in_blocks():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1000, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    reference = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    np.testing.assert_array_equal(exact_topk(data, queries, 10, block=128), reference)


def test_store_shrinking_helpers():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((6, 16, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(pca_channels(h, 16), h, atol=1e-4)
    assert np.linalg.norm(pca_channels(h, 4) - h) > 0.1 * np.linalg.norm(h)
    sizes = store_sizes()
    assert sizes["fp16_bytes"] == 630_000 * 1280 * 64 * 2
    assert sizes["int8_per_channel_bytes"] < 0.52 * sizes["fp16_bytes"]


def test_bench_retrieval_runs_milvus_beside_scann_and_times_the_int8_store(tmp_path):
    import pytest

    pytest.importorskip("milvus_lite")
    out = tmp_path / "bench.json"
    code = main(["bench", "retrieval", "--n", "1500", "--dim", "16", "--queries", "40", "--h-rows", "12",
                 "--peers", "milvus", "--effect-pairs", "0", "--hnsw-ef-construction", "64",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "r.md")])
    assert code == 0
    result = json.loads(out.read_text())
    (milvus,) = result["peers"]
    assert milvus["searcher"] == "milvus" and milvus["params"]["server"] == "milvus-lite"
    assert milvus["recall_at_10"] >= 0.95 and 0 < milvus["p50_ms"] <= milvus["p99_ms"]
    assert {s["ef"] for s in milvus["sweep"]} == {16, 24, 32, 48, 64, 96, 128}
    g = result["gather"]
    assert g["rows_in_file"] == 12 and g["cold_p50_ms"] > 0
    i8 = g["int8"]
    assert i8["gathered_bytes"] == 4 * 1280 * 64 * 4  # dequantised to float32
    assert i8["file_bytes"] > 12 * (1280 * 64 + 1280 * 2) and i8["warm_up"]["fits"] is True
    assert 0 < i8["warm_p50_ms"] <= i8["warm_p99_ms"] and 0 < i8["cold_p50_ms"] <= i8["cold_p99_ms"]
    assert not list((tmp_path / "work").glob("h_*.npy"))  # the store files are deleted
    report = (tmp_path / "r.md").read_text()
    assert "| milvus |" in report and "from an int8 store of 12 rows" in report


def test_milvus_peer_times_fewer_queries_over_the_ef_values_asked(tmp_path):
    import pytest

    pytest.importorskip("milvus_lite")
    out = tmp_path / "bench.json"
    code = main(["bench", "retrieval", "--n", "1500", "--dim", "16", "--queries", "60", "--parts", "searchers",
                 "--peers", "milvus", "--milvus-queries", "10", "--milvus-ef", "32,64", "--hnsw-ef-construction", "64",
                 "--work-dir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "r.md")])
    assert code == 0
    result = json.loads(out.read_text())
    (milvus,) = result["peers"]
    assert milvus["queries"] == 10 and [s["ef"] for s in milvus["sweep"]] == [32, 64]
    assert result["queries"] == 60  # ScaNN still times them all
    assert "milvus: the first 10" in (tmp_path / "r.md").read_text()


def test_the_milvus_server_peer_without_a_server_is_skipped_naming_why(tmp_path):
    import pytest

    pytest.importorskip("pymilvus")
    out = tmp_path / "bench.json"
    assert main(["bench", "retrieval", "--n", "300", "--dim", "8", "--queries", "5", "--parts", "searchers",
                 "--peers", "milvus-server", "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["peers"] == []
    assert result["skipped_peers"] == [{"searcher": "milvus-server", "reason": "no Milvus server given (--milvus-uri http://HOST:19530)"}]


def test_bad_milvus_options_are_refused_before_anything_runs(tmp_path, capsys):
    for flags, message in ((["--milvus-ef", "32,x"], "comma-separated integers"), (["--milvus-ef", "0"], ">= 1"),
                           (["--milvus-queries", "0"], "--milvus-queries must be >= 1")):
        code = main(["bench", "retrieval", "--n", "1500", "--dim", "16", "--queries", "5", "--peers", "milvus", *flags,
                     "--work-dir", str(tmp_path / "work"), "--json", str(tmp_path / "b.json")])
        assert code != 0 and message in capsys.readouterr().err
        assert not (tmp_path / "work").exists()


def test_a_store_that_does_not_fit_on_the_disk_is_skipped_naming_why(tmp_path, monkeypatch):
    from imageragturbo.benchmarks.retrieval import store

    monkeypatch.setattr(store, "DISK_MARGIN", 1 << 62)
    g = store.gather_timing(tmp_path, rows=8, k=4, repeats=2)
    assert "GiB free in" in g["float16_skipped"] and "GiB free in" in g["int8"]["skipped"]
    assert "cold_p50_ms" not in g and not list(tmp_path.iterdir())


def test_a_rerun_in_the_same_work_dir_reuses_results_and_says_when_they_were_measured(tmp_path):
    args = ["bench", "retrieval", "--n", "1500", "--dim", "16", "--queries", "40", "--parts", "searchers",
            "--peers", "", "--work-dir", str(tmp_path / "work"), "--markdown", str(tmp_path / "r.md")]
    assert main([*args, "--json", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["reused"] == {}
    assert "reused from the work folder" not in (tmp_path / "r.md").read_text()
    assert main([*args, "--json", str(tmp_path / "second.json")]) == 0
    second = json.loads((tmp_path / "second.json").read_text())
    assert set(second["reused"]) == {"scann"} and second["reused"]["scann"].endswith("UTC")
    assert second["p50_ms"] == first["p50_ms"] and second["sweep"] == first["sweep"]
    assert f"scann (finished {second['reused']['scann']})" in (tmp_path / "r.md").read_text()
