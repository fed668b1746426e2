"""--device / --dtype on every command that runs a model, IRT_DEVICE / IRT_DTYPE, and the
errors on a machine without CUDA."""

import numpy as np
import pytest
import torch

from imageragturbo.cli import main
from imageragturbo.cli.main import build_parser
from imageragturbo.cli.options import DTYPE_NAMES
from imageragturbo.engines.pipeline_engines import default_ort_provider
from imageragturbo.errors import ConfigError
from imageragturbo.model.device import DTYPES, resolve_device, resolve_dtype
from imageragturbo.model.pipeline import open_pipeline

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_the_cli_lists_the_dtypes_the_library_accepts():
    assert DTYPE_NAMES == tuple(DTYPES)


def test_explicit_then_environment_then_cpu_float32(monkeypatch):
    monkeypatch.delenv("IRT_DEVICE", raising=False)
    monkeypatch.delenv("IRT_DTYPE", raising=False)
    assert resolve_device() == torch.device("cpu") and resolve_dtype() is torch.float32
    monkeypatch.setenv("IRT_DTYPE", "bfloat16")
    assert resolve_dtype() is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "CPU", "cuda:-1"])
def test_malformed_devices_and_dtypes_are_named(bad):
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N"):
        resolve_device(bad)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        resolve_dtype("half")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_one_line(device, tiny_v_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="this machine has no CUDA device"):
        resolve_device(device)
    out = tmp_path / "x.png"
    code = main(["generate", "a red circle", "--mode", "off", "--model", str(tiny_v_model_dir), "--out", str(out),
                 "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and "this machine has no CUDA device" in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("argv", [
    ["serve"], ["generate", "x", "--out", "x.png"], ["build-database", "--out", "d", "--world", "8"],
    ["export", "--out", "e"], ["eval", "fidelity", "--json", "x.json"], ["eval", "table"],
    ["eval", "probe"], ["bench", "latency", "--json", "x.json"], ["bench", "service", "--json", "x.json"], ["bench", "soak"],
])
def test_every_command_that_runs_a_model_takes_device_and_dtype(argv):
    args = build_parser().parse_args([*argv, "--device", "cuda:0"])
    assert args.device == "cuda:0"
    if argv[0] != "export":  # export traces float32 graphs (TensorRT builds fp16 from them)
        assert build_parser().parse_args([*argv, "--dtype", "bfloat16"]).dtype == "bfloat16"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_on_the_cpu(tiny_v_model_dir, dtype):
    pipe = open_pipeline(tiny_v_model_dir, databases=[], dtype=dtype)
    assert pipe.dtype is DTYPES[dtype] and pipe.components.text_encoder.dtype is DTYPES[dtype]
    result = pipe(["a red circle", "two blue squares"], [1, 2], mode="off")
    assert result.images.dtype == np.uint8 and result.images.shape[0] == 2
    reference = open_pipeline(tiny_v_model_dir, databases=[])(["a red circle"], [1], mode="off")
    # half precision draws the same picture, to within its rounding
    assert np.abs(result.images[0].astype(int) - reference.images[0].astype(int)).mean() < 8


def test_the_cli_flags_reach_the_pipeline(tiny_v_model_dir, tmp_path, monkeypatch):
    from imageragturbo.model import pipeline as pipeline_module

    monkeypatch.delenv("IRT_DEVICE", raising=False)
    monkeypatch.delenv("IRT_DTYPE", raising=False)
    seen = []
    real = pipeline_module.open_pipeline

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        seen.append(pipe.dtype)
        return pipe

    monkeypatch.setattr(pipeline_module, "open_pipeline", spy)
    assert main(["generate", "a red circle", "--mode", "off", "--model", str(tiny_v_model_dir),
                 "--out", str(tmp_path / "x.png"), "--dtype", "bfloat16"]) == 0
    assert seen == [torch.bfloat16]


def test_onnxruntime_takes_the_cpu_provider_on_the_cpu():
    assert default_ort_provider(torch.device("cpu")) == "cpu"


def test_the_server_takes_irt_device_and_irt_dtype(tiny_v_model_dir, monkeypatch):
    from imageragturbo.model import pipeline as pipeline_module
    from imageragturbo.service import serve as serve_module

    monkeypatch.setenv("IRT_DTYPE", "bfloat16")
    monkeypatch.setenv("IRT_DEVICE", "cpu")
    seen = []
    monkeypatch.setattr(pipeline_module, "open_pipeline", lambda *a, **kw: seen.append(kw) or 1 / 0)
    # serve ends an unforeseen failure in one line (ServeFailedError) naming what was raised.
    with pytest.raises(serve_module.ServeFailedError, match="ZeroDivisionError"):
        serve_module.serve(tiny_v_model_dir)
    assert (seen[0]["device"], seen[0]["dtype"]) == ("cpu", "bfloat16")
    monkeypatch.setenv("IRT_DTYPE", "half")
    with pytest.raises(ConfigError, match="dtype"):
        serve_module.serve(tiny_v_model_dir)
