"""Building a database folder: pairs -> text embeddings, latents, H-features, searcher, manifest.

Crash safety, step by step:

1. Everything is written into a sibling folder ``.<name>.partial`` that has no manifest until
   the very end, so it never loads as an index (:func:`imageragturbo.retrieval.disk.read_manifest`
   refuses a folder without ``manifest.json``).
2. Rows are computed in chunks; each chunk is one ``.npz`` written under a temporary name,
   fsynced and renamed, so a chunk on disk is always whole. ``build-state.json`` records what
   is being built (model id, source, chunk size); ``--resume`` continues only a build of the
   same thing and skips the chunks already there.
3. The chunks are concatenated into memory-mappable ``.npy`` arrays, the searcher is built and
   serialised, every file is fsynced and checksummed into ``manifest.json``.
4. The folder is renamed into place (an atomic rename within one filesystem) and the parent
   directory fsynced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imageragturbo.errors import ImageRagTurboError
from imageragturbo.retrieval.disk import (
    FORMAT,
    FORMAT_VERSION,
    FORMAT_VERSION_INT8,
    H_SCALE,
    MANIFEST,
    SEARCHER_DIR,
    fsync_path,
    sha256_file,
    write_text_durably,
)
from imageragturbo.retrieval.protocols import RowEncoder
from imageragturbo.retrieval.quantize import quantize_h
from imageragturbo.retrieval.searchers import ScannSpec, build_searcher, resolve_kind

logger = logging.getLogger(__name__)

STATE = "build-state.json"
CHUNKS = "chunks"
DTYPES = {"text_emb": np.float32, "z0": np.float16, "h_retr": np.float16}
"""The arrays of a database with float16 H-features; an int8 one stores h_retr as int8 plus
``h_scale`` (see :func:`array_dtypes`)."""
H_DTYPE_CHOICES = ("auto", "int8", "float16")
INT8_ABOVE_BYTES = 8 << 30
"""``--h-dtype auto`` stores H-features as int8 when their float16 array would exceed this.

Why 8 GiB: serving gathers k H rows per request from the store, and a gather is fast only
from the page cache (a cold 4-row gather of SD-sized rows reads the disk once per row,
results/retrieval.md). A float16 store of up to 8 GiB fits in the memory of any host we serve
from (a third of this project's 24 GiB machine, with room for the model and the OS) and int8
would buy nothing there but a rounding error and a slower warm gather (dequantising k = 4 SD
rows: 0.45 ms p50 against 0.20 ms for float16, results/retrieval.md); above it, halving the store decides whether it stays resident
(the paper's 0.63 M SD rows: 96 GiB float16, 49.6 GiB int8; on a 24 GiB host neither does, and
a cold int8 gather there took 70 ms p50), and the error it
costs (relative RMS 0.0029; the bundled model's images move by at most one grey level,
tests/retrieval/test_int8_store.py) is the size of a batch-invariance difference.
8 GiB is about 52 k SD rows (1280 x 8 x 8); every bundled database (a few MB) stays float16.
The threshold is a constant, not the building host's memory, so that the same command builds
the same database everywhere."""
SCALE_DTYPE = np.float16
"""Scales of an int8 store: float16 (2 bytes per row and channel; 2.5 KiB of an SD row's 82.5)."""


def array_dtypes(h_dtype: str) -> dict[str, type]:
    """The arrays a build writes, and their dtypes, for ``h_dtype`` int8 or float16."""
    if h_dtype == "float16":
        return dict(DTYPES)
    if h_dtype == "int8":
        return {**DTYPES, "h_retr": np.int8, H_SCALE: SCALE_DTYPE}
    raise ValueError(f"h_dtype must be int8 or float16, got {h_dtype!r}")


def resolve_h_dtype(h_dtype: str, count: int, h_shape: tuple[int, ...]) -> str:
    """``auto`` -> int8 when ``count`` float16 rows of ``h_shape`` exceed INT8_ABOVE_BYTES."""
    if h_dtype not in H_DTYPE_CHOICES:
        raise DatabaseBuildError(f"h_dtype must be one of {H_DTYPE_CHOICES}, got {h_dtype!r}")
    if h_dtype != "auto":
        return h_dtype
    return "int8" if count * int(np.prod(h_shape)) * 2 > INT8_ABOVE_BYTES else "float16"


class DatabaseBuildError(ImageRagTurboError, ValueError):
    """A build cannot start or continue; the message says why and what to do."""


@dataclass
class BuildResult:
    path: Path
    count: int
    searcher: dict
    seconds: float
    resumed_chunks: int
    h_dtype: str = "float16"
    """How the H-features were stored (``--h-dtype auto`` resolved)."""


def partial_dir(out: Path) -> Path:
    """The temporary sibling folder a build of ``out`` writes into."""
    return out.parent / f".{out.name}.partial"


def model_pixel_size(encoder: RowEncoder) -> tuple[int, int]:
    """The image size (H, W) whose VAE latent has the UNet's sample size, measured by encoding a
    blank image (VAE down-sampling factors differ between AutoencoderKL and AutoencoderTiny)."""
    probe = 64
    z = encoder.encode_images(np.zeros((1, probe, probe, 3), np.uint8))
    factor = probe // z.shape[-1]
    _, h, w = encoder.latent_shape
    return h * factor, w * factor


def _save_chunk(folder: Path, index: int, arrays: dict[str, np.ndarray]) -> None:
    final = folder / f"chunk-{index:06d}.npz"
    tmp = folder / f"chunk-{index:06d}.tmp.npz"
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_path(folder)


def _load_chunk(folder: Path, index: int) -> dict[str, np.ndarray]:
    with np.load(folder / f"chunk-{index:06d}.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def h_feature_shape(encoder: RowEncoder, source, size: tuple[int, int]) -> tuple[int, ...]:
    """The shape (C, h, w) of one row's H-feature, from encoding the source's first pair."""
    batch = source.read(0, 1, size)
    z0 = encoder.encode_images(batch.images)
    return tuple(encoder.encode_database_rows(z0, batch.captions)[1].shape[1:])


def _compute_chunk(encoder: RowEncoder, source, start: int, stop: int, size: tuple[int, int], batch_size: int,
                   dtypes: dict[str, type] = DTYPES) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*dtypes, "captions", "source_ids")}
    for lo in range(start, stop, batch_size):
        batch = source.read(lo, min(stop, lo + batch_size), size)
        z0 = encoder.encode_images(batch.images)
        e, h_retr = encoder.encode_database_rows(z0, batch.captions)
        parts["text_emb"].append(e.cpu().numpy().astype(dtypes["text_emb"]))
        parts["z0"].append(z0.cpu().numpy().astype(dtypes["z0"]))
        if H_SCALE in dtypes:
            # Quantised from the encoder's float32 output, not from a float16 copy of it.
            try:
                q, scale = quantize_h(h_retr.cpu().numpy(), dtypes[H_SCALE])
            except ValueError as exc:
                raise DatabaseBuildError(f"pairs {lo}..{min(stop, lo + batch_size) - 1}: {exc}") from exc
            parts["h_retr"].append(q)
            parts[H_SCALE].append(scale)
        else:
            parts["h_retr"].append(h_retr.cpu().numpy().astype(dtypes["h_retr"]))
        # Fixed-width unicode arrays, not object arrays: the chunk loads with allow_pickle=False.
        parts["captions"].append(np.asarray(batch.captions, dtype=np.str_))
        parts["source_ids"].append(np.asarray(batch.source_ids, dtype=np.str_))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _start_or_resume(tmp: Path, state: dict, resume: bool) -> int:
    """Prepare ``tmp`` for the build described by ``state``; returns how many chunks exist."""
    chunks = tmp / CHUNKS
    if tmp.exists():
        old_state = None
        if (tmp / STATE).is_file():
            try:
                old_state = json.loads((tmp / STATE).read_text())
            except json.JSONDecodeError:
                old_state = None
        if resume and old_state == state:
            done = 0
            while (chunks / f"chunk-{done:06d}.npz").is_file():
                done += 1
            logger.info("resuming the build in %s: %d chunks already computed", tmp, done)
            return done
        if resume:
            differs = sorted(k for k in state if old_state is None or old_state.get(k) != state[k])
            raise DatabaseBuildError(
                f"cannot resume {tmp}: it holds a build of something else (differs in {differs}); "
                "run without --resume to start over"
            )
        logger.warning("removing the interrupted build %s (pass --resume to continue one)", tmp)
        shutil.rmtree(tmp)
    chunks.mkdir(parents=True)
    write_text_durably(tmp / STATE, json.dumps(state, indent=2, sort_keys=True))
    fsync_path(tmp.parent)
    return 0


def _assemble(tmp: Path, num_chunks: int, count: int, dtypes: dict[str, type] = DTYPES) -> dict[str, dict]:
    """Concatenate the chunks into ``.npy`` arrays + JSON string lists; returns the manifest's
    ``arrays`` entries (file, shape, dtype, sha256)."""
    chunks = tmp / CHUNKS
    first = _load_chunk(chunks, 0)
    outputs = {
        name: np.lib.format.open_memmap(
            tmp / f"{name}.npy", mode="w+", dtype=dtypes[name], shape=(count, *first[name].shape[1:])
        )
        for name in dtypes
    }
    captions: list[str] = []
    source_ids: list[str] = []
    row = 0
    for index in range(num_chunks):
        chunk = first if index == 0 else _load_chunk(chunks, index)
        n = chunk["text_emb"].shape[0]
        for name in dtypes:
            outputs[name][row : row + n] = chunk[name]
        captions.extend(chunk["captions"].tolist())
        source_ids.extend(chunk["source_ids"].tolist())
        row += n
    if row != count:
        raise DatabaseBuildError(f"chunks in {chunks} hold {row} rows, expected {count}; rerun without --resume")
    for array in outputs.values():
        array.flush()
    outputs.clear()  # unmap before hashing and renaming
    entries = {}
    for name in dtypes:
        file = tmp / f"{name}.npy"
        fsync_path(file)
        entries[name] = {
            "file": file.name,
            "shape": [count, *first[name].shape[1:]],
            "dtype": np.dtype(dtypes[name]).name,
            "sha256": sha256_file(file),
        }
    write_text_durably(tmp / "captions.json", json.dumps(captions, ensure_ascii=False))
    write_text_durably(tmp / "source_ids.json", json.dumps(source_ids, ensure_ascii=False))
    return entries


def build_database(
    encoder: RowEncoder,
    source,
    out: str | Path,
    *,
    searcher: str = "auto",
    scann_spec: ScannSpec | None = None,
    searcher_params: dict | None = None,
    h_dtype: str = "auto",
    batch_size: int = 64,
    chunk_size: int = 1024,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Build the database folder ``out`` from ``source`` (see :mod:`imageragturbo.retrieval.pairs`)
    with the model behind ``encoder`` (a :class:`~imageragturbo.retrieval.protocols.RowEncoder`,
    such as :class:`~imageragturbo.model.RagTurboPipeline`).

    ``h_dtype``: ``float16``, ``int8`` (one float16 scale per row and channel, dequantised on
    gather) or ``auto`` (int8 above INT8_ABOVE_BYTES of float16 H-features).
    ``searcher_params``: options of the searcher kind (``milvus``: uri, collection, index_type,
    index_params, search_params; see :class:`~imageragturbo.retrieval.milvus.MilvusSpec`)."""
    started = time.perf_counter()
    out = Path(out)
    if batch_size < 1 or chunk_size < 1:
        raise DatabaseBuildError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    if out.exists() and not overwrite:
        raise DatabaseBuildError(f"{out} already exists; pass --overwrite to replace it")
    count = len(source)
    kind = resolve_kind(searcher, count)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    size = model_pixel_size(encoder)
    h_dtype = resolve_h_dtype(h_dtype, count, h_feature_shape(encoder, source, size) if h_dtype == "auto" and count else ())
    dtypes = array_dtypes(h_dtype)
    version = FORMAT_VERSION_INT8 if h_dtype == "int8" else FORMAT_VERSION
    state = {
        "format_version": version,
        "model_id": encoder.model_id,
        "source": source.description,
        "count": count,
        "chunk_size": chunk_size,
        "pixel_size": list(size),
        "dtypes": {name: np.dtype(dt).name for name, dt in dtypes.items()},
    }

    # 1. the temporary folder: fresh, or an interrupted build of the same thing
    done = _start_or_resume(tmp, state, resume)
    num_chunks = math.ceil(count / chunk_size)

    # 2. rows, chunk by chunk (each chunk durable on its own)
    bar = tqdm(total=count, initial=min(count, done * chunk_size), unit="pair", desc=f"build {out.name}", disable=not progress)
    for index in range(done, num_chunks):
        start, stop = index * chunk_size, min(count, (index + 1) * chunk_size)
        _save_chunk(tmp / CHUNKS, index, _compute_chunk(encoder, source, start, stop, size, batch_size, dtypes))
        bar.update(stop - start)
    bar.close()

    # 3. arrays, searcher, checksums, manifest
    arrays = _assemble(tmp, num_chunks, count, dtypes)
    searcher_dir = tmp / SEARCHER_DIR
    if searcher_dir.exists():
        shutil.rmtree(searcher_dir)
    text_emb = np.load(tmp / "text_emb.npy", mmap_mode="r", allow_pickle=False)
    captions = json.loads((tmp / "captions.json").read_text(encoding="utf-8"))
    searcher_entry = build_searcher(kind, text_emb, captions, searcher_dir, scann_spec, searcher_params,
                                    name=f"{out.name}-{encoder.model_id}")
    files = {}
    for file in sorted([tmp / "captions.json", tmp / "source_ids.json", *searcher_dir.rglob("*")]):
        if file.is_file():
            fsync_path(file)
            files[file.relative_to(tmp).as_posix()] = sha256_file(file)
    fsync_path(searcher_dir)
    manifest = {
        "format": FORMAT,
        "format_version": version,
        "model_id": encoder.model_id,
        "model_dir": str(encoder.model_dir),
        "count": count,
        "text_dim": arrays["text_emb"]["shape"][1],
        "h_shape": arrays["h_retr"]["shape"][1:],
        "h_dtype": h_dtype,
        "pixel_size": list(size),
        "arrays": arrays,
        "files": files,
        "searcher": searcher_entry,
        "source": source.description,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shutil.rmtree(tmp / CHUNKS)
    (tmp / STATE).unlink()
    write_text_durably(tmp / MANIFEST, json.dumps(manifest, indent=2))
    fsync_path(tmp)

    # 4. into place
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent)
    seconds = time.perf_counter() - started
    logger.info("built index %s: %d pairs, searcher %s, %.1f s", out, count, searcher_entry["kind"], seconds)
    return BuildResult(out, count, searcher_entry, seconds, done, h_dtype)
