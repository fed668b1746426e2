import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model_dir  # noqa: E402

# The suite runs on 2 shared cores; one thread per test process keeps timings sane and
# results independent of the machine's core count.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny SD-Turbo-like model directory (epsilon prediction, Euler, AutoencoderKL)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory) -> Path:
    """A tiny shapes-world-like directory: v-prediction, zero-terminal-SNR DDIM, AutoencoderTiny."""
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("tiny_v_model"), unet="three_level", vae="tiny", prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def tiny_world_model(tmp_path_factory) -> Path:
    """A complete v2 model directory from the whole recipe at toy scale: style databases
    (dim, grey, bright), the style-target adapter and the no-retrieval control."""
    from tiny_world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(autouse=True, scope="session")
def _hermetic_cache_dir(tmp_path_factory):
    """Caches shared across runs (the teacher's samples) go to a folder of this test session."""
    import os

    previous = os.environ.get("IRT_CACHE_DIR")
    os.environ["IRT_CACHE_DIR"] = str(tmp_path_factory.mktemp("irt_cache"))
    yield
    if previous is None:
        os.environ.pop("IRT_CACHE_DIR", None)
    else:
        os.environ["IRT_CACHE_DIR"] = previous
