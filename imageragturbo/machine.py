"""What a measurement ran on: one description of the machine for every report.

The benchmarks (``bench latency``, ``bench retrieval``, ``bench service``) and the fidelity
table each record the machine next to their numbers. They keep their own JSON field names
(tools and tests read them), listed here by :func:`latency_fields`, :func:`retrieval_fields`
and :func:`service_fields`; what the fields hold comes from :func:`describe_machine`.
On a shared machine the load average and the process's niceness belong to the record:
they say how far a timing is from an idle core's.
"""

from __future__ import annotations

import importlib
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, rounded to 0.01 (None where the OS has none)."""
    if not hasattr(os, "getloadavg"):
        return None
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def niceness() -> int | None:
    """This process's nice value: read when a run ends too, as the workplace may renice jobs."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return None


def ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def package_version(module: str) -> str | None:
    """``module.__version__``; ``"installed"`` when it has none; None when it cannot be imported."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return None
    return str(getattr(imported, "__version__", "installed"))


@dataclass(frozen=True)
class Machine:
    """A snapshot of the machine and its load, taken by :func:`describe_machine`."""

    cpu: str
    logical_cores: int | None
    ram_gib: float | None
    system: str
    platform: str
    python: str
    load_avg: tuple[float, float, float] | None
    nice: int | None
    date: str
    versions: dict[str, str | None] = field(default_factory=dict)
    gpu: str | None = None

    def summary(self) -> str:
        """One line, e.g. ``AMD EPYC 7B13, 2 cores, Linux, torch 2.13.0+cpu (CPU)``."""
        torch_version = self.versions.get("torch")
        torch_part = f", torch {torch_version} ({self.gpu or 'CPU'})" if torch_version else ""
        return f"{self.cpu}, {self.logical_cores} cores, {self.system}{torch_part}"


def describe_machine(packages: Sequence[str] = (), *, gpu: bool = False) -> Machine:
    """The machine now: CPU, cores, RAM, OS, Python, load, niceness, date, and the versions of
    ``packages`` (module names; None for those not installed). ``gpu`` asks torch for the
    first CUDA device's name (it imports torch)."""
    gpu_name = None
    if gpu:
        import torch

        gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(
        cpu=cpu_model(),
        logical_cores=os.cpu_count(),
        ram_gib=ram_gib(),
        system=platform.system(),
        platform=platform.platform(),
        python=platform.python_version(),
        load_avg=load_average(),
        nice=niceness(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        versions={module: package_version(module) for module in packages},
        gpu=gpu_name,
    )


# -- each report's fields ----------------------------------------------------------------------


def latency_fields(threads: int | None) -> dict:
    """``bench latency``'s machine record (results/latency.md reads it), the load at the start included."""
    m = describe_machine(("torch", "onnxruntime"), gpu=True)
    return {
        "cpu": m.cpu,
        "logical_cores": m.logical_cores,
        "threads": threads,
        "platform": m.platform,
        "python": m.python,
        "torch": m.versions["torch"],
        "onnxruntime": m.versions["onnxruntime"],
        "gpu": m.gpu,
        "date": m.date,
        "nice": m.nice,
        "load_avg_1m_at_start": m.load_avg[0] if m.load_avg else None,
    }


def retrieval_fields() -> dict:
    """``bench retrieval``'s machine record (results/retrieval.md reads it)."""
    m = describe_machine(("numpy", "scann", "faiss", "hnswlib"))
    return {
        "cpu": m.cpu,
        "cores": m.logical_cores,
        "ram_gib": m.ram_gib,
        "python": m.python,
        "platform": m.platform,
        "versions": m.versions,
        "loadavg_start": m.load_avg,
    }


def service_fields() -> dict:
    """``bench service``'s machine record (results/service.md reads it)."""
    m = describe_machine()
    return {
        "cpu": m.cpu,
        "cores": m.logical_cores,
        "python": m.python,
        "load_avg_at_start": list(m.load_avg) if m.load_avg else None,
    }
