import json
import shutil

import numpy as np
import pytest
import torch

from imageragturbo.engines import (
    EngineLoadError,
    StaleExportError,
    TorchEngine,
    build_graphs,
    check_source,
    export_model,
    load_pipeline_engines,
    read_manifest,
)
from imageragturbo.engines.export import file_sha256, source_identity
from imageragturbo.model import load_model

from tiny_engines import save_adapter

ALL_GRAPHS = ["text_encoder", "denoise_off", "denoise_adapter", "denoise_inject", "vae_decode"]


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-6))


def test_manifest_lists_every_graph_with_spec_hash_and_parity(exported):
    components, out = exported
    manifest = read_manifest(out)
    assert list(manifest.graphs) == ALL_GRAPHS
    assert manifest.source == source_identity(components)
    assert manifest.source["adapter"] is not None
    for name, graph in manifest.graphs.items():
        assert graph.sha256 == file_sha256(out / graph.file)
        assert graph.max_rel_err is not None and graph.max_rel_err <= 1e-3, name
        # Every input and output has a dynamic batch axis; only h_retr has a dynamic k.
        for tensor in graph.spec.inputs + graph.spec.outputs:
            assert tensor.shape[0] == "batch"
        assert graph.spec.opset == 17 and graph.spec.exporter == "torchscript"
    adapter_spec = manifest.graphs["denoise_adapter"].spec
    assert adapter_spec.input_names == ("z_t", "t", "ctx", "h_retr", "lam")
    assert adapter_spec.dynamic_axes["h_retr"] == {0: "batch", 1: "k"}
    assert manifest.graphs["denoise_inject"].spec.input_names == ("z_t", "t", "ctx", "h_retr", "inject_w")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["graphs"]["vae_decode"]["spec"]["inputs"][0]["name"] == "z0"


@pytest.mark.parametrize("name", ALL_GRAPHS)
@pytest.mark.parametrize(("batch", "k"), [(1, 1), (3, 4)])
def test_onnxruntime_matches_torch(exported, ort_engines, name, batch, k):
    components, _ = exported
    graph = build_graphs(components)[name]
    ort_engine = ort_engines.engines[name]
    inputs = graph.spec.example_inputs({"batch": batch, "k": k}, seed=batch + k)
    ref = TorchEngine(graph).run(inputs)
    got = ort_engine.run(inputs)
    assert set(got) == set(ref) == set(graph.spec.output_names)
    for key in ref:
        assert got[key].shape == ref[key].shape == graph.spec.outputs[graph.spec.output_names.index(key)].concrete_shape({"batch": batch})
        assert _rel_err(got[key], ref[key]) <= 1e-3, (name, key)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_v_model_dir"])
def test_spec_shapes_match_the_modules(request, fixture):
    components = load_model(request.getfixturevalue(fixture))
    graphs = build_graphs(components)
    assert "denoise_adapter" not in graphs  # no adapter/ in these model dirs
    for name, graph in graphs.items():
        inputs = graph.spec.example_inputs({"batch": 2, "k": 3})
        with torch.inference_mode():
            outputs = graph.module(*(torch.from_numpy(inputs[n]) for n in graph.spec.input_names))
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        for spec, tensor in zip(graph.spec.outputs, outputs):
            assert spec.concrete_shape({"batch": 2}) == tuple(tensor.shape), (name, spec.name)


def test_stale_export_is_refused_naming_both(exported, adapter_model_dir, tmp_path):
    components, out = exported
    manifest = read_manifest(out)
    check_source(manifest, components, out)  # the model it came from passes

    other_dir = tmp_path / "retrained"
    shutil.copytree(adapter_model_dir, other_dir)
    shutil.rmtree(other_dir / "adapter")
    save_adapter(other_dir, seed=1)
    retrained = load_model(other_dir)
    with pytest.raises(StaleExportError) as excinfo:
        load_pipeline_engines("onnxruntime", out, retrained)
    message = str(excinfo.value)
    assert "stale export" in message
    assert manifest.source["adapter"] in message and source_identity(retrained)["adapter"] in message
    assert f"imageragturbo export --model {other_dir} --out {out}" in message


def test_stale_export_refused_for_another_model_and_for_a_fused_lora(exported, tiny_model_dir, adapter_model_dir, tmp_path):
    _, out = exported
    manifest = read_manifest(out)
    other = load_model(tiny_model_dir)
    with pytest.raises(StaleExportError, match=f"{manifest.source['model_id']}.*{other.model_id}"):
        check_source(manifest, other, out)

    # A LoRA fused at load leaves model_id (the files' fingerprint) unchanged: the weights digest catches it.
    from peft import LoraConfig

    lora_dir = tmp_path / "lora_model"
    shutil.copytree(adapter_model_dir, lora_dir)
    unet = load_model(lora_dir).unet
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    unet.save_lora_adapter(str(lora_dir / "unet_lora"))
    fused = load_model(lora_dir)
    assert fused.model_id == manifest.source["model_id"]
    with pytest.raises(StaleExportError, match="unet weights"):
        check_source(manifest, fused, out)


def test_broken_or_missing_export_fails_loudly(exported, tmp_path):
    components, out = exported
    with pytest.raises(EngineLoadError, match="manifest.json is missing"):
        load_pipeline_engines("onnxruntime", tmp_path / "nothing", components)
    with pytest.raises(EngineLoadError, match="needs --engine-dir"):
        load_pipeline_engines("onnxruntime", None, components)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with (copy / "vae_decode.onnx").open("ab") as handle:
        handle.write(b"x")
    with pytest.raises(EngineLoadError, match="bytes on disk"):
        read_manifest(copy)
    (copy / "vae_decode.onnx").unlink()
    with pytest.raises(EngineLoadError, match="vae_decode.onnx is missing"):
        read_manifest(copy)


def test_export_refuses_unknown_graphs_and_foreign_folders(tiny_v_model_dir, tmp_path):
    components = load_model(tiny_v_model_dir)
    with pytest.raises(ValueError, match="unknown graph 'denoise_adapter' \\(the model has no adapter\\)"):
        export_model(components, tmp_path / "a", graphs=("denoise_adapter",))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not an export"):
        export_model(components, foreign, graphs=("vae_decode",))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_reexport_replaces_an_earlier_export(tiny_v_model_dir, tmp_path):
    components = load_model(tiny_v_model_dir)
    out = tmp_path / "onnx"
    export_model(components, out, graphs=("vae_decode",))
    export_model(components, out, graphs=("vae_decode", "text_encoder"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "text_encoder.onnx", "vae_decode.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
