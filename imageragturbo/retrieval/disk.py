"""A retrieval database on disk: the folder layout, its manifest, a memory-mapped store, the loader.

A database folder holds::

    manifest.json       format, model identity, count, searcher kind + params, and for every
                        file its sha256 (arrays also their shape and dtype)
    text_emb.npy        float32 [N, Dq]   pooled, L2-normalised text embeddings (the search keys)
    z0.npy              float16 [N, c, h, w]   scaled VAE latents of the images
    h_retr.npy          float16 [N, C, h', w'] UNet-encoder mid-block output at t = 0, own caption,
                        or int8 [N, C, h', w'] with
    h_scale.npy         float16 (or float32) [N, C]: one scale per row and channel, h = q * scale
                        (format_version 2; see ``H_DTYPES``)
    captions.json       N strings
    source_ids.json     N strings (the pair's name in its source dataset)
    searcher/           the serialised searcher (ScaNN assets, BM25 arrays; empty for exact)

Arrays are plain ``.npy`` read with ``np.load(mmap_mode="r", allow_pickle=False)``, text is
JSON: nothing in a database is ever unpickled. The folder is written by
:mod:`imageragturbo.retrieval.build` under a temporary name and renamed into place only once the
manifest is written, so a folder without ``manifest.json`` is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from imageragturbo.errors import ConfigError
# The manifest's names and checks live in checks.py; they are imported from here by callers.
from imageragturbo.retrieval.checks import (  # noqa: F401
    ARRAYS,
    CHECKSUM_PROGRESS_S,
    FORMAT,
    FORMAT_VERSION,
    FORMAT_VERSION_INT8,
    H_DTYPES,
    H_SCALE,
    MANIFEST,
    READABLE_VERSIONS,
    SCALE_DTYPES,
    SEARCHER_DIR,
    TEXT_FILES,
    VALUE_CHECK_ROWS,
    DatabaseLoadError,
    inside,
    read_json,
    read_manifest,
    sha256_file,
    verify_checksums,
    verify_values,
)
from imageragturbo.retrieval.database import RetrievalDatabase
from imageragturbo.retrieval.quantize import dequantize_h

logger = logging.getLogger(__name__)

DIRECT_GATHER_MAX = 64
"""Up to this many ids a gather indexes the memory map directly: a request's few rows cost
the same in any order, and sorting them first would cost more than the read
(results/design-notes.md)."""
RESIDENT_MAX_BYTES = 64 << 20
"""Store arrays up to this size are copied into memory when a database is opened; larger
ones are gathered from the memory map."""
WARM_MAX_SHARE = 0.8
""":meth:`MemmapFeatureStore.warm_up` reads a store only if it takes at most this share of the
memory available (MemAvailable, which counts page cache that can be reclaimed, so a store
already cached counts as fitting)."""
WARM_BLOCK = 16 << 20
"""Bytes per read of the warm-up pass."""


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# -- files written safely ---------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable only once the
    directory holding it is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durably(path: Path, text: str) -> None:
    """Write ``path`` via a sibling temporary file, fsync it, rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# -- the store --------------------------------------------------------------------------------


def gather_rows(array: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``array[ids]`` for a memory-mapped [N, ...] array and ids int [B, k] -> [B, k, ...],
    reading only those rows (a copy of k rows, never of the array)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = array.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError(f"ids must be in [0, {n}), got range [{ids.min()}, {ids.max()}]")
    if ids.size <= DIRECT_GATHER_MAX:
        return np.asarray(array).take(ids.reshape(-1), axis=0).reshape(*ids.shape, *array.shape[1:])
    # Sorted unique reads touch each page once and in file order; the result is then
    # scattered back to the requested layout.
    unique, inverse = np.unique(ids, return_inverse=True)
    rows = np.asarray(array[unique])
    return rows[inverse.reshape(ids.shape)]


class MemmapFeatureStore:
    """A :class:`~imageragturbo.retrieval.protocols.FeatureStore` over memory-mapped ``.npy`` arrays.

    Opening it maps the arrays (nothing is read until rows are gathered) and checks each array's
    shape and dtype against the manifest; :meth:`verify` recomputes the checksums. A gather of
    ids [B, k] reads only those B*k rows.
    """

    def __init__(self, path: str | Path, manifest: dict | None = None):
        self.path = Path(path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        self.model_id: str = self.manifest["model_id"]
        self.count = int(self.manifest["count"])
        self.arrays: dict[str, np.ndarray] = {}
        names = [*ARRAYS, *([H_SCALE] if H_SCALE in self.manifest["arrays"] else [])]
        for name in names:
            spec = self.manifest["arrays"][name]
            file = inside(self.path, spec["file"], f"{self.path / MANIFEST}: arrays.{name}.file")
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError as exc:
                raise DatabaseLoadError(f"{file}: listed in the manifest but missing") from exc
            except ValueError as exc:
                raise DatabaseLoadError(f"{file}: not a readable .npy array ({exc})") from exc
            if list(array.shape) != list(spec["shape"]) or str(array.dtype) != spec["dtype"]:
                raise DatabaseLoadError(
                    f"{file}: array is {array.dtype} {list(array.shape)}, the manifest says {spec['dtype']} {spec['shape']}"
                )
            if array.shape[0] != self.count:
                raise DatabaseLoadError(f"{file}: {array.shape[0]} rows, the manifest count is {self.count}")
            self.arrays[name] = array
        self.h_dtype: str = str(self.arrays["h_retr"].dtype)
        """float16 / float32 (rows handed out as stored) or int8 (dequantised on gather)."""
        # Gathers read plain ndarrays: indexing an np.memmap runs its Python-level subclass
        # hooks on every request. Small arrays are read into process memory once (a gather from
        # a file-backed map is slower between two UNet passes: results/design-notes.md); large
        # ones stay mapped, shared by every process that opens them.
        self._rows = {
            name: np.array(array) if array.nbytes <= RESIDENT_MAX_BYTES else array.view(np.ndarray)
            for name, array in self.arrays.items()
        }
        self._captions = self._read_strings("captions.json")
        self._source_ids = self._read_strings("source_ids.json")

    def _read_strings(self, name: str) -> list[str]:
        file = self.path / name
        values = read_json(file, "string list")
        if not isinstance(values, list) or len(values) != self.count or not all(isinstance(v, str) for v in values):
            raise DatabaseLoadError(f"{file}: expected a JSON list of {self.count} strings")
        return values

    def verify(self) -> None:
        """Recompute every file's sha256 against the manifest (reads the whole folder)."""
        verify_checksums(self.path, self.manifest)

    def __len__(self) -> int:
        return self.count

    @property
    def text_emb(self) -> np.ndarray:
        """float32 [N, Dq], memory-mapped."""
        return self.arrays["text_emb"]

    def _gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        return gather_rows(self._rows[name], ids)

    def text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [B, k] -> float32 [B, k, Dq]."""
        return self._gather("text_emb", ids)

    def h_features(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [B, k] -> float [B, k, C, h, w]: float16 as stored, or for an int8 store
        the codes times their row-and-channel scales, in float32."""
        if self.h_dtype == "int8":
            return dequantize_h(self._gather("h_retr", ids), self._gather(H_SCALE, ids))
        return self._gather("h_retr", ids)

    def warm_up(self, *, max_bytes: int | None = None, on_progress=None, block: int = WARM_BLOCK) -> dict:
        """Read the memory-mapped arrays once, sequentially, so that gathers find their rows
        in the page cache instead of on disk (a cold 4-row gather of SD-sized rows costs a disk
        read per row: results/retrieval.md).

        Only a store that fits: ``max_bytes`` (default ``WARM_MAX_SHARE`` of the memory
        available now) bounds what is read, and a larger store is left cold (reading it would
        only evict its own first pages). A long pass logs its progress every
        ``CHECKSUM_PROGRESS_S``; ``on_progress(done_bytes, total_bytes)`` after each block.
        Returns {"warmed", "bytes", "seconds", "reason"}.
        """
        started = time.monotonic()
        files = [inside(self.path, self.manifest["arrays"][name]["file"], str(self.path / MANIFEST))
                 for name, rows in self._rows.items() if rows.base is not None]
        total = sum(file.stat().st_size for file in files)
        if not files:  # every array was read into process memory at open
            return {"warmed": True, "bytes": 0, "seconds": 0.0, "reason": "nothing is memory-mapped"}
        if max_bytes is None:
            available = memory_available_bytes()
            max_bytes = None if available is None else int(available * WARM_MAX_SHARE)
        if max_bytes is not None and total > max_bytes:
            reason = (f"{total / 2**30:.2f} GiB of mapped array files do not fit in the {max_bytes / 2**30:.2f} GiB "
                      "allowed; gathers will read from disk")
            logger.warning("not warming %s: %s", self.path, reason)
            return {"warmed": False, "bytes": total, "seconds": 0.0, "reason": reason}
        done, last = 0, time.monotonic()
        buffer = bytearray(block)
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                with open(fd, "rb", buffering=0, closefd=False) as handle:
                    while n := handle.readinto(buffer):
                        done += n
                        if on_progress is not None:
                            on_progress(done, total)
                        if time.monotonic() - last >= CHECKSUM_PROGRESS_S:
                            last = time.monotonic()
                            logger.warning("warming %s: %.2f of %.2f GB read", self.path, done / 1e9, total / 1e9)
            finally:
                os.close(fd)
        seconds = time.monotonic() - started
        logger.info("warmed %s: %.2f GB in %.1f s", self.path, done / 1e9, seconds)
        return {"warmed": True, "bytes": done, "seconds": seconds, "reason": None}

    def latents(self, ids: np.ndarray) -> np.ndarray:
        """ids int64 [B, k] -> float16 [B, k, c, h, w]: the images' VAE latents z0."""
        return self._gather("z0", ids)

    def captions(self, ids: np.ndarray) -> list[list[str]]:
        return [[self._captions[i] for i in row] for row in np.asarray(ids).tolist()]

    def source_ids(self, ids: np.ndarray) -> list[list[str]]:
        return [[self._source_ids[i] for i in row] for row in np.asarray(ids).tolist()]

    def all_captions(self) -> list[str]:
        return list(self._captions)


# -- loading a database -----------------------------------------------------------------------


def load_database(
    name: str, path: str | Path, *, verify: bool = False, model_id: str | None = None,
    warm: bool = False, on_warm_progress=None,
) -> RetrievalDatabase:
    """Open the database folder ``path`` as a :class:`RetrievalDatabase` called ``name``.

    ``verify`` recomputes every checksum first (seconds per GB). ``model_id``, when given, must
    equal the id the database was built with (a pipeline checks this again on ``add_database``).
    ``warm`` reads the store's memory-mapped arrays into the page cache if they fit in memory
    (:meth:`MemmapFeatureStore.warm_up`, progress to ``on_warm_progress(done, total)`` and the
    log). Raises :class:`DatabaseLoadError` naming the folder and what is wrong.
    """
    from imageragturbo.retrieval.searchers import load_searcher

    path = Path(path)
    manifest = read_manifest(path)
    if model_id is not None and manifest["model_id"] != model_id:
        raise DatabaseLoadError(
            f"database {path} was built with model {manifest['model_id']}, but the model is {model_id}; "
            f"rebuild the database with this model: {rebuild_command(path, manifest)}"
        )
    if verify:
        verify_checksums(path, manifest)
    store = MemmapFeatureStore(path, manifest)
    # The keys are checked at every load (N x D floats: milliseconds for the bundled databases);
    # the features with ``verify``, as the checksums.
    verify_values(path, store, features=verify)
    if warm:
        store.warm_up(on_progress=on_warm_progress)
    try:
        searcher = load_searcher(manifest["searcher"], path / SEARCHER_DIR, store)
    except (ValueError, OSError, RuntimeError) as exc:
        raise DatabaseLoadError(f"{path / SEARCHER_DIR}: cannot load the {manifest['searcher']['kind']!r} searcher: {exc}") from exc
    logger.info(
        "loaded database %r from %s: %d entries, searcher %s, model %s",
        name, path, len(store), manifest["searcher"]["kind"], store.model_id,
    )
    return RetrievalDatabase(name, searcher, store)


def check_database(path: str | Path, *, model_id: str | None = None) -> dict:
    """Every check ``serve`` runs before it serves ``path`` (manifest, checksums, values,
    searcher kind and assets, and with ``model_id`` the model identity); the manifest's summary.
    Raises :class:`DatabaseLoadError` naming the file and the problem."""
    database = load_database(Path(path).name, path, verify=True, model_id=model_id)
    manifest = database.store.manifest
    return {
        "path": str(path),
        "ok": True,
        "count": manifest["count"],
        "model_id": manifest["model_id"],
        "searcher": manifest["searcher"],
        "arrays": {name: [spec["dtype"], spec["shape"]] for name, spec in manifest["arrays"].items()},
    }


def rebuild_command(path: Path, manifest: dict, model_dir: str | Path | None = None) -> str:
    """The ``build-index`` command that rebuilds ``path`` from the same source."""
    source = manifest.get("source", {})
    if source.get("kind") == "world":
        what = f"--world {source['n']} --world-seed {source['seed']}" + (f" --style {source['style']}" if source.get("style") else "")
    elif "path" in source:
        what = f"--pairs {source['path']}"
    else:
        what = "--world N | --pairs PATH"
    model = f" --model {model_dir}" if model_dir is not None else ""
    kind = manifest.get("searcher", {}).get("kind", "auto")
    h_dtype = manifest.get("arrays", {}).get("h_retr", {}).get("dtype")
    h_flag = f" --h-dtype {h_dtype}" if h_dtype in ("int8", "float16") else ""
    return f"imageragturbo build-database --out {path}{model} {what} --searcher {kind}{h_flag} --overwrite"


DATABASES_DIR = "databases"
DATABASES_FILE = "databases.json"
LEGACY_DATABASE_DIR = "index"
LEGACY_DATABASE_NAME = "default"


def model_databases(model_dir: str | Path) -> list[str]:
    """The databases a model directory carries, as ``NAME=DIR`` specs with the default first.

    ``<model>/databases/<name>/`` folders (the default named by ``databases/databases.json``,
    ``{"default": "grey"}``, else the first by name), or an older model's single
    ``<model>/index/`` (named ``default``). This is the one place that decides which database a
    model serves by default.
    """
    model_dir = Path(model_dir)
    root = model_dir / DATABASES_DIR
    if root.is_dir():
        names = sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())
        default = names[0] if names else None
        listing = root / DATABASES_FILE
        if listing.is_file():
            try:
                default = json.loads(listing.read_text())["default"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DatabaseLoadError(f"{listing}: expected {{\"default\": NAME}}: {exc}") from exc
            if default not in names:
                raise DatabaseLoadError(f"{listing}: default database {default!r} is not one of {names} in {root}")
        names.sort(key=lambda name: name != default)
        return [f"{name}={root / name}" for name in names]
    legacy = model_dir / LEGACY_DATABASE_DIR
    return [f"{LEGACY_DATABASE_NAME}={legacy}"] if legacy.is_dir() else []


def write_databases_file(model_dir: str | Path, default: str) -> None:
    """Name ``default`` as the model's default database (``databases/databases.json``)."""
    root = Path(model_dir) / DATABASES_DIR
    if not (root / default / MANIFEST).is_file():
        raise DatabaseLoadError(f"no database {default!r} in {root}")
    tmp = root / (DATABASES_FILE + ".tmp")
    tmp.write_text(json.dumps({"default": default}, indent=2) + "\n")
    os.replace(tmp, root / DATABASES_FILE)


def parse_database_spec(spec: str) -> tuple[str, Path]:
    """``"NAME=DIR"`` -> (NAME, DIR); a bare ``"DIR"`` is named after the folder."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a database spec must be NAME=DIR or DIR, got {spec!r}")
    name, sep, folder = spec.partition("=")
    if not sep:
        path = Path(spec)
        name = path.resolve().name
        if not name:
            raise ConfigError(f"cannot name the database {spec!r} after its folder; write NAME={spec}")
        return name, path
    if not name.strip() or not folder.strip():
        raise ConfigError(f"a database spec must be NAME=DIR with both parts non-empty, got {spec!r}")
    return name.strip(), Path(folder)
