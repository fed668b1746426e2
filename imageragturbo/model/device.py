"""Where and in what precision a pipeline runs: ``--device`` / ``--dtype``, ``IRT_DEVICE`` / ``IRT_DTYPE``.

One rule for every command and the server: the explicit argument, else the ``IRT_*``
variable, else ``cpu`` / ``float32``. A device this machine does not have is a one-line
:class:`~imageragturbo.errors.ConfigError`, never a CUDA traceback deep inside a load.
"""

from __future__ import annotations

import os
import re

import torch

from imageragturbo.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (None: ``IRT_DEVICE``, else ``cpu``), checked against
    this machine."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name or os.environ.get("IRT_DEVICE") or "cpu"
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: this machine has no CUDA device (torch.cuda.is_available() is False; "
                              f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def resolve_dtype(name: str | torch.dtype | None = None) -> torch.dtype:
    """``float32``, ``float16`` or ``bfloat16`` (None: ``IRT_DTYPE``, else ``float32``)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {name}")
        return name
    name = name or os.environ.get("IRT_DTYPE") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
