import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

from imageragturbo.engines import EngineLoadError, build_graphs, read_manifest
from imageragturbo.engines.tensorrt_engine import TrtBuildSpec, engine_cache_key, optimization_profiles

KEY_INPUTS = dict(
    onnx_sha256="a" * 64,
    trt_version="10.13.0.35",
    gpu_name="NVIDIA L40S",
    compute_capability=(8, 9),
    precision="fp16",
    profiles=[{"z_t": ((1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8))}],
    optimization_level=3,
)
CHANGED = dict(
    onnx_sha256="b" * 64,
    trt_version="10.14.1",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    precision="fp32",
    profiles=[{"z_t": ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8))}],
    optimization_level=5,
)


def test_cache_key_is_stable_and_changes_with_each_input():
    key = engine_cache_key(**KEY_INPUTS)
    assert key == engine_cache_key(**dict(KEY_INPUTS))
    seen = {key}
    for name, value in CHANGED.items():
        other = engine_cache_key(**{**KEY_INPUTS, name: value})
        assert other != key, f"the cache key ignores {name}"
        seen.add(other)
    assert len(seen) == len(CHANGED) + 1


def test_profiles_cover_each_batch_range_and_k(exported):
    _, out = exported
    spec = read_manifest(out).graphs["denoise_adapter"].spec
    build = TrtBuildSpec(batch_ranges=((1, 1, 1), (2, 4, 8)), k_range=(1, 4, 8))
    profiles = optimization_profiles(spec, build)
    assert len(profiles) == 2
    lo, opt, hi = profiles[1]["h_retr"]
    assert (lo[:2], opt[:2], hi[:2]) == ((2, 1), (4, 4), (8, 8))
    assert profiles[0]["z_t"][0] == profiles[0]["z_t"][2] == (1, *spec.inputs[0].shape[1:])
    inject = read_manifest(out).graphs["denoise_inject"].spec
    assert optimization_profiles(inject, build)[1]["h_retr"][2][:2] == (8, 1)  # inject's k is fixed at 1
    keys = {
        engine_cache_key(**{**KEY_INPUTS, "profiles": optimization_profiles(spec, b)})
        for b in (build, dataclasses.replace(build, k_range=(1, 2, 8)), dataclasses.replace(build, batch_ranges=((1, 1, 2),)))
    }
    assert len(keys) == 3


def test_build_spec_refuses_bad_values():
    with pytest.raises(ValueError, match="precision must be one of"):
        TrtBuildSpec(precision="int4")
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        TrtBuildSpec(batch_ranges=((2, 1, 4),))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_without_tensorrt_or_gpu_the_engine_says_why(exported, tmp_path):
    from imageragturbo.engines import load_pipeline_engines

    components, out = exported
    with pytest.raises(EngineLoadError, match="tensorrt|CUDA GPU"):
        load_pipeline_engines("tensorrt", out, components, cache_dir=tmp_path)


def _rel_err(got, ref):
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-6))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs the tensorrt package")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_matches_torch_and_reuses_its_cache(exported, tmp_path, cuda_graph):
    from imageragturbo.engines import TorchEngine
    from imageragturbo.engines.tensorrt_engine import TrtEngine

    components, out = exported
    manifest = read_manifest(out)
    graphs = build_graphs(components)
    build = TrtBuildSpec(batch_ranges=((1, 1, 1), (2, 2, 4)), k_range=(1, 4, 4), optimization_level=2)
    for name, entry in manifest.graphs.items():
        engine = TrtEngine(out / entry.file, entry.spec, entry.sha256, tmp_path, build=build, cuda_graph=cuda_graph)
        plans = sorted(tmp_path.glob(f"{name}-*.plan"))
        assert len(plans) == 1
        for batch, k in ((1, 4), (3, 2), (3, 2)):  # the repeat replays a captured graph
            inputs = entry.spec.example_inputs({"batch": batch, "k": k}, seed=batch)
            ref = TorchEngine(graphs[name]).run(inputs)
            got = engine.run(inputs)
            for key in ref:
                assert _rel_err(got[key], ref[key]) <= 2e-2, (name, key)  # fp16
        mtime = plans[0].stat().st_mtime_ns
        TrtEngine(out / entry.file, entry.spec, entry.sha256, tmp_path, build=build)
        assert plans[0].stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs the tensorrt package")
def test_tensorrt_pipeline_generates_like_torch(exported, tmp_path):
    from tiny_engines import in_memory_database

    from imageragturbo.engines import load_pipeline_engines
    from imageragturbo.model import RagTurboPipeline

    components, out = exported
    torch_pipe = RagTurboPipeline(components)
    torch_pipe.add_database(in_memory_database(torch_pipe))
    trt_pipe = RagTurboPipeline(components, list(torch_pipe.databases.values()),
                                engines=load_pipeline_engines("tensorrt", out, components, cache_dir=tmp_path))
    for mode in ("off", "adapter", "inject"):
        ref = torch_pipe(["a red circle"], [4], mode=mode)
        got = trt_pipe(["a red circle"], [4], mode=mode)
        assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 4, mode  # fp16
