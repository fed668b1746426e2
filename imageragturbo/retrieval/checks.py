"""Reading and checking a database folder: its manifest (every field the loader relies on, and
the layout of its arrays), its checksums, and its values. :mod:`imageragturbo.retrieval.disk`
describes the folder and re-exports these names; nothing here reads a row for serving.
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
from typing import TYPE_CHECKING

import numpy as np

from imageragturbo.errors import ImageRagTurboError

if TYPE_CHECKING:
    from imageragturbo.retrieval.disk import MemmapFeatureStore

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "imageragturbo-index"
FORMAT_VERSION = 1
"""What a database with float H-features is written as (every bundled database)."""
FORMAT_VERSION_INT8 = 2
"""A database whose H-features are int8 + scales: a reader of version 1 would hand out the int8
codes as floats, so such a database says version 2, which a version-1 reader refuses."""
READABLE_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_INT8)
ARRAYS = ("text_emb", "z0", "h_retr")
H_SCALE = "h_scale"
"""The optional array of an int8 store: float [N, C], one scale per row and channel."""
H_DTYPES = ("float16", "float32", "int8")
SCALE_DTYPES = ("float16", "float32")
TEXT_FILES = ("captions.json", "source_ids.json")
SEARCHER_DIR = "searcher"


class DatabaseLoadError(ImageRagTurboError, ValueError):
    """A database folder is missing, incomplete, corrupt or built with another model."""


def sha256_file(path: Path, block: int = 1 << 22, on_read=None) -> str:
    """The file's sha256, read in ``block``-byte chunks; ``on_read(n)`` after each chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            if on_read is not None:
                on_read(len(chunk))
    return digest.hexdigest()


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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise DatabaseLoadError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this code reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}"
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
    names = [*ARRAYS, *([H_SCALE] if H_SCALE in manifest["arrays"] else [])]
    for name in names:
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
    _check_h_layout(manifest, manifest_path)
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


def _check_h_layout(manifest: dict, manifest_path: Path) -> None:
    """The H-features are float16/float32 without scales, or int8 with a float [N, C] scale
    array (format_version 2): any other combination is refused before a row is read."""
    arrays = manifest["arrays"]
    h, scale = arrays["h_retr"], arrays.get(H_SCALE)
    if h["dtype"] not in H_DTYPES:
        raise DatabaseLoadError(f"{manifest_path}: arrays.h_retr.dtype must be one of {list(H_DTYPES)}, got {h['dtype']!r}")
    if h["dtype"] != "int8":
        if scale is not None:
            raise DatabaseLoadError(f"{manifest_path}: arrays.{H_SCALE} is only for int8 H-features, h_retr is {h['dtype']}")
        return
    if scale is None:
        raise DatabaseLoadError(f"{manifest_path}: h_retr is int8 but arrays.{H_SCALE} (its scales) is missing")
    if manifest["format_version"] != FORMAT_VERSION_INT8:
        raise DatabaseLoadError(f"{manifest_path}: int8 H-features need format_version {FORMAT_VERSION_INT8}, "
                                f"the manifest says {manifest['format_version']}")
    if scale["dtype"] not in SCALE_DTYPES:
        raise DatabaseLoadError(f"{manifest_path}: arrays.{H_SCALE}.dtype must be one of {list(SCALE_DTYPES)}, got {scale['dtype']!r}")
    if list(scale["shape"]) != list(h["shape"][:2]):
        raise DatabaseLoadError(f"{manifest_path}: arrays.{H_SCALE}.shape must be [N, C] = {h['shape'][:2]} "
                                f"(one scale per row and channel of h_retr), got {scale['shape']}")


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

    # int8 codes are finite by construction; their scales are checked instead.
    arrays = {name: a for name, a in store.arrays.items()
              if (features or name == "text_emb") and np.issubdtype(a.dtype, np.floating)}
    for name, array in arrays.items():
        file = inside(path, store.manifest["arrays"][name]["file"], str(path / MANIFEST))
        for start in range(0, array.shape[0], VALUE_CHECK_ROWS):
            block = array[start : start + VALUE_CHECK_ROWS]
            chunk = np.asarray(block, dtype=np.float32).reshape(len(block), -1)
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite)[0])
                raise DatabaseLoadError(f"{file}: row {row} holds NaN or infinite values; the database is corrupt (rebuild it)")
            if name == H_SCALE:
                negative = (chunk < 0).any(axis=1)
                if negative.any():
                    row = start + int(np.flatnonzero(negative)[0])
                    raise DatabaseLoadError(f"{file}: row {row} holds a negative scale; the database is corrupt (rebuild it)")
            if name == "text_emb":
                norms = np.linalg.norm(chunk.astype(np.float64), axis=1)  # float64: a huge value must not overflow
                bad = np.abs(norms - 1) > UNIT_NORM_TOLERANCE
                if bad.any():
                    row = start + int(np.flatnonzero(bad)[0])
                    raise DatabaseLoadError(f"{file}: row {row} has norm {norms[bad][0]:.6g}, keys must be unit vectors; "
                                         "the database is corrupt (rebuild it)")
    logger.info("checked the values of %s (%s)", path, ", ".join(arrays))
