"""Helpers for the engine tests: an adapter for a tiny model dir, an in-memory database."""

from pathlib import Path

import numpy as np
import torch

from imageragturbo.retrieval import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
from imageragturbo.model import HSpaceAdapter, RagTurboPipeline, load_model

CAPTIONS = ["a red circle on the left", "two blue squares", "a green triangle at the top", "three red circles"]


def save_adapter(model_dir: Path, seed: int = 0) -> None:
    """A 'trained' adapter (non-zero output projection, so it changes the image) in <model>/adapter."""
    unet_channels = load_model(model_dir).unet.config.block_out_channels[-1]
    torch.manual_seed(seed)
    adapter = HSpaceAdapter(channels=unet_channels, num_heads=4).eval()
    torch.nn.init.normal_(adapter.proj_out.weight, std=0.2)
    adapter.save_pretrained(model_dir / "adapter")


def in_memory_database(pipe: RagTurboPipeline, name: str = "db") -> RetrievalDatabase:
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(len(CAPTIONS), *pipe.latent_shape, generator=gen)
    e, h = pipe.encode_database_rows(z0, CAPTIONS)
    store = InMemoryFeatureStore(e.numpy(), h.numpy().astype(np.float16), CAPTIONS, pipe.components.model_id)
    return RetrievalDatabase(name, ExactSearcher(e.numpy()), store)
