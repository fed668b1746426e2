"""results/retrieval.md from a result JSON of the benchmark."""

from __future__ import annotations

import numpy as np

from imageragturbo.benchmarks.report import table
from imageragturbo.benchmarks.retrieval.store import SD_H_SHAPE


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"



RUN_COLUMNS = ("build params", "search params", "build", "p50", "p99", "recall@10", "peak RSS", "index on disk")
HIDDEN_PARAMS = ("training_threads", "mode", "num_leaves_to_search")


def _run_cells(r: dict) -> list[str]:
    """One searcher build's cells under RUN_COLUMNS."""
    params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k not in HIDDEN_PARAMS)
    search = ", ".join(f"{k}={v}" for k, v in r["search_params"].items())
    return [params, search, f"{r['build_s']:.0f} s", f"{r['p50_ms']:.3f} ms", f"{r['p99_ms']:.3f} ms",
            f"{r['recall_at_10']:.4f}", f"{r['peak_rss_gb']:.2f} GiB", fmt_bytes(r["index_bytes"])]


def _gather_paragraphs(g: dict) -> list[str]:
    """The gathers: fp16 as built, and int8 codes + scales dequantised to float32 as an int8
    database serves them; or why a store was not measured."""
    out = []
    if "cold_p50_ms" in g:
        out.append(
            f"Gather of k = {g['k']} SD-sized H-features ({'x'.join(map(str, g['row_shape']))} fp16, {g['row_bytes'] / 1024:.0f} KiB each) "
            f"from a memory-mapped file of {g['rows_in_file']} rows: p50 {g['cold_p50_ms']:.3f} ms with the file's page cache "
            f"dropped before each gather (p99 {g['cold_p99_ms']:.3f} ms), {g['warm_p50_ms']:.3f} ms warm (p99 {g['warm_p99_ms']:.3f} ms).")
    if g.get("float16_skipped"):
        out.append(f"The fp16 store of {g['rows_in_file']:,} rows was not measured: {g['float16_skipped']}.")
    i8 = g.get("int8")
    if i8 and "skipped" in i8:
        out.append(f"The int8 store of {g['rows_in_file']:,} rows was not measured: {i8['skipped']}.")
    elif i8:
        fits = i8["warm_up"]["fits"]
        warm_up = ("" if fits is None else " A page-cache warm-up at start (MemmapFeatureStore.warm_up) would "
                   + ("read it: it fits" if fits else "skip it: it does not fit")
                   + f" in {i8['warm_up']['memory_available_bytes'] / 2**30:.1f} GiB available.")
        out.append(
            f"Gather of k = {g['k']} rows from an int8 store of {g['rows_in_file']:,} rows ({fmt_bytes(i8['file_bytes'])} on disk; "
            f"{i8['row_bytes'] / 1024:.1f} KiB a row: int8 codes + fp16 scales per channel, dequantised to float32): "
            f"cold p50 {i8['cold_p50_ms']:.3f} ms (p99 {i8['cold_p99_ms']:.3f} ms), warm p50 {i8['warm_p50_ms']:.3f} ms "
            f"(p99 {i8['warm_p99_ms']:.3f} ms); writing the files took {i8['write_s']:.0f} s.{warm_up}")
    return out


def markdown_report(result: dict, variants: list[dict] = ()) -> str:
    """results/retrieval.md from a result JSON (plus other ScaNN builds on the same data)."""
    rows = [result, *result["peers"]]
    lines = [
        "# Retrieval benchmark",
        "",
        *([] if result.get("complete", True) else ["**Partial run**: the benchmark had not finished all searchers when this was written.", ""]),
        f"Produced by `{result.get('command') or 'imageragturbo bench retrieval'}` "
        "(`imageragturbo/benchmarks/retrieval/`); numbers below are copied from its JSON.",
        "",
        f"n = {result['n']:,} synthetic clustered L2-normalised embeddings, d = {result['dim']}, "
        f"{result['queries']} single queries (batch 1), recall@{result['k']} against exact search, one thread "
        "for build and search, each searcher in its own process. Each row is the fastest search setting "
        f"with recall@10 >= {result['target_recall']} (the full sweep is in the JSON).",
        "",
        *table(["searcher", *RUN_COLUMNS], ([r["searcher"], *_run_cells(r)] for r in rows)),
    ]
    lines += [
        "",
        f"Exact search (numpy, 1 BLAS thread): {result['exact_numpy_p50_ms']:.1f} ms per query."
        if result["exact_numpy_p50_ms"] is not None else "Exact search: not timed in this run (data reused).",
        "Peak RSS includes the float32 data loaded for the build "
        f"({result['data_rss_gb']:.2f} GiB in the ScaNN process before building).",
    ]
    fewer = [r for r in result["peers"] if r.get("queries", result["queries"]) < result["queries"]]
    if fewer:
        lines.append("Timed on fewer queries (their recall and percentiles come from these alone): "
                     + "; ".join(f"{r['searcher']}: the first {r['queries']}" for r in fewer) + ".")
    if result.get("reused"):
        lines.append("Measured by an earlier invocation with the same settings and reused from the work folder "
                     "(the benchmark resumes where it stopped): "
                     + "; ".join(f"{name} (finished {when})" for name, when in result["reused"].items()) + ".")
    if any(r["searcher"] == "milvus-server" for r in result["peers"]):
        lines.append("milvus-server: the index lives in the server's own storage, so its index on disk reads 0 "
                     "and its peak RSS is the client process's alone (the server's memory is not counted).")
    if result["skipped_peers"]:
        lines.append("Skipped: " + "; ".join(f"{s['searcher']} ({s['reason']})" for s in result["skipped_peers"]) + ".")
    verdict = result["no_slower_than_fastest_peer"]
    measured = [r["searcher"] for r in result["peers"]]
    missing = [p for p in result.get("requested_peers", []) if p not in measured and p not in {s["searcher"] for s in result["skipped_peers"]}]
    lines += [
        "",
        "## Speed at equal recall",
        "",
        "Fastest single-query p50 of each searcher's sweep that reaches the recall:",
        "",
        "| searcher | recall@10 >= 0.95 | recall@10 >= 0.99 |",
        "| --- | --- | --- |",
    ]
    for r in rows:
        cells = []
        for target in (0.95, 0.99):
            good = [s for s in r["sweep"] if s["recall_at_10"] >= target]
            best = min(good, key=lambda s: s["p50_ms"]) if good else None
            setting = ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("p50_ms", "p99_ms", "mean_ms", "recall_at_10")) if best else ""
            cells.append(f"{best['p50_ms']:.3f} ms ({setting}; recall {best['recall_at_10']:.4f})" if best else "not reached")
        lines.append(f"| {r['searcher']} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "## Verdict",
        "",
        f"- Target p50 <= 2.0 ms at recall@10 >= 0.95: ScaNN p50 {result['p50_ms']:.3f} ms at recall "
        f"{result['recall_at_10']:.4f} -> {'met' if result['p50_ms'] <= 2.0 and result['recall_at_10'] >= 0.95 else 'NOT met'}.",
        f"- No slower than the fastest peer at that recall ({_ms(result['fastest_peer_p50_ms'])}): "
        + ("n/a (no peer ran)" if verdict is None else ("yes" if verdict else "no"))
        + (f", among the peers measured ({', '.join(measured)}); {', '.join(missing)} did not finish in this run, so this is not yet the comparison the target asks for" if missing else ""),
        "",
        "## ScaNN sweep (search-time knobs)",
        "",
        "| leaves searched | reorder | p50 | p99 | recall@10 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in result["sweep"]:
        lines.append(f"| {s['leaves_to_search']} | {s['reorder']} | {s['p50_ms']:.3f} ms | {s['p99_ms']:.3f} ms | {s['recall_at_10']:.4f} |")
    if variants:
        lines += [
            "",
            "## Other ScaNN builds on the same data (separate runs)",
            "",
            *table(["build params", "best search params", *RUN_COLUMNS[2:], "command"],
                   ([*_run_cells(v), f"`{v.get('command')}`"] for v in variants)),
        ]
    g, size = result["gather"], result["store_size"]
    if g is None:
        lines += ["", "(The H-feature store measurements had not run yet when this report was written.)"]
        g = {"k": 4, "row_shape": list(SD_H_SHAPE), "row_bytes": int(np.prod(SD_H_SHAPE)) * 2}
    lines += [
        "",
        "## H-feature store",
        "",
        *([f"Measured by `{result['store_command']}`.", ""] if result.get("store_command") else []),
        *(line for paragraph in _gather_paragraphs(g) for line in (paragraph, "")),
        f"Store size for {size['n']:,} SD-sized H-features:",
        "",
        "| layout | size |",
        "| --- | --- |",
        f"| fp16 (as built) | {fmt_bytes(size['fp16_bytes'])} |",
        f"| int8, one fp16 scale per item and channel | {fmt_bytes(size['int8_per_channel_bytes'])} |",
        f"| PCA to C/4 channels, fp16 | {fmt_bytes(size['pca_quarter_fp16_bytes'])} |",
        f"| PCA to C/4 channels, int8 | {fmt_bytes(size['pca_quarter_int8_bytes'])} |",
    ]
    effect = result.get("quantisation_effect")
    if effect:
        lines += [
            "",
            f"Effect on output, measured on `{effect['model_dir']}` (H-space {effect['h_shape']}, "
            f"{'trained' if effect['adapter'] else 'no'} adapter, {effect['pairs']} database pairs, {effect['prompts']} test-held prompts, "
            "same seeds; differences against the fp16 store):",
            "",
            "| store | H rel. RMS error | inject: image max / mean abs diff (0-255) | adapter: image max / mean abs diff |",
            "| --- | --- | --- | --- |",
        ]
        for name, row in effect["variants"].items():
            adapter = row.get("adapter")
            adapter_cell = f"{adapter['image_max_abs_diff']} / {adapter['image_mean_abs_diff']:.3f}" if adapter else "n/a"
            lines.append(
                f"| {name} | {row['h_rel_rms_error']:.4f} | {row['inject']['image_max_abs_diff']} / {row['inject']['image_mean_abs_diff']:.3f} "
                f"| {adapter_cell} |"
            )
    m = result["machine"]
    lines += [
        "",
        "## Machine",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}, {m['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + f". Load average at start {tuple(round(x, 2) for x in m['loadavg_start'])}, at end "
        f"{tuple(round(x, 2) for x in m['loadavg_end'])}"
        + (f"; the benchmark ran at nice {m['nice']}" if "nice" in m else "")
        + ": the cores were shared with other jobs (training runs), so latencies are upper bounds of what an "
        "idle core gives, and the p99 column mostly measures preemption by those jobs.",
        "",
    ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "no peer" if value is None else f"{value:.3f} ms"
