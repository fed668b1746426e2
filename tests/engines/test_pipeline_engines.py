import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_engines import in_memory_database

from imageragturbo.cli import main
from imageragturbo.engines import EngineLoadError, OrtEngine, PipelineEngines, load_pipeline_engines, read_manifest
from imageragturbo.model import RagTurboPipeline

PROMPTS = ["a red circle", "two blue squares on the right", "a yellow square above a purple triangle"]


@pytest.fixture(scope="module")
def pipes(exported, ort_engines):
    """(torch pipeline, onnxruntime pipeline) over the same components and database."""
    components, _ = exported
    torch_pipe = RagTurboPipeline(components)
    database = in_memory_database(torch_pipe)
    torch_pipe.add_database(database)
    ort_pipe = RagTurboPipeline(components, [database], engines=ort_engines)
    return torch_pipe, ort_pipe


@pytest.mark.parametrize("mode", ["off", "adapter", "inject"])
@pytest.mark.parametrize("steps", [1, 2])
def test_onnxruntime_generate_equals_torch(pipes, mode, steps):
    torch_pipe, ort_pipe = pipes
    kwargs = dict(mode=mode, steps=steps, k=3, inject_w=[0.7, 0.4, 1.0])
    ref = torch_pipe(PROMPTS, [5, 6, 7], **kwargs)
    got = ort_pipe(PROMPTS, [5, 6, 7], **kwargs)
    scale = ref.latents.abs().max().item()
    assert (got.latents - ref.latents).abs().max().item() <= 1e-3 * scale
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert [[n.caption for n in row] for row in got.neighbors] == [[n.caption for n in row] for row in ref.neighbors]
    assert set(got.timings_ms) == set(ref.timings_ms)


def test_engine_pipeline_checks_inject_w_outside_the_graph(pipes):
    _, ort_pipe = pipes
    z_t = torch.zeros(1, *ort_pipe.latent_shape)
    ctx = torch.zeros(1, *ort_pipe.engines.engines["text_encoder"].spec.outputs[0].shape[1:])
    h = torch.zeros(1, 1, *ort_pipe.engines.engines["denoise_inject"].spec.inputs[3].shape[2:])
    with pytest.raises(ValueError, match="inject w must be in \\(0, 1\\]"):
        ort_pipe.engines.denoise("inject", z_t, torch.tensor([999]), ctx, h, None, torch.tensor([1.5]))


def test_use_engines_none_restores_torch_and_missing_modes_are_refused(exported, pipes, ort_engines):
    components, _ = exported
    torch_pipe, _ = pipes
    pipe = RagTurboPipeline(components, list(torch_pipe.databases.values()))
    ref = pipe(PROMPTS[:1], [1], mode="adapter")
    pipe.use_engines(ort_engines)
    assert pipe.engines is ort_engines
    pipe.use_engines(None)
    assert pipe.engines is None and torch.equal(pipe(PROMPTS[:1], [1], mode="adapter").latents, ref.latents)
    partial = PipelineEngines("onnxruntime", {n: ort_engines.engines[n] for n in ("text_encoder", "denoise_off", "vae_decode")})
    with pytest.raises(ValueError, match="no denoise graph for mode\\(s\\) \\['adapter', 'inject'\\]"):
        pipe.use_engines(partial)


def test_torch_engines_through_the_engine_interface_equal_the_pipeline(exported, pipes):
    components, _ = exported
    torch_pipe, _ = pipes
    via_engines = RagTurboPipeline(components, list(torch_pipe.databases.values()),
                                   engines=load_pipeline_engines("torch", None, components))
    ref = torch_pipe(PROMPTS, [1, 2, 3], mode="adapter", k=2)
    got = via_engines(PROMPTS, [1, 2, 3], mode="adapter", k=2)
    assert torch.allclose(got.latents, ref.latents, atol=1e-5) and np.array_equal(got.images, ref.images)


def test_onnxruntime_options(exported, tmp_path):
    _, out = exported
    manifest = read_manifest(out)
    graph = manifest.graphs["denoise_adapter"]
    inputs = graph.spec.example_inputs({"batch": 1, "k": 4})
    base = OrtEngine(out / graph.file, graph.spec, threads=1, io_binding=False).run(inputs)["model_output"]
    pinned = OrtEngine(out / graph.file, graph.spec, threads=1, static_sizes={"batch": 1, "k": 4},
                       profile_prefix=str(tmp_path / "prof"))
    np.testing.assert_allclose(pinned.run(inputs)["model_output"], base, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="loaded for batch = 1"):
        pinned.run(graph.spec.example_inputs({"batch": 2, "k": 4}))
    with pytest.raises(ValueError, match="takes inputs"):
        pinned.run({"z_t": inputs["z_t"]})
    profile = pinned.end_profiling()
    assert Path(profile).name.startswith("prof") and Path(profile).exists()
    with pytest.raises(EngineLoadError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        OrtEngine(out / graph.file, graph.spec, provider="cuda")
    with pytest.raises(EngineLoadError, match="cannot load"):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not an onnx file")
        OrtEngine(bad, graph.spec)


def test_generate_cli_on_onnxruntime_matches_torch_within_one_grey_level(exported, adapter_model_dir, tmp_path, capsys):
    _, out = exported
    images = {}
    for engine in ("torch", "onnxruntime"):
        path = tmp_path / f"{engine}.png"
        argv = ["generate", "a green triangle at the top", "--seed", "3", "--mode", "off", "--steps", "2",
                "--model", str(adapter_model_dir), "--out", str(path), "--engine", engine, "--engine-dir", str(out)]
        assert main(argv) == 0
        images[engine] = np.asarray(Image.open(path)).astype(int)
    assert np.abs(images["torch"] - images["onnxruntime"]).max() <= 1
    code = main(["generate", "x", "--model", str(adapter_model_dir), "--out", str(tmp_path / "x.png"),
                 "--engine", "onnxruntime", "--engine-dir", str(tmp_path / "none")])
    assert code == 2 and "manifest.json is missing" in capsys.readouterr().err
    assert hashlib.sha256((tmp_path / "torch.png").read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["off", "adapter", "inject"])
def test_onnxruntime_images_do_not_depend_on_the_batch(pipes, mode):
    _, ort_pipe = pipes
    prompts, seeds = PROMPTS * 2, [3, 4, 5, 6, 7, 8]
    for k in (1, 2, 3):
        alone = [ort_pipe([p], [s], mode=mode, k=k).images[0] for p, s in zip(prompts, seeds)]
        for size in (2, 3, 6):
            batch = ort_pipe(prompts[:size], seeds[:size], mode=mode, k=k).images
            assert all(np.array_equal(b, a) for b, a in zip(batch, alone)), (mode, k, size)


def test_gpu_graphs_run_once_per_item_inside_batch_invariant():
    from imageragturbo.engines.pipeline_engines import run_per_item
    from imageragturbo.model.batch_invariance import batch_invariant

    class Recording:
        provider = "cuda"

        def __init__(self):
            self.batches = []

        def run(self, feeds):
            self.batches.append(feeds["x"].shape[0])
            return {"y": feeds["x"] * 2}

    engine, x = Recording(), np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(run_per_item(engine, {"x": x})["y"], x * 2)
    with batch_invariant():
        np.testing.assert_array_equal(run_per_item(engine, {"x": x})["y"], x * 2)
    assert engine.batches == [3, 1, 1, 1]
    engine.provider = "cpu"
    with batch_invariant():
        run_per_item(engine, {"x": x})
    assert engine.batches[-1] == 3
