"""ImageRAGTurbo: one-step text-to-image with retrieval blended into the UNet's H-space."""

__version__ = "0.1.0"
