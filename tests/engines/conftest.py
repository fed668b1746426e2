import shutil
from pathlib import Path

import pytest
from tiny_engines import save_adapter

from imageragturbo.engines import export_model
from imageragturbo.model import load_model


@pytest.fixture(scope="session")
def adapter_model_dir(tiny_v_model_dir, tmp_path_factory) -> Path:
    """The tiny v-prediction model (three-level UNet, tiny VAE) plus an adapter/ folder."""
    model_dir = tmp_path_factory.mktemp("engines") / "model"
    shutil.copytree(tiny_v_model_dir, model_dir)
    save_adapter(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def exported(adapter_model_dir, tmp_path_factory):
    """(components, export dir): every graph of the adapter model, exported once per session."""
    components = load_model(adapter_model_dir)
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_model(components, out)
    return components, out
