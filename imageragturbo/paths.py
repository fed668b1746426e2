"""Where things live on disk: the bundled model and the packaged training configs.

The bundled model (``models/shapes-v2``, 74 MB) lives in the repository, not in the wheel. The
default model is found in this order (:func:`default_model_dir`):

1. ``IRT_MODEL`` (a model folder or a Hugging Face repo id in the local cache);
2. the checkout this package runs from (an editable install: ``<repo>/models/shapes-v2``);
3. ``./models/shapes-v2`` (a wheel installed elsewhere, run from the root of a checkout);

else there is none, and loading it fails with :func:`missing_model_hint`'s advice.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = PACKAGE_DIR.parent / "models" / "shapes-v2"
"""The shapes-world model that ships with the repository (``make world`` reproduces it)."""
TRAINING_CONFIGS = PACKAGE_DIR / "training" / "configs"
"""Every training stage's default config file."""


MODEL_ENV = "IRT_MODEL"
BUNDLED_RELATIVE = Path("models") / "shapes-v2"


def _is_model(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def default_model_dir() -> Path:
    """``IRT_MODEL``, else the bundled model of the checkout this package runs from, else
    ``./models/shapes-v2`` when the current folder is a checkout holding it; else the
    checkout location (missing: the loader's error then says how to set ``IRT_MODEL``)."""
    if os.environ.get(MODEL_ENV, "").strip():
        return Path(os.environ[MODEL_ENV].strip())
    for candidate in (BUNDLED_MODEL, Path.cwd() / BUNDLED_RELATIVE):
        if _is_model(candidate):
            return candidate
    return BUNDLED_MODEL


def missing_model_hint(path: Path) -> str:
    """What to tell a user whose model folder ``path`` does not exist."""
    env = os.environ.get(MODEL_ENV, "").strip()
    if env and Path(path) == Path(env):
        return f" (from {MODEL_ENV}={env}; point it at a model folder or a Hugging Face repo id in the local cache)"
    if Path(path) == BUNDLED_MODEL and not _is_model(BUNDLED_MODEL):
        return (
            " (no --model, no IRT_MODEL, and the bundled model is not part of an installed wheel: pass --model DIR, or set "
            f"{MODEL_ENV}=/path/to/models/shapes-v2 (a checkout's; `make world` rebuilds it), or run from the "
            "root of a checkout; a Hugging Face repo id in the local cache works too)"
        )
    return f" (pass --model DIR or set {MODEL_ENV}; a Hugging Face repo id in the local cache works too)"


def bundled_model_if_present() -> Path | None:
    """The bundled model when it has been trained (``make world``), else None."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "model_index.json").is_file() else None
