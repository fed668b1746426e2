"""Where database pairs come from: the shapes world, a folder of images + captions, JSONL or Parquet.

A folder is either images with same-name ``.txt`` captions, or a Hugging Face ``imagefolder``
dataset: images beside a ``metadata.jsonl`` of ``{"file_name": ..., "text": ...}`` lines.

Every source has a length and reads any range ``[start, stop)`` as images resized to the
model's pixel size, so a build can stop and resume at any chunk. Sources are validated when
opened (every line parsed, every image file present), so a bad line fails the build before the
model has run, with an error naming the file and line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from imageragturbo.errors import ImageRagTurboError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PairSourceError(ImageRagTurboError, ValueError):
    """A pair source is malformed; the message names the file (and line)."""


@dataclass
class PairBatch:
    images: np.ndarray
    """uint8 [n, H, W, 3] at the model's pixel size."""
    captions: list[str]
    source_ids: list[str]


def fit_image(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize the short side to fit, centre-crop to ``size`` (H, W) -> uint8 [H, W, 3]."""
    image = image.convert("RGB")
    height, width = size
    if image.size != (width, height):
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, dtype=np.uint8)


def _load_image(path: Path, size: tuple[int, int], where: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return fit_image(image, size)
    except (OSError, UnidentifiedImageError) as exc:
        raise PairSourceError(f"{where}: cannot read image {path}: {exc}") from exc


class WorldPairs:
    """The shapes world's ``database`` split (every composition at its natural rate, held-out
    and tail ones included), rendered in one background ``style`` (None: drawn per item)."""

    def __init__(self, n: int, seed: int = 0, split: str = "database", style: str | None = None):
        from imageragturbo.world.render import STYLE_NAMES

        if n < 1:
            raise PairSourceError(f"--world needs a positive number of pairs, got {n}")
        if style is not None and style not in STYLE_NAMES:
            raise PairSourceError(f"--style must be one of {', '.join(STYLE_NAMES)}, got {style!r}")
        self.n, self.seed, self.split, self.style = n, seed, split, style
        self.description = {"kind": "world", "split": split, "n": n, "seed": seed} | ({"style": style} if style else {})

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int, size: tuple[int, int]) -> PairBatch:
        from imageragturbo.world.splits import iter_world_pairs

        images, captions, ids = [], [], []
        for offset, (image, text, _spec) in enumerate(iter_world_pairs(self.split, stop - start, self.seed, start, self.style)):
            images.append(fit_image(Image.fromarray(image), size))
            captions.append(text)
            style = f"{self.style}/" if self.style else ""
            ids.append(f"world/{self.split}/{style}{self.seed}/{start + offset}")
        return PairBatch(np.stack(images), captions, ids)


class _ListedPairs:
    """Pairs listed up front as (image path, caption, source id, where-for-errors)."""

    def __init__(self, entries: list[tuple[Path, str, str, str]], description: dict):
        if not entries:
            raise PairSourceError(f"{description['path']}: no pairs found")
        self.entries = entries
        digest = hashlib.sha256()
        for path, text, source_id, _ in entries:
            digest.update(f"{path}\0{text}\0{source_id}\n".encode())
        # The listing's hash makes a resumed build refuse a source that changed meanwhile.
        self.description = {**description, "n": len(entries), "listing_sha256": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, start: int, stop: int, size: tuple[int, int]) -> PairBatch:
        rows = self.entries[start:stop]
        images = np.stack([_load_image(path, size, where) for path, _, _, where in rows])
        return PairBatch(images, [r[1] for r in rows], [r[2] for r in rows])


class FolderPairs(_ListedPairs):
    """``DIR/name.png`` + ``DIR/name.txt`` (caption), for every image in DIR (recursively)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        entries = []
        for image in images:
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                raise PairSourceError(f"{image}: no caption file {caption_file.name} beside it")
            text = caption_file.read_text(encoding="utf-8").strip()
            if not text:
                raise PairSourceError(f"{caption_file}: empty caption")
            rel = image.relative_to(folder).as_posix()
            entries.append((image, text, rel, str(image)))
        super().__init__(entries, {"kind": "folder", "path": str(folder.resolve())})


IMAGEFOLDER_METADATA = "metadata.jsonl"
"""Hugging Face ``imagefolder``'s metadata file: one ``{"file_name": ..., "text": ...}`` per line."""


def _row_image_and_caption(row: dict) -> tuple[object, object]:
    """``image``/``caption`` (ours), else ``file_name``/``text`` (Hugging Face imagefolder)."""
    image = row["image"] if "image" in row else row.get("file_name")
    caption = row["caption"] if "caption" in row else row.get("text")
    return image, caption


class JsonlPairs(_ListedPairs):
    """One JSON object per line: ``{"image": path, "caption": text}`` (optional ``"id"``), or
    Hugging Face imagefolder's ``{"file_name": path, "text": text}`` (its ``metadata.jsonl``);
    relative image paths are relative to the JSONL file's folder."""

    def __init__(self, path: Path, kind: str = "jsonl"):
        path = Path(path)
        entries = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PairSourceError(f"{where}: not valid JSON ({exc.msg})") from exc
                image_name, caption = _row_image_and_caption(row) if isinstance(row, dict) else (None, None)
                if not isinstance(image_name, str) or not isinstance(caption, str):
                    raise PairSourceError(
                        f'{where}: expected {{"image": "<path>", "caption": "<text>"}} (or imagefolder\'s '
                        f'{{"file_name": "<path>", "text": "<text>"}}), got {line.strip()[:120]}'
                    )
                if not caption.strip():
                    raise PairSourceError(f"{where}: empty caption")
                image = (path.parent / image_name).resolve()
                if not image.is_file():
                    raise PairSourceError(f"{where}: image not found: {image}")
                default_id = image_name if "file_name" in row and "image" not in row else f"{path.name}:{number}"
                source_id = str(row.get("id", default_id))
                entries.append((image, caption.strip(), source_id, where))
        super().__init__(entries, {"kind": kind, "path": str(path.resolve())})


class ParquetPairs:
    """A Parquet file with columns ``image`` and ``caption`` (optional ``id``). ``image`` holds
    a path (relative to the file's folder), encoded image bytes, or a ``{bytes, path}`` struct
    (the Hugging Face datasets layout). Needs pyarrow (``pip install '.[parquet]'``).

    Captions are read and checked up front; images are read one row group at a time.
    """

    def __init__(self, path: Path):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise PairSourceError(f"{path}: reading Parquet needs pyarrow; pip install '.[parquet]'") from exc
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except (OSError, ValueError) as exc:
            raise PairSourceError(f"{self.path}: not a readable Parquet file ({exc})") from exc
        names = self._file.schema_arrow.names
        if "image" not in names or "caption" not in names:
            raise PairSourceError(f"{self.path}: expected columns 'image' and 'caption', found {names}")
        columns = ["caption"] + (["id"] if "id" in names else [])
        table = self._file.read(columns=columns)
        self.captions = table.column("caption").to_pylist()
        for row, text in enumerate(self.captions):
            if not isinstance(text, str) or not text.strip():
                raise PairSourceError(f"{self.path}: row {row}: caption must be a non-empty string, got {text!r}")
        self.captions = [c.strip() for c in self.captions]
        ids = table.column("id").to_pylist() if "id" in names else range(len(self.captions))
        self.ids = [f"{self.path.name}:{i}" if "id" not in names else str(i) for i in ids]
        if not self.captions:
            raise PairSourceError(f"{self.path}: no rows")
        metadata = self._file.metadata
        self._group_starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        self._cached: tuple[int, list] | None = None
        digest = hashlib.sha256("\n".join(self.captions).encode())
        self.description = {"kind": "parquet", "path": str(self.path.resolve()), "n": len(self.captions), "captions_sha256": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self.captions)

    def _images_of_group(self, group: int) -> list:
        if self._cached is None or self._cached[0] != group:
            self._cached = (group, self._file.read_row_group(group, columns=["image"]).column("image").to_pylist())
        return self._cached[1]

    def _image(self, row: int, size: tuple[int, int]) -> np.ndarray:
        group = int(np.searchsorted(self._group_starts, row, side="right") - 1)
        value = self._images_of_group(group)[row - self._group_starts[group]]
        where = f"{self.path}: row {row}"
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            image_path = (self.path.parent / value).resolve()
            if not image_path.is_file():
                raise PairSourceError(f"{where}: image not found: {image_path}")
            return _load_image(image_path, size, where)
        if isinstance(value, (bytes, bytearray)):
            try:
                with Image.open(io.BytesIO(value)) as image:
                    return fit_image(image, size)
            except (OSError, UnidentifiedImageError) as exc:
                raise PairSourceError(f"{where}: cannot decode the image bytes: {exc}") from exc
        raise PairSourceError(f"{where}: image must be a path, bytes or {{bytes, path}}, got {type(value).__name__}")

    def read(self, start: int, stop: int, size: tuple[int, int]) -> PairBatch:
        images = np.stack([self._image(row, size) for row in range(start, stop)])
        return PairBatch(images, self.captions[start:stop], self.ids[start:stop])


def open_pairs(path: str | Path):
    """A folder of images + .txt captions, a Hugging Face imagefolder (a folder with a
    ``metadata.jsonl``), a ``.jsonl`` file, or a ``.parquet`` file."""
    path = Path(path)
    if path.is_dir():
        if (path / IMAGEFOLDER_METADATA).is_file():
            return JsonlPairs(path / IMAGEFOLDER_METADATA, kind="imagefolder")
        return FolderPairs(path)
    if not path.is_file():
        raise PairSourceError(f"pairs not found: {path} (expected a folder of images + .txt captions, or a .jsonl file)")
    if path.suffix.lower() in (".jsonl", ".json"):
        return JsonlPairs(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return ParquetPairs(path)
    raise PairSourceError(f"{path}: unsupported pairs file; expected a folder, a .jsonl or a .parquet file")
