"""System programs some service tests need (promtool, Chromium, docker-compose), installed by
the test set-up from Debian's packages when missing, because CI starts from a fresh machine with
only `make test`.

Each ``ensure_*`` returns the program's path, or raises ``ToolUnavailable`` with the reason
(not root, no apt-get, the package could not be had); the fixtures turn that into a skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imageragturbo-test-tools"
APT_TIMEOUT_S = 900
_apt_updated = False


class ToolUnavailable(Exception):
    pass


@contextmanager
def _lock():
    """One installer at a time (pytest-xdist workers, or two test sessions)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], cwd: Path | None = None) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolUnavailable(f"`{' '.join(command)}` failed: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ToolUnavailable(f"`{' '.join(command)}` exited {done.returncode}: {' / '.join(tail)}")


def _apt_ready() -> None:
    if shutil.which("apt-get") is None:
        raise ToolUnavailable("apt-get is not available (not a Debian system)")
    if os.geteuid() != 0:
        raise ToolUnavailable("installing Debian packages needs root")
    global _apt_updated
    if not _apt_updated:
        # Package lists go stale (and a fresh image may have none): refresh once per session.
        _run(["apt-get", "update", "-qq"])
        _apt_updated = True


def ensure_apt_binary(binary: str, package: str) -> str:
    """``binary`` on PATH, installing Debian's ``package`` (no recommends) if needed."""
    found = shutil.which(binary)
    if found:
        return found
    with _lock():
        found = shutil.which(binary)
        if found:
            return found
        _apt_ready()
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package])
    found = shutil.which(binary)
    if not found:
        raise ToolUnavailable(f"installed {package} but {binary} is still not on PATH")
    return found


def ensure_promtool() -> str:
    """promtool from Debian's `prometheus` package, unpacked into a cache folder rather than
    installed: installing the package would also set up (and on some systems start) the
    Prometheus daemon, which a test has no business running."""
    found = shutil.which("promtool")
    if found:
        return found
    target = CACHE / "prometheus" / "usr" / "bin" / "promtool"
    if target.exists():
        return str(target)
    with _lock():
        if target.exists():
            return str(target)
        _apt_ready()
        download = CACHE / "download"
        shutil.rmtree(download, ignore_errors=True)
        download.mkdir(parents=True)
        # apt's sandbox user cannot write to a root-owned cache folder; that is only a warning.
        _run(["apt-get", "download", "prometheus"], cwd=download)
        debs = sorted(download.glob("prometheus_*.deb"))
        if not debs:
            raise ToolUnavailable("apt-get download prometheus produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(CACHE / "prometheus")])
        shutil.rmtree(download, ignore_errors=True)
    if not target.exists():
        raise ToolUnavailable(f"the prometheus package has no {target.relative_to(CACHE / 'prometheus')}")
    return str(target)


def ensure_chromium() -> str:
    return ensure_apt_binary("chromium", "chromium")


def ensure_docker_compose() -> list[str]:
    """A Compose implementation that can run `config` offline: the docker CLI's plugin if it is
    there, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    return [ensure_apt_binary("docker-compose", "docker-compose")]
