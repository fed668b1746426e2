"""Run configs and checkpoints shared by the shapes-world pretraining runs (VAE, CLIP, teacher).

A checkpoint is a directory ``<out>/checkpoints/step_XXXXXXXX/`` holding

- ``<name>.safetensors`` for every module of the run (weights, fp32),
- ``config.json``: the run's ``*Config`` plus the step, so a checkpoint says how it was made,
- ``optimizer.pt``: the optimizer's ``state_dict`` (tensors and numbers only; read back
  with ``torch.load(..., weights_only=True)``),
- ``state.json``: anything else the loop needs to continue (e.g. elapsed seconds).

It is written to a temporary directory and renamed into place, so a process killed while
saving never leaves a half checkpoint; the newest two are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

C = TypeVar("C")
KEEP_CHECKPOINTS = 2


def config_from_json(cls: type[C], path: str | Path | None, **overrides: Any) -> C:
    """Build a ``*Config`` dataclass from a JSON file plus keyword overrides.

    Unknown keys are refused (a typo in a config file must not be silently ignored);
    lists become tuples so configs stay hashable and compare equal after a round trip.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must hold a JSON object, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config {path}: unknown keys {unknown} for {cls.__name__} (known: {sorted(names)})")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**data)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A ``*Config`` as a JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a run is repeatable on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``<out>/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    config: Any,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> Path:
    """Write ``<out>/checkpoints/step_<step>`` atomically and drop all but the newest two."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        # contiguous() because safetensors refuses views (e.g. tied or transposed weights).
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "config.json").write_text(json.dumps({"config": config_to_dict(config), "step": step}, indent=2))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(out_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, Any]:
    """Load weights (and optimizer state) from a checkpoint directory; return its ``state.json``."""
    path = Path(path)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {file.name} for module {name!r}")
        module.load_state_dict(load_file(str(file)))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``min_ratio * base_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    # float(): a numpy scalar in the optimizer state would make torch.load(weights_only=True) refuse it.
    return float(base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * progress))))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] HWC -> float32 [B, 3, 32, 32] in [-1, 1] (diffusers' VAE range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
