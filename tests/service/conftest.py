import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serving import build_tiny_pipeline  # noqa: E402
from system_tools import ToolUnavailable, ensure_chromium, ensure_docker_compose, ensure_promtool  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """Tiny SD-like model with a (random, non-zero) adapter and a six-entry database 'shapes'."""
    return build_tiny_pipeline(tiny_model_dir)


@pytest.fixture(scope="session")
def bare_pipe(tiny_model_dir):
    """The same model without adapter or database: only mode 'off' can run."""
    return build_tiny_pipeline(tiny_model_dir, adapter=False, database=False)


def _tool(ensure, what: str):
    try:
        return ensure()
    except ToolUnavailable as exc:
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool(ensure_promtool, "promtool (Debian package prometheus)")


@pytest.fixture(scope="session")
def chromium() -> str:
    return _tool(ensure_chromium, "Chromium (Debian package chromium)")


@pytest.fixture(scope="session")
def compose_command() -> list[str]:
    return _tool(ensure_docker_compose, "docker compose / docker-compose")
