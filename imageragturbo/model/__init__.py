"""Model loading, the split UNet, the H-space adapter, injection and the one-step pipeline."""

from imageragturbo.model.adapter import HSpaceAdapter
from imageragturbo.model.injection import slerp_inject
from imageragturbo.model.loading import ModelComponents, ModelLoadError, load_model
from imageragturbo.model.pipeline import (
    GenerationResult,
    RagTurboPipeline,
    few_step_timesteps,
)
from imageragturbo.model.unet_split import SplitUNet, UNetEncoding

__all__ = [
    "GenerationResult",
    "HSpaceAdapter",
    "ModelComponents",
    "ModelLoadError",
    "RagTurboPipeline",
    "SplitUNet",
    "UNetEncoding",
    "few_step_timesteps",
    "load_model",
    "slerp_inject",
]
