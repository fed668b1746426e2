from pathlib import Path

import pytest
from tiny_engines import save_adapter
from tiny_models import build_tiny_model_dir

from imageragturbo.engines import export_model, load_pipeline_engines
from imageragturbo.model import load_model


@pytest.fixture(scope="session")
def adapter_model_dir(tmp_path_factory) -> Path:
    """A small model for engine tests: the SD-like two-level UNet (fewer nodes than the
    three-level one, so ONNX Runtime sessions load fast), v-prediction (one-step images are
    not saturated, so pixel comparisons mean something), the tiny VAE, and an adapter/."""
    model_dir = build_tiny_model_dir(
        tmp_path_factory.mktemp("engines") / "model", unet="sd_like", vae="tiny", prediction_type="v_prediction"
    )
    save_adapter(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def exported(adapter_model_dir, tmp_path_factory):
    """(components, export dir): every graph of the adapter model, exported once per session."""
    components = load_model(adapter_model_dir)
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_model(components, out)
    return components, out


@pytest.fixture(scope="session")
def ort_engines(exported):
    """ONNX Runtime engines for every exported graph (1 thread), loaded once."""
    components, out = exported
    return load_pipeline_engines("onnxruntime", out, components, threads=1)
