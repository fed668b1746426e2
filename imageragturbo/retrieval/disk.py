"""A retrieval database on disk: the folder layout, its manifest, a memory-mapped store, the loader.

A database folder holds::

    manifest.json       format, model identity, count, searcher kind + params, and for every
                        file its sha256 (arrays also their shape and dtype)
    text_emb.npy        float32 [N, Dq]   pooled, L2-normalised text embeddings (the search keys)
    z0.npy              float16 [N, c, h, w]   scaled VAE latents of the images
    h_retr.npy          float16 [N, C, h', w'] UNet-encoder mid-block output at t = 0, own caption
    captions.json       N strings
    source_ids.json     N strings (the pair's name in its source dataset)
    searcher/           the serialised searcher (ScaNN assets, BM25 arrays; empty for exact)

Arrays are plain ``.npy`` read with ``np.load(mmap_mode="r", allow_pickle=False)``, text is
JSON: nothing in a database is ever unpickled. The folder is written by
:mod:`imageragturbo.retrieval.build` under a temporary name and renamed into place only once the
manifest is written, so a folder without ``manifest.json`` is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imageragturbo.errors import ConfigError, ImageRagTurboError
from imageragturbo.retrieval.database import RetrievalDatabase

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "imageragturbo-index"
FORMAT_VERSION = 1
ARRAYS = ("text_emb", "z0", "h_retr")
TEXT_FILES = ("captions.json", "source_ids.json")
SEARCHER_DIR = "searcher"
DIRECT_GATHER_MAX = 64
"""Up to this many ids a gather indexes the memory map directly: a request's few rows cost
the same in any order, and sorting them first would cost more than the read
(results/design-notes.md)."""
RESIDENT_MAX_BYTES = 64 << 20
"""Store arrays up to this size are copied into memory when a database is opened; larger
ones are gathered from the memory map."""


class DatabaseLoadError(ImageRagTurboError, ValueError):
    """A database folder is missing, incomplete, corrupt or built with another model."""


# -- files written safely ---------------------------------------------------------------------


def sha256_file(path: Path, block: int = 1 << 22, on_read=None) -> str:
    """The file's sha256, read in ``block``-byte chunks; ``on_read(n)`` after each chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            if on_read is not None:
                on_read(len(chunk))
    return digest.hexdigest()


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


def read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatabaseLoadError(f"missing {what}: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatabaseLoadError(f"malformed {what} {path}: {exc}") from exc
    except OSError as exc:  # a directory, no permission, an I/O error
        raise DatabaseLoadError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


# -- the manifest -----------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The manifest of database folder ``path``, with every field the loader relies on checked
    for its type, and every file it names inside the folder."""
    path = Path(path)
    if not path.is_dir():
        raise DatabaseLoadError(f"database folder not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DatabaseLoadError(
            f"{path} has no {MANIFEST}: not a database folder, or a build that never finished "
            "(rerun build-database, with --resume to continue it)"
        )
    manifest = read_json(manifest_path, "database manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatabaseLoadError(f"{manifest_path}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatabaseLoadError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )

    def bad(field: str, expected: str) -> DatabaseLoadError:
        return DatabaseLoadError(f"{manifest_path}: field {field!r} must be {expected}, got {manifest_value(field)!r}")

    def manifest_value(field: str):
        value = manifest
        for key in field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    for key in ("model_id", "count", "arrays", "files", "searcher"):
        if key not in manifest:
            raise DatabaseLoadError(f"{manifest_path}: missing field {key!r}")
    if not isinstance(manifest["model_id"], str) or not manifest["model_id"]:
        raise bad("model_id", "a non-empty string")
    if not _is_count(manifest["count"]):
        raise bad("count", "a non-negative integer")
    if not isinstance(manifest["arrays"], dict):
        raise bad("arrays", "an object of {name: {file, shape, dtype, sha256}}")
    missing = [name for name in ARRAYS if name not in manifest["arrays"]]
    if missing:
        raise DatabaseLoadError(f"{manifest_path}: no entry for arrays {missing}")
    for name in ARRAYS:
        spec = manifest["arrays"][name]
        if not isinstance(spec, dict):
            raise bad(f"arrays.{name}", "an object of {file, shape, dtype, sha256}")
        for key in ("file", "shape", "dtype", "sha256"):
            if key not in spec:
                raise DatabaseLoadError(f"{manifest_path}: arrays.{name} has no {key!r}")
        if not isinstance(spec["shape"], list) or not spec["shape"] or not all(_is_count(d) for d in spec["shape"]):
            raise bad(f"arrays.{name}.shape", "a non-empty list of non-negative integers")
        if not isinstance(spec["dtype"], str):
            raise bad(f"arrays.{name}.dtype", "a string")
        if not _is_sha256(spec["sha256"]):
            raise bad(f"arrays.{name}.sha256", "64 hex digits")
        inside(path, spec["file"], f"{manifest_path}: arrays.{name}.file")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and _is_sha256(v) for k, v in files.items()):
        raise bad("files", "an object of {file: sha256}")
    for name in files:
        inside(path, name, f"{manifest_path}: files")
    searcher = manifest["searcher"]
    if not isinstance(searcher, dict) or not isinstance(searcher.get("kind"), str):
        raise bad("searcher", "an object with a 'kind'")
    if not isinstance(searcher.get("params", {}), dict):
        raise bad("searcher.params", "an object")
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def inside(folder: Path, name, what: str) -> Path:
    """``folder / name``, refusing a name that is not a relative path inside ``folder`` (an
    absolute path, ``..``, or a link out of it): a manifest never makes us read elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise DatabaseLoadError(f"{what}: {name!r} must be a relative file name inside {folder}")
    file = folder / name
    root = folder.resolve()
    if not file.resolve().is_relative_to(root):
        raise DatabaseLoadError(f"{what}: {name!r} points outside the database folder {folder}")
    return file


CHECKSUM_PROGRESS_S = 10.0
"""A checksum pass longer than this logs its progress at this interval."""


def verify_checksums(path: Path, manifest: dict) -> None:
    """Recompute the sha256 of every file the manifest lists; raise naming the first mismatch.

    Files are hashed on a few threads at once (hashlib releases the GIL), each in 4 MiB chunks,
    so memory stays flat at any store size; a long pass logs how far it is."""
    path = Path(path)
    entries = {spec["file"]: spec["sha256"] for spec in manifest["arrays"].values()}
    entries.update(manifest["files"])
    files = {name: inside(path, name, f"{path / MANIFEST}") for name in sorted(entries)}
    for file in files.values():
        if not file.is_file():
            raise DatabaseLoadError(f"{file}: listed in the manifest but missing")
    total = sum(file.stat().st_size for file in files.values())
    done, lock, started = [0, time.monotonic()], threading.Lock(), time.monotonic()

    def on_read(n: int) -> None:
        with lock:
            done[0] += n
            if time.monotonic() - done[1] >= CHECKSUM_PROGRESS_S:
                done[1] = time.monotonic()
                logger.warning("verifying %s: %.2f of %.2f GB checked", path, done[0] / 1e9, total / 1e9)

    workers = max(1, min(len(files), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        actual = dict(zip(files, pool.map(lambda f: sha256_file(f, on_read=on_read), files.values())))
    for name, file in files.items():
        if actual[name] != entries[name]:
            raise DatabaseLoadError(
                f"{file}: checksum mismatch (manifest sha256 {entries[name]}, file has {actual[name]}); "
                "the database is corrupt (rebuild it)"
            )
    logger.info("verified %d files of %s (%.2f GB) in %.1f s", len(files), path, total / 1e9, time.monotonic() - started)


VALUE_CHECK_ROWS = 8192
"""Rows read per chunk by :func:`verify_values` (bounded memory at any database size)."""


def verify_values(path: Path, store: MemmapFeatureStore, *, features: bool = True) -> None:
    """Refuse a database whose values cannot be served: every text key finite and of unit
    norm, every H-feature (and latent) finite. Raises :class:`DatabaseLoadError` naming the file
    and the first bad row. ``features=False`` checks the keys only (they are small)."""
    from imageragturbo.retrieval.searchers import UNIT_NORM_TOLERANCE

    arrays = {name: a for name, a in store.arrays.items() if features or name == "text_emb"}
    for name, array in arrays.items():
        file = inside(path, store.manifest["arrays"][name]["file"], str(path / MANIFEST))
        for start in range(0, array.shape[0], VALUE_CHECK_ROWS):
            chunk = np.asarray(array[start : start + VALUE_CHECK_ROWS], dtype=np.float32).reshape(len(array[start : start + VALUE_CHECK_ROWS]), -1)
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite)[0])
                raise DatabaseLoadError(f"{file}: row {row} holds NaN or infinite values; the database is corrupt (rebuild it)")
            if name == "text_emb":
                norms = np.linalg.norm(chunk.astype(np.float64), axis=1)  # float64: a huge value must not overflow
                bad = np.abs(norms - 1) > UNIT_NORM_TOLERANCE
                if bad.any():
                    row = start + int(np.flatnonzero(bad)[0])
                    raise DatabaseLoadError(f"{file}: row {row} has norm {norms[bad][0]:.6g}, keys must be unit vectors; "
                                         "the database is corrupt (rebuild it)")
    logger.info("checked the values of %s (%s)", path, ", ".join(arrays))


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


# -- the store --------------------------------------------------------------------------------


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
        for name in ARRAYS:
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
        """ids int64 [B, k] -> float16 [B, k, C, h, w]."""
        return self._gather("h_retr", ids)

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
    name: str, path: str | Path, *, verify: bool = False, model_id: str | None = None
) -> RetrievalDatabase:
    """Open the database folder ``path`` as a :class:`RetrievalDatabase` called ``name``.

    ``verify`` recomputes every checksum first (seconds per GB). ``model_id``, when given, must
    equal the id the database was built with (a pipeline checks this again on ``add_database``).
    Raises :class:`DatabaseLoadError` naming the folder and what is wrong.
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
    return f"imageragturbo build-database --out {path}{model} {what} --searcher {kind} --overwrite"


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
