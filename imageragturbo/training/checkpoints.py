"""Run configs and the one checkpoint format of every training run (VAE, CLIP, teacher, LADD).

A checkpoint is a directory ``<out>/checkpoints/step_XXXXXXXX/`` holding

- ``<name>.safetensors`` for every module of the run (weights, fp32); a module named in
  ``partial`` holds only its trainable parameters (an adapter run's frozen UNet is not saved),
- ``config.json``: the run's ``*Config`` plus the step, so a checkpoint says how it was made,
- ``optimizers.pt``: ``{name: state_dict}`` of every optimizer (tensors and numbers only; read
  back with ``torch.load(..., weights_only=True)``; a single ``optimizer.pt`` of older runs is
  read as ``{"optimizer": ...}``),
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

from imageragturbo.errors import ConfigError

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
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read it ({exc.strerror or exc})") from exc
        except ValueError as exc:
            raise ConfigError(f"config {path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a JSON object, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"config {path}: unknown keys {unknown} for {cls.__name__} (known: {sorted(names)})")
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


Optimizers = dict[str, torch.optim.Optimizer]


def _as_dict(optimizers: Optimizers | torch.optim.Optimizer | None) -> Optimizers:
    if optimizers is None:
        return {}
    return optimizers if isinstance(optimizers, dict) else {"optimizer": optimizers}


def _tensors(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    # contiguous() because safetensors refuses views (e.g. tied or transposed weights).
    if trainable_only:
        return {k: p.detach().cpu().contiguous() for k, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    config: Any,
    modules: dict[str, torch.nn.Module],
    optimizers: Optimizers | torch.optim.Optimizer | None,
    state: dict[str, Any],
    *,
    partial: frozenset[str] = frozenset(),
) -> Path:
    """Write ``<out>/checkpoints/step_<step>`` atomically and drop all but the newest two."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_tensors(module, name in partial), str(tmp / f"{name}.safetensors"))
    torch.save({name: opt.state_dict() for name, opt in _as_dict(optimizers).items()}, tmp / "optimizers.pt")
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
    optimizers: Optimizers | torch.optim.Optimizer | None,
    *,
    partial: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Load weights (and optimizer states) from a checkpoint directory; return its ``state.json``.

    A ``partial`` module's file must hold only parameters of that module (a subset is fine)."""
    path = Path(path)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {file.name} for module {name!r}")
        result = module.load_state_dict(load_file(str(file)), strict=name not in partial)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {file} has parameters this run does not train: {result.unexpected_keys[:5]}")
    wanted = _as_dict(optimizers)
    if wanted:
        legacy = path / "optimizer.pt"
        saved = (torch.load(path / "optimizers.pt", weights_only=True) if (path / "optimizers.pt").is_file()
                 else {"optimizer": torch.load(legacy, weights_only=True)})
        for name, opt in wanted.items():
            if name not in saved:
                raise FileNotFoundError(f"checkpoint {path} has no state for optimizer {name!r}")
            opt.load_state_dict(saved[name])
    return json.loads((path / "state.json").read_text())


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``min_ratio * base_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    # float(): a numpy scalar in the optimizer state would make torch.load(weights_only=True) refuse it.
    return float(base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * progress))))
