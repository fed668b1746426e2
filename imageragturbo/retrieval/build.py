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
    ARRAYS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SEARCHER_DIR,
    fsync_path,
    sha256_file,
    write_text_durably,
)
from imageragturbo.retrieval.protocols import RowEncoder
from imageragturbo.retrieval.searchers import ScannSpec, build_searcher, resolve_kind

logger = logging.getLogger(__name__)

STATE = "build-state.json"
CHUNKS = "chunks"
DTYPES = {"text_emb": np.float32, "z0": np.float16, "h_retr": np.float16}


class DatabaseBuildError(ImageRagTurboError, ValueError):
    """A build cannot start or continue; the message says why and what to do."""


@dataclass
class BuildResult:
    path: Path
    count: int
    searcher: dict
    seconds: float
    resumed_chunks: int


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


def _compute_chunk(encoder: RowEncoder, source, start: int, stop: int, size: tuple[int, int], batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*ARRAYS, "captions", "source_ids")}
    for lo in range(start, stop, batch_size):
        batch = source.read(lo, min(stop, lo + batch_size), size)
        z0 = encoder.encode_images(batch.images)
        e, h_retr = encoder.encode_database_rows(z0, batch.captions)
        parts["text_emb"].append(e.cpu().numpy().astype(DTYPES["text_emb"]))
        parts["z0"].append(z0.cpu().numpy().astype(DTYPES["z0"]))
        parts["h_retr"].append(h_retr.cpu().numpy().astype(DTYPES["h_retr"]))
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


def _assemble(tmp: Path, num_chunks: int, count: int) -> dict[str, dict]:
    """Concatenate the chunks into ``.npy`` arrays + JSON string lists; returns the manifest's
    ``arrays`` entries (file, shape, dtype, sha256)."""
    chunks = tmp / CHUNKS
    first = _load_chunk(chunks, 0)
    outputs = {
        name: np.lib.format.open_memmap(
            tmp / f"{name}.npy", mode="w+", dtype=DTYPES[name], shape=(count, *first[name].shape[1:])
        )
        for name in ARRAYS
    }
    captions: list[str] = []
    source_ids: list[str] = []
    row = 0
    for index in range(num_chunks):
        chunk = first if index == 0 else _load_chunk(chunks, index)
        n = chunk["text_emb"].shape[0]
        for name in ARRAYS:
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
    for name in ARRAYS:
        file = tmp / f"{name}.npy"
        fsync_path(file)
        entries[name] = {
            "file": file.name,
            "shape": [count, *first[name].shape[1:]],
            "dtype": np.dtype(DTYPES[name]).name,
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
    batch_size: int = 64,
    chunk_size: int = 1024,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Build the database folder ``out`` from ``source`` (see :mod:`imageragturbo.retrieval.pairs`)
    with the model behind ``encoder`` (a :class:`~imageragturbo.retrieval.protocols.RowEncoder`,
    such as :class:`~imageragturbo.model.RagTurboPipeline`)."""
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
    state = {
        "format_version": FORMAT_VERSION,
        "model_id": encoder.model_id,
        "source": source.description,
        "count": count,
        "chunk_size": chunk_size,
        "pixel_size": list(size),
        "dtypes": {name: np.dtype(dt).name for name, dt in DTYPES.items()},
    }

    # 1. the temporary folder: fresh, or an interrupted build of the same thing
    done = _start_or_resume(tmp, state, resume)
    num_chunks = math.ceil(count / chunk_size)

    # 2. rows, chunk by chunk (each chunk durable on its own)
    bar = tqdm(total=count, initial=min(count, done * chunk_size), unit="pair", desc=f"build {out.name}", disable=not progress)
    for index in range(done, num_chunks):
        start, stop = index * chunk_size, min(count, (index + 1) * chunk_size)
        _save_chunk(tmp / CHUNKS, index, _compute_chunk(encoder, source, start, stop, size, batch_size))
        bar.update(stop - start)
    bar.close()

    # 3. arrays, searcher, checksums, manifest
    arrays = _assemble(tmp, num_chunks, count)
    searcher_dir = tmp / SEARCHER_DIR
    if searcher_dir.exists():
        shutil.rmtree(searcher_dir)
    text_emb = np.load(tmp / "text_emb.npy", mmap_mode="r", allow_pickle=False)
    captions = json.loads((tmp / "captions.json").read_text(encoding="utf-8"))
    searcher_entry = build_searcher(kind, text_emb, captions, searcher_dir, scann_spec)
    files = {}
    for file in sorted([tmp / "captions.json", tmp / "source_ids.json", *searcher_dir.rglob("*")]):
        if file.is_file():
            fsync_path(file)
            files[file.relative_to(tmp).as_posix()] = sha256_file(file)
    fsync_path(searcher_dir)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": encoder.model_id,
        "model_dir": str(encoder.model_dir),
        "count": count,
        "text_dim": arrays["text_emb"]["shape"][1],
        "h_shape": arrays["h_retr"]["shape"][1:],
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
    return BuildResult(out, count, searcher_entry, seconds, done)
