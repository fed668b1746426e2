"""Where things live on disk: the bundled model and the packaged training configs."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = PACKAGE_DIR.parent / "models" / "shapes-v2"
"""The shapes-world model that ships with the repository (``make world`` reproduces it)."""
TRAINING_CONFIGS = PACKAGE_DIR / "training" / "configs"
"""Every training stage's default config file."""


def default_model_dir() -> Path:
    """``IRT_MODEL``, else the bundled shapes-world model."""
    return Path(os.environ.get("IRT_MODEL", BUNDLED_MODEL))


def bundled_model_if_present() -> Path | None:
    """The bundled model when it has been trained (``make world``), else None."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "model_index.json").is_file() else None
