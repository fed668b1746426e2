"""A synthetic retrieval database of any size with a model's real row shapes, for latency at
true scale: random unit keys (1024-d for SD-Turbo), random H-features (1280x8x8), zero latents,
written by the ordinary database build (manifest, checksums, searcher) and tied to the model's
identity, so ``serve`` and ``bench latency`` load it like a real one. Retrieval latency depends
on the shapes and the row count, not on what the rows hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from imageragturbo.retrieval.build import BuildResult, build_database
from imageragturbo.retrieval.pairs import PairBatch

CAPTION = "synthetic pair {}"


def model_row_shapes(model_dir: Path) -> dict:
    """The row shapes of ``model_dir``'s databases, from its configs alone (no weights read)."""
    text = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    size = unet["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    blocks = unet["block_out_channels"]
    down = 2 ** (len(blocks) - 1)
    key_dim = text.get("projection_dim") if "WithProjection" in "".join(text.get("architectures", [])) else text["hidden_size"]
    return {
        "key_dim": int(key_dim),
        "latent": (int(unet["in_channels"]), int(h), int(w)),
        "h": (int(blocks[-1]), -(-int(h) // down), -(-int(w) // down)),
    }


class SyntheticPairs:
    """``n`` placeholder pairs (blank images; the captions carry the row number)."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"a synthetic database needs at least 1 row, got {n}")
        self.n, self.seed = n, seed
        self.description = {"kind": "synthetic", "n": n, "seed": seed}

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int, size: tuple[int, int]) -> PairBatch:
        ids = [str(i) for i in range(start, stop)]
        # One shared blank row: the synthetic encoder never looks at the pixels.
        images = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (stop - start, size[0], size[1], 3))
        return PairBatch(images, [CAPTION.format(i) for i in ids], ids)


class SyntheticRows:
    """A :class:`~imageragturbo.retrieval.protocols.RowEncoder` that draws each row from its
    row number: a random unit key and a random H-feature of the model's shapes."""

    def __init__(self, model_dir: Path, model_id: str, seed: int = 0):
        self.model_dir, self.model_id, self.seed = Path(model_dir), model_id, seed
        self.shapes = model_row_shapes(self.model_dir)
        self.latent_shape = self.shapes["latent"]

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """Zero latents at SD's VAE factor of 8 (what the build's pixel-size probe reads)."""
        return torch.zeros(len(images), self.latent_shape[0], images.shape[1] // 8, images.shape[2] // 8)

    def encode_database_rows(self, z0: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        keys, features = [], []
        for caption in captions:
            rng = np.random.default_rng([self.seed, int(caption.rsplit(" ", 1)[1])])
            key = rng.standard_normal(self.shapes["key_dim"], dtype=np.float32)
            keys.append(key / np.linalg.norm(key))
            features.append(rng.standard_normal(self.shapes["h"], dtype=np.float32))
        return torch.from_numpy(np.stack(keys)), torch.from_numpy(np.stack(features))


def build_synthetic_database(model_dir: str | Path, n: int, out: str | Path, *, searcher: str = "auto",
                             seed: int = 0, overwrite: bool = False, progress: bool = True) -> BuildResult:
    """Write a synthetic database of ``n`` rows for ``model_dir`` at ``out``."""
    from imageragturbo.model.loading import model_identity

    model_dir = Path(model_dir)
    encoder = SyntheticRows(model_dir, model_identity(model_dir), seed)
    return build_database(encoder, SyntheticPairs(n, seed), out, searcher=searcher, overwrite=overwrite,
                          progress=progress, batch_size=256)
