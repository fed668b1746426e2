"""Fixtures the retrieval tests share: a tiny model with a random adapter."""

import pytest
import torch

from imageragturbo.model import HSpaceAdapter, RagTurboPipeline, load_model


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """The tiny model with an adapter whose output is far from zero (so H-features matter)."""
    parts = load_model(tiny_model_dir)
    torch.manual_seed(0)
    parts.adapter = HSpaceAdapter(channels=parts.unet.config.block_out_channels[-1], num_heads=4).eval()
    torch.nn.init.normal_(parts.adapter.proj_out.weight, std=0.2)
    return RagTurboPipeline(parts)
