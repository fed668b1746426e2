"""The feature-store side: gathering k SD-sized H-features from a memory-mapped file, the
store's size at paper scale, and what shrinking it (int8, PCA) does to a model's output."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

SD_H_SHAPE = (1280, 8, 8)

PAPER_N = 630_000



def gather_timing(work: Path, rows: int, k: int, repeats: int = 200) -> dict:
    """p50 time to gather k SD-sized H-features from a memory-mapped fp16 store, with the page
    cache dropped for the file before each gather (cold: a disk read) and after reading it (warm)."""
    from imageragturbo.retrieval.disk import gather_rows

    path = work / "h_store.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, *SD_H_SHAPE))
    rng = np.random.default_rng(0)
    for lo in range(0, rows, 256):
        hi = min(rows, lo + 256)
        array[lo:hi] = rng.standard_normal((hi - lo, *SD_H_SHAPE), dtype=np.float32).astype(np.float16)
    array.flush()
    del array
    os.sync()
    store = np.load(path, mmap_mode="r", allow_pickle=False)
    fd = os.open(path, os.O_RDONLY)
    cold, warm = [], []
    try:
        for _ in range(repeats):
            ids = rng.choice(rows, size=(1, k), replace=False)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter_ns()
            gather_rows(store, ids)
            cold.append((time.perf_counter_ns() - start) / 1e6)
            start = time.perf_counter_ns()
            out = gather_rows(store, ids)
            warm.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        os.close(fd)
    row_bytes = int(np.prod(SD_H_SHAPE)) * 2
    path.unlink()
    return {
        "k": k,
        "rows_in_file": rows,
        "row_shape": list(SD_H_SHAPE),
        "row_bytes": row_bytes,
        "gathered_bytes": int(out.nbytes),
        "cold_p50_ms": float(np.median(cold)),
        "cold_p99_ms": float(np.percentile(cold, 99)),
        "warm_p50_ms": float(np.median(warm)),
        "warm_p99_ms": float(np.percentile(warm, 99)),
    }



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



def quantize_int8_per_channel(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h float [N, C, h, w] -> (int8 [N, C, h, w], fp16 scale [N, C]): symmetric, one scale per
    item and channel (absmax over the spatial positions / 127)."""
    h = np.asarray(h, np.float32)
    scale = np.abs(h).max(axis=(2, 3)) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float16)
    q = np.clip(np.round(h / scale.astype(np.float32)[:, :, None, None]), -127, 127).astype(np.int8)
    return q, scale



def dequantize_int8_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, :, None, None]



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
        "int8_per_channel": dequantize_int8_per_channel(*quantize_int8_per_channel(h)),
        f"pca_{c // 4}_of_{c}": pca_channels(h, c // 4),
        f"pca_{c // 4}_of_{c}_int8": dequantize_int8_per_channel(*quantize_int8_per_channel(pca_channels(h, c // 4))),
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

