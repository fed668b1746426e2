"""The feature-store side: gathering k SD-sized H-features from a memory-mapped file, the
store's size at paper scale, and what shrinking it (int8, PCA) does to a model's output."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

SD_H_SHAPE = (1280, 8, 8)

PAPER_N = 630_000


FILL_BLOCK_ROWS = 256
"""Rows of random bytes the gather files are filled with, block after block (random content
costs the same to read as real features; generating 50 GB of it would take longer than
writing it)."""
DISK_MARGIN = 2 << 30
"""Free disk a store file must leave; a larger one is not written (and its timing skipped)."""


def _write_random_npy(path: Path, dtype, shape: tuple[int, ...], rng) -> None:
    """An ``.npy`` of ``shape`` filled with random values (bytes for int8, [0, 1) for a float
    dtype), block after block with each block's first value made distinct, written
    sequentially (no page-cache round trip through a memory map), then fsynced."""
    dtype = np.dtype(dtype)
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()  # header + a sparse file
    offset = np.load(path, mmap_mode="r", allow_pickle=False).offset
    row_values = int(np.prod(shape[1:]))
    if np.issubdtype(dtype, np.floating):
        block = rng.random(FILL_BLOCK_ROWS * row_values, dtype=np.float32).astype(dtype)
    else:
        block = np.frombuffer(rng.bytes(FILL_BLOCK_ROWS * row_values * dtype.itemsize), dtype).copy()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        for lo in range(0, shape[0], FILL_BLOCK_ROWS):
            n = min(FILL_BLOCK_ROWS, shape[0] - lo)
            block[0] = (lo // FILL_BLOCK_ROWS) % 127 / (127 if np.issubdtype(dtype, np.floating) else 1)
            handle.write(block[: n * row_values].data)
        handle.flush()
        os.fsync(handle.fileno())


def _time_gathers(files: list[Path], gather, rows: int, k: int, repeats: int, rng) -> dict:
    """p50/p99 of ``gather(ids)`` with ``files``' page cache dropped before each (cold) and
    right after it, the same ids again (warm)."""
    fds = [os.open(f, os.O_RDONLY) for f in files]
    cold, warm = [], []
    try:
        for _ in range(repeats):
            ids = rng.choice(rows, size=(1, k), replace=False)
            for fd in fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter_ns()
            gather(ids)
            cold.append((time.perf_counter_ns() - start) / 1e6)
            start = time.perf_counter_ns()
            out = gather(ids)
            warm.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        for fd in fds:
            os.close(fd)
    return {
        "gathered_bytes": int(out.nbytes),
        "cold_p50_ms": float(np.median(cold)),
        "cold_p99_ms": float(np.percentile(cold, 99)),
        "warm_p50_ms": float(np.median(warm)),
        "warm_p99_ms": float(np.percentile(warm, 99)),
    }


def _fits_on_disk(folder: Path, nbytes: int) -> str | None:
    free = shutil.disk_usage(folder).free
    if nbytes + DISK_MARGIN > free:
        return f"needs {nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free in {folder}"
    return None


def gather_timing(work: Path, rows: int, k: int, repeats: int = 200) -> dict:
    """Gathering k SD-sized H-features from memory-mapped stores of ``rows`` rows: float16 as
    built (the top-level fields), and int8 codes + float16 scales dequantised to float32 as an
    int8 database serves them (``int8``), each cold (the files' page cache dropped before every
    gather: a disk read) and warm. A store that would not fit on the disk is skipped, naming
    why; ``int8.warm_up`` says whether MemmapFeatureStore.warm_up would read it at start."""
    from imageragturbo.retrieval.disk import WARM_MAX_SHARE, gather_rows, memory_available_bytes
    from imageragturbo.retrieval.quantize import dequantize_h

    rng = np.random.default_rng(0)
    row_bytes = int(np.prod(SD_H_SHAPE)) * 2
    result = {"k": k, "rows_in_file": rows, "row_shape": list(SD_H_SHAPE), "row_bytes": row_bytes}
    path = work / "h_store.npy"
    skip = _fits_on_disk(work, rows * row_bytes)
    if skip:
        result["float16_skipped"] = skip
    else:
        started = time.perf_counter()
        _write_random_npy(path, np.float16, (rows, *SD_H_SHAPE), rng)
        store = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        result["float16_write_s"] = time.perf_counter() - started
        result.update(_time_gathers([path], lambda ids: gather_rows(store, ids), rows, k, repeats, rng))
        del store
        path.unlink()

    codes, scales = work / "h_retr_int8.npy", work / "h_scale.npy"
    int8_bytes = rows * (int(np.prod(SD_H_SHAPE)) + SD_H_SHAPE[0] * 2)
    skip = _fits_on_disk(work, int8_bytes)
    if skip:
        result["int8"] = {"skipped": skip}
        return result
    started = time.perf_counter()
    _write_random_npy(codes, np.int8, (rows, *SD_H_SHAPE), rng)
    _write_random_npy(scales, np.float16, (rows, SD_H_SHAPE[0]), rng)
    write_s = time.perf_counter() - started
    maps = {name: np.load(f, mmap_mode="r", allow_pickle=False).view(np.ndarray) for name, f in (("q", codes), ("s", scales))}
    file_bytes = codes.stat().st_size + scales.stat().st_size
    available = memory_available_bytes()
    try:
        timing = _time_gathers(
            [codes, scales], lambda ids: dequantize_h(gather_rows(maps["q"], ids), gather_rows(maps["s"], ids)),
            rows, k, repeats, rng)
    finally:
        maps.clear()  # unmap before deleting
        codes.unlink()
        scales.unlink()
    result["int8"] = {
        "row_bytes": int(np.prod(SD_H_SHAPE)) + SD_H_SHAPE[0] * 2,
        "file_bytes": file_bytes,
        "write_s": write_s,
        **timing,
        "warm_up": {
            "memory_available_bytes": available,
            "fits": None if available is None else bool(file_bytes <= available * WARM_MAX_SHARE),
        },
    }
    return result


def store_sizes(n: int = PAPER_N, shape: tuple[int, ...] = SD_H_SHAPE) -> dict:
    """Bytes for n H-features at fp16, int8 per channel (+ an fp16 scale per item and channel),
    and with channels cut to a quarter by PCA (+ the shared C x C/4 basis)."""
    c, hw = shape[0], int(np.prod(shape[1:]))
    fp16 = n * c * hw * 2
    int8 = n * (c * hw + c * 2)
    pca = n * (c // 4) * hw * 2 + c * (c // 4) * 4
    pca_int8 = n * ((c // 4) * hw + (c // 4) * 2) + c * (c // 4) * 4
    return {
        "n": n,
        "shape": list(shape),
        "fp16_bytes": fp16,
        "int8_per_channel_bytes": int8,
        "pca_quarter_fp16_bytes": pca,
        "pca_quarter_int8_bytes": pca_int8,
    }


def pca_channels(h: np.ndarray, keep: int) -> np.ndarray:
    """Project every spatial token's C channels onto the top ``keep`` principal directions
    (fitted on these tokens) and back: the reconstruction a C -> keep channel store gives."""
    n, c, hh, ww = h.shape
    tokens = np.asarray(h, np.float32).transpose(0, 2, 3, 1).reshape(-1, c)
    mean = tokens.mean(axis=0)
    _, _, vt = np.linalg.svd(tokens - mean, full_matrices=False)
    basis = vt[:keep]
    recon = (tokens - mean) @ basis.T @ basis + mean
    return recon.reshape(n, hh, ww, c).transpose(0, 3, 1, 2)


def quantisation_effect(model_dir: Path, pairs: int = 64, prompts: int = 16) -> dict:
    """Build ``pairs`` database rows from the shapes world with the model in ``model_dir``, shrink
    h_retr (int8 per channel; PCA to C/4 channels; both), and compare the outputs of
    ``inject`` (w = 0.8) and ``adapter`` (when the model has one) for ``prompts`` test-held prompts."""
    import torch

    from imageragturbo.retrieval import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
    from imageragturbo.retrieval.quantize import dequantize_h, quantize_h
    from imageragturbo.retrieval.build import model_pixel_size
    from imageragturbo.retrieval.pairs import WorldPairs
    from imageragturbo.model import RagTurboPipeline, load_model
    from imageragturbo.world.splits import eval_prompts

    components = load_model(model_dir)
    pipe = RagTurboPipeline(components)
    batch = WorldPairs(pairs).read(0, pairs, model_pixel_size(pipe))
    z0 = pipe.encode_images(batch.images)
    e, h = pipe.encode_database_rows(z0, batch.captions)
    e, h = e.numpy(), h.numpy().astype(np.float16)
    c = h.shape[1]
    variants = {
        "fp16": h,
        "int8_per_channel": dequantize_h(*quantize_h(h)),
        f"pca_{c // 4}_of_{c}": pca_channels(h, c // 4),
        f"pca_{c // 4}_of_{c}_int8": dequantize_h(*quantize_h(pca_channels(h, c // 4))),
    }
    prompt_list = eval_prompts("test-held", prompts)
    texts, seeds = [p for p, _ in prompt_list], [s for _, s in prompt_list]
    modes = ["inject"] + (["adapter"] if "adapter" in pipe.denoisers else [])
    reference, effect = {}, {}
    for name, h_variant in variants.items():
        store = InMemoryFeatureStore(e, np.asarray(h_variant, np.float32), batch.captions, components.model_id)
        run = RagTurboPipeline(components, [RetrievalDatabase("db", ExactSearcher(e), store)])
        h32 = h.astype(np.float32)
        row = {"h_rel_rms_error": float(np.sqrt(np.mean((h_variant - h32) ** 2) / np.mean(h32**2)))}
        for mode in modes:
            with torch.inference_mode():
                result = run(texts, seeds, mode=mode, k=4, inject_w=0.8)
            if name == "fp16":
                reference[mode] = result
                continue
            ref = reference[mode]
            pixel = np.abs(result.images.astype(int) - ref.images.astype(int))
            latent = (result.latents - ref.latents).abs()
            row[mode] = {
                "image_max_abs_diff": int(pixel.max()),
                "image_mean_abs_diff": float(pixel.mean()),
                "latent_max_abs_diff": float(latent.max()),
                "latent_max_abs": float(ref.latents.abs().max()),
            }
        effect[name] = row
    return {
        "model_dir": str(model_dir),
        "model_id": components.model_id,
        "adapter": "adapter" in pipe.denoisers,
        "pairs": pairs,
        "prompts": prompts,
        "h_shape": list(h.shape[1:]),
        "variants": {k: v for k, v in effect.items() if k != "fp16"},
    }

