"""The training runs `imageragturbo train NAME` starts, and how one is started.

This module imports no torch (the CLI lists the runs in its ``--help``); each run's module is
imported when the run starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from imageragturbo.errors import ConfigError


@dataclass(frozen=True)
class Run:
    module: str
    """Has ``main(config_path, out_dir, steps=None, resume=False, **overrides)``."""
    config_class: str
    """The module's config dataclass (read with training.checkpoints.config_from_json)."""
    config: str
    """Default config file in the package's configs/."""
    help: str


RUNS = {
    "vae": Run("imageragturbo.training.pretrain_vae", "VaeConfig", "vae.json", "shapes-world AutoencoderKL (32x32x3 <-> 8x8x4)"),
    "clip": Run("imageragturbo.training.pretrain_clip", "ClipConfig", "clip.json", "tiny contrastive CLIP: text encoder + image tower"),
    "teacher": Run("imageragturbo.training.pretrain_teacher", "TeacherConfig", "teacher.json", "the multi-step teacher UNet"),
    "student": Run("imageragturbo.training.ladd", "LaddConfig", "ladd_student_shapes.json",
                   "distil the teacher into a one-step student (LADD)"),
    "adapter": Run("imageragturbo.training.ladd", "LaddConfig", "ladd_adapter_shapes.json",
                   "train the H-space adapter + decoder LoRA (LADD)"),
}
LADD_RUNS = ("student", "adapter")
"""The runs that start from a model directory and can install into it."""


def read_config(name: str, path: Path):
    """Run ``name``'s config from ``path``; ConfigError names the file and what is wrong with it."""
    from imageragturbo.training.checkpoints import config_from_json

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    module = importlib.import_module(RUNS[name].module)
    try:
        return config_from_json(getattr(module, RUNS[name].config_class), path)
    except ValueError as exc:  # malformed JSON, or keys the config does not have
        raise ConfigError(f"{path}: {exc}") from exc


def train(name: str, config: Path, out: Path, *, steps: int | None = None, resume: bool = False,
          model_dir: Path | None = None, install: bool = False):
    """Start (or with ``resume`` continue) run ``name`` into ``out``. For the LADD runs,
    ``model_dir`` overrides the config's, and ``install`` puts the trained parts into that
    model directory (student: unet/ + teacher/; adapter: adapter/ + unet_lora/)."""
    loaded = read_config(name, config)
    kwargs = {}
    if name in LADD_RUNS:
        target = model_dir or Path(loaded.model_dir)
        kwargs = {"model_dir": str(model_dir) if model_dir else None, "install_into": target if install else None}
    return importlib.import_module(RUNS[name].module).main(config, out, steps=steps, resume=resume, **kwargs)
