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
:mod:`imageragturbo.index.build` under a temporary name and renamed into place only once the
manifest is written, so a folder without ``manifest.json`` is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from imageragturbo.errors import ImageRagTurboError
from imageragturbo.index.store import RetrievalDatabase

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "imageragturbo-index"
FORMAT_VERSION = 1
ARRAYS = ("text_emb", "z0", "h_retr")
TEXT_FILES = ("captions.json", "source_ids.json")
SEARCHER_DIR = "searcher"
DIRECT_GATHER_MAX = 64
"""Up to this many ids a gather indexes the memory map directly: a request's few rows cost
the same in any order, and sorting them first (np.unique) took 5x as long as the read."""
RESIDENT_MAX_BYTES = 64 << 20
"""Store arrays up to this size are copied into memory when a database is opened; larger
ones are gathered from the memory map."""


class IndexLoadError(ImageRagTurboError, ValueError):
    """A database folder is missing, incomplete, corrupt or built with another model."""


# -- files written safely ---------------------------------------------------------------------


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
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
        raise IndexLoadError(f"missing {what}: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexLoadError(f"malformed {what} {path}: {exc}") from exc


# -- the manifest -----------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The manifest of database folder ``path``, checked for the fields the loader relies on."""
    path = Path(path)
    if not path.is_dir():
        raise IndexLoadError(f"index folder not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise IndexLoadError(
            f"{path} has no {MANIFEST}: not an index folder, or a build that never finished "
            "(rerun build-index, with --resume to continue it)"
        )
    manifest = read_json(manifest_path, "index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexLoadError(f"{manifest_path}: not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexLoadError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    for key in ("model_id", "count", "arrays", "files", "searcher"):
        if key not in manifest:
            raise IndexLoadError(f"{manifest_path}: missing field {key!r}")
    missing = [name for name in ARRAYS if name not in manifest["arrays"]]
    if missing:
        raise IndexLoadError(f"{manifest_path}: no entry for arrays {missing}")
    return manifest


def verify_checksums(path: Path, manifest: dict) -> None:
    """Recompute the sha256 of every file the manifest lists; raise naming the first mismatch."""
    path = Path(path)
    entries = {spec["file"]: spec["sha256"] for spec in manifest["arrays"].values()}
    entries.update(manifest["files"])
    for name, expected in sorted(entries.items()):
        file = path / name
        if not file.is_file():
            raise IndexLoadError(f"{file}: listed in the manifest but missing")
        actual = sha256_file(file)
        if actual != expected:
            raise IndexLoadError(f"{file}: checksum mismatch (manifest sha256 {expected}, file has {actual}); the index is corrupt")
    logger.info("verified %d files of %s", len(entries), path)


VALUE_CHECK_ROWS = 8192
"""Rows read per chunk by :func:`verify_values` (bounded memory at any database size)."""


def verify_values(path: Path, store: MemmapFeatureStore, *, features: bool = True) -> None:
    """Refuse a database whose values cannot be served: every text key finite and of unit
    norm, every H-feature (and latent) finite. Raises :class:`IndexLoadError` naming the file
    and the first bad row. ``features=False`` checks the keys only (they are small)."""
    from imageragturbo.index.searchers import UNIT_NORM_TOLERANCE

    arrays = {name: a for name, a in store.arrays.items() if features or name == "text_emb"}
    for name, array in arrays.items():
        file = path / store.manifest["arrays"][name]["file"]
        for start in range(0, array.shape[0], VALUE_CHECK_ROWS):
            chunk = np.asarray(array[start : start + VALUE_CHECK_ROWS], dtype=np.float32).reshape(len(array[start : start + VALUE_CHECK_ROWS]), -1)
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite)[0])
                raise IndexLoadError(f"{file}: row {row} holds NaN or infinite values; the database is corrupt (rebuild it)")
            if name == "text_emb":
                norms = np.linalg.norm(chunk, axis=1)
                bad = np.abs(norms - 1) > UNIT_NORM_TOLERANCE
                if bad.any():
                    row = start + int(np.flatnonzero(bad)[0])
                    raise IndexLoadError(f"{file}: row {row} has norm {norms[bad][0]:.6g}, keys must be unit vectors; "
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
    """A :class:`~imageragturbo.index.protocols.FeatureStore` over memory-mapped ``.npy`` arrays.

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
            file = self.path / spec["file"]
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError as exc:
                raise IndexLoadError(f"{file}: listed in the manifest but missing") from exc
            except ValueError as exc:
                raise IndexLoadError(f"{file}: not a readable .npy array ({exc})") from exc
            if list(array.shape) != list(spec["shape"]) or str(array.dtype) != spec["dtype"]:
                raise IndexLoadError(
                    f"{file}: array is {array.dtype} {list(array.shape)}, the manifest says {spec['dtype']} {spec['shape']}"
                )
            if array.shape[0] != self.count:
                raise IndexLoadError(f"{file}: {array.shape[0]} rows, the manifest count is {self.count}")
            self.arrays[name] = array
        # Gathers read plain ndarrays: indexing an np.memmap runs its Python-level subclass
        # hooks on every request (more than half of a 4-row gather). Small arrays are read
        # into process memory once; a gather from a file-backed map measured 2x slower between
        # two UNet passes (39 against 18 us for 4 rows of the bundled H-features). Large ones
        # stay mapped, shared by every process that opens them.
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
            raise IndexLoadError(f"{file}: expected a JSON list of {self.count} strings")
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
    Raises :class:`IndexLoadError` naming the folder and what is wrong.
    """
    from imageragturbo.index.searchers import load_searcher

    path = Path(path)
    manifest = read_manifest(path)
    if model_id is not None and manifest["model_id"] != model_id:
        raise IndexLoadError(
            f"index {path} was built with model {manifest['model_id']}, but the model is {model_id}; "
            f"rebuild the index with this model: {rebuild_command(path, manifest)}"
        )
    if verify:
        verify_checksums(path, manifest)
    store = MemmapFeatureStore(path, manifest)
    # The keys are checked at every load (N x D floats: milliseconds for the bundled databases);
    # the features with ``verify``, as the checksums.
    verify_values(path, store, features=verify)
    searcher = load_searcher(manifest["searcher"], path / SEARCHER_DIR, store)
    logger.info(
        "loaded index %r from %s: %d entries, searcher %s, model %s",
        name, path, len(store), manifest["searcher"]["kind"], store.model_id,
    )
    return RetrievalDatabase(name, searcher, store)


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
                raise IndexLoadError(f"{listing}: expected {{\"default\": NAME}}: {exc}") from exc
            if default not in names:
                raise IndexLoadError(f"{listing}: default database {default!r} is not one of {names} in {root}")
        names.sort(key=lambda name: name != default)
        return [f"{name}={root / name}" for name in names]
    legacy = model_dir / LEGACY_DATABASE_DIR
    return [f"{LEGACY_DATABASE_NAME}={legacy}"] if legacy.is_dir() else []


def write_databases_file(model_dir: str | Path, default: str) -> None:
    """Name ``default`` as the model's default database (``databases/databases.json``)."""
    root = Path(model_dir) / DATABASES_DIR
    if not (root / default / MANIFEST).is_file():
        raise IndexLoadError(f"no database {default!r} in {root}")
    tmp = root / (DATABASES_FILE + ".tmp")
    tmp.write_text(json.dumps({"default": default}, indent=2) + "\n")
    os.replace(tmp, root / DATABASES_FILE)


def parse_index_spec(spec: str) -> tuple[str, Path]:
    """``"NAME=DIR"`` -> (NAME, DIR); a bare ``"DIR"`` is named after the folder."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an index spec must be NAME=DIR or DIR, got {spec!r}")
    name, sep, folder = spec.partition("=")
    if not sep:
        path = Path(spec)
        name = path.resolve().name
        if not name:
            raise ValueError(f"cannot name the index {spec!r} after its folder; write NAME={spec}")
        return name, path
    if not name.strip() or not folder.strip():
        raise ValueError(f"an index spec must be NAME=DIR with both parts non-empty, got {spec!r}")
    return name.strip(), Path(folder)
