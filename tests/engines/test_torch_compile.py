"""The torch-compile engine: static batch buckets (padding in, slicing out, chunks over the
largest bucket), equal to the eager module, and loaded like the other engines. Compiled with
the ``eager`` backend here (inductor's C++ compile takes minutes on this machine; the GPU
check runs the real thing)."""

import numpy as np
import pytest
import torch

from imageragturbo.engines.graphs import GraphSpec, TensorSpec, TorchGraph
from imageragturbo.engines.pipeline_engines import load_pipeline_engines
from imageragturbo.engines.protocol import ENGINE_KINDS, EngineLoadError
from imageragturbo.engines.torch_compile_engine import TorchCompileEngine
from imageragturbo.model import load_model


class _Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, t):
        return self.linear(x) + t[:, None].float()


def _graph():
    torch.manual_seed(0)
    spec = GraphSpec("affine", (TensorSpec("x", "float32", ("batch", 4)), TensorSpec("t", "int64", ("batch",))),
                     (TensorSpec("y", "float32", ("batch", 3)),))
    return TorchGraph(spec, _Affine().eval())


def test_batches_run_padded_to_their_bucket_and_equal_the_eager_module():
    graph = _graph()
    engine = TorchCompileEngine(graph, backend="eager", buckets=(1, 2, 4))
    assert [engine.bucket(b) for b in (1, 2, 3, 4, 9)] == [1, 2, 4, 4, 4]
    rng = np.random.default_rng(0)
    for batch in (1, 3, 9):  # 9: chunks of the largest bucket (4, 4) and one of 1
        x, t = rng.normal(size=(batch, 4)).astype(np.float32), np.arange(batch, dtype=np.int64)
        got = engine.run({"x": x, "t": t})["y"]
        with torch.inference_mode():
            want = graph.module(torch.from_numpy(x), torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert got.shape == (batch, 3)


def test_bad_buckets_and_inputs_are_refused():
    with pytest.raises(EngineLoadError, match="increasing positive"):
        TorchCompileEngine(_graph(), backend="eager", buckets=(4, 2))
    engine = TorchCompileEngine(_graph(), backend="eager")
    with pytest.raises(ValueError, match="takes inputs"):
        engine.run({"x": np.zeros((1, 4), np.float32)})


def test_the_pipeline_loads_it_like_the_other_engines(tiny_model_dir):
    assert "torch-compile" in ENGINE_KINDS
    components = load_model(tiny_model_dir)
    engines = load_pipeline_engines("torch-compile", None, components, graphs=("text_encoder", "denoise_off", "vae_decode"),
                                    backend="eager", buckets=(1, 2))
    assert {type(e).__name__ for e in engines.engines.values()} == {"TorchCompileEngine"}
    latent = components.unet.config
    z0 = torch.randn(3, latent.out_channels, latent.sample_size, latent.sample_size)
    from imageragturbo.model.pipeline import decode_latents

    with torch.inference_mode():
        want = decode_latents(components.vae, z0)
    torch.testing.assert_close(engines.vae_decode(z0), want, rtol=0, atol=1e-5)
