"""ONNX export of the graphs, with a manifest that ties the files to the weights they came from.

``export_model(components, out_dir)`` writes one ``<graph>.onnx`` per graph (weights inside the
file, or in one ``<graph>.onnx.data`` file when the graph is over protobuf's 2 GB limit) and
``manifest.json``: each graph's :class:`GraphSpec`, its file's sha256, the torch-vs-ONNX
Runtime error measured at export time, and the *source identity* of the model. Loading an
export checks that identity against the model being served (:func:`check_source`) and refuses
a stale export with a message naming both.

The folder is written under a temporary name and renamed into place, so a crash never leaves a
half export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imageragturbo.engines.graphs import DEFAULT_OPSET, GRAPH_NAMES, GraphSpec, TorchGraph, build_graphs
from imageragturbo.engines.protocol import EngineLoadError, StaleExportError
from imageragturbo.errors import ImageRagTurboError
from imageragturbo.model.device import resolve_device
from imageragturbo.model.loading import ModelComponents, load_model

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# The example batch and neighbour count that the exporter traces with. Not 1: a size-1 axis
# can be specialised away (broadcasting) and would then not stay dynamic.
EXAMPLE_SIZES = {"batch": 2, "k": 2}
# Protobuf cannot hold a message over 2 GB; bigger graphs keep their weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 1
PARITY_TOLERANCE = 1e-3


class ExportError(ImageRagTurboError, ValueError):
    """An export cannot be made as asked (unknown graph, a folder that is not an export, a graph
    whose ONNX Runtime output differs from torch's); the message says which."""


def weights_digest(module: torch.nn.Module | None) -> str | None:
    """A cheap identity of a module's current weights: sha256 over every tensor's name, shape,
    dtype and a strided sample of up to 4096 of its values. Training or fusing a LoRA changes
    whole weight matrices, so the sample catches it; hashing every byte of SD's 3.4 GB UNet at
    each load would cost seconds."""
    if module is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float32).numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def source_identity(components: ModelComponents) -> dict[str, str | None]:
    """What an export depends on: ``model_id`` (the files' fingerprint), the adapter's weights,
    and the UNet's weights as loaded (so a fused ``unet_lora/`` counts)."""
    return {
        "model_id": components.model_id,
        "adapter": weights_digest(components.adapter),
        "unet": weights_digest(components.unet),
    }


def _describe(identity: dict) -> str:
    return f"model {identity.get('model_id')} (adapter {identity.get('adapter')}, unet weights {identity.get('unet')})"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class GraphFile:
    """One exported graph as recorded in the manifest."""

    spec: GraphSpec
    file: str
    sha256: str
    """sha256 of the .onnx file, then of its weights file if any, chained."""
    size_bytes: int
    data_file: str | None = None
    max_rel_err: float | None = None
    """max |onnxruntime - torch| / max |torch| on the export example, measured at export time."""


@dataclass
class ExportManifest:
    source: dict[str, str | None]
    graphs: dict[str, GraphFile]
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    model_dir: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "source": self.source,
            "model_dir": self.model_dir,
            "created": self.created,
            "versions": self.versions,
            "graphs": {
                name: {
                    "file": g.file,
                    "data_file": g.data_file,
                    "sha256": g.sha256,
                    "size_bytes": g.size_bytes,
                    "max_rel_err": g.max_rel_err,
                    "spec": g.spec.to_dict(),
                }
                for name, g in self.graphs.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExportManifest:
        graphs = {
            name: GraphFile(
                spec=GraphSpec.from_dict(g["spec"]),
                file=g["file"],
                sha256=g["sha256"],
                size_bytes=int(g["size_bytes"]),
                data_file=g.get("data_file"),
                max_rel_err=g.get("max_rel_err"),
            )
            for name, g in data["graphs"].items()
        }
        return cls(
            source=dict(data["source"]),
            graphs=graphs,
            versions=dict(data.get("versions", {})),
            created=data.get("created", ""),
            model_dir=data.get("model_dir", ""),
            format_version=int(data["format_version"]),
        )


def read_manifest(export_dir: str | Path) -> ExportManifest:
    """Parse ``<export_dir>/manifest.json`` and check that every graph file is there at its size."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise EngineLoadError(f"no export at {export_dir}: {MANIFEST_NAME} is missing (run `imageragturbo export --out {export_dir}`)")
    try:
        manifest = ExportManifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EngineLoadError(f"malformed export manifest {path}: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise EngineLoadError(f"{path}: format_version {manifest.format_version}, expected {FORMAT_VERSION}; re-export")
    for name, graph in manifest.graphs.items():
        files = [graph.file] + ([graph.data_file] if graph.data_file else [])
        for file in files:
            if not (export_dir / file).is_file():
                raise EngineLoadError(f"export {export_dir} lists graph {name!r} but {export_dir / file} is missing")
        size = sum((export_dir / file).stat().st_size for file in files)
        if size != graph.size_bytes:
            raise EngineLoadError(
                f"{export_dir / graph.file}: {size} bytes on disk, the manifest says {graph.size_bytes}; re-export"
            )
    return manifest


def check_source(manifest: ExportManifest, components: ModelComponents, export_dir: str | Path) -> None:
    """Refuse an export made from other weights than ``components`` (naming both)."""
    loaded = source_identity(components)
    if manifest.source != loaded:
        raise StaleExportError(
            f"stale export: {export_dir} was exported from {_describe(manifest.source)}, but the loaded model "
            f"({components.model_dir}) is {_describe(loaded)}; re-run "
            f"`imageragturbo export --model {components.model_dir} --out {export_dir}`"
        )


def _export_onnx(graph: TorchGraph, path: Path) -> None:
    spec = graph.spec
    example = spec.example_inputs(EXAMPLE_SIZES)
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    with warnings.catch_warnings():
        # The tracer warns about every shape-dependent Python branch in diffusers (static here:
        # only batch and k vary) and about the TorchScript exporter being legacy; both expected.
        warnings.simplefilter("ignore")
        if spec.exporter == "dynamo":
            dims = {axis: torch.export.Dim(axis, min=1, max=4096) for axis in spec.axis_names}
            dynamic_shapes = {
                s.name: {i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} or None
                for s in spec.inputs
            }
            torch.onnx.export(
                graph.module,
                args,
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=dynamic_shapes,
                opset_version=spec.opset,
                dynamo=True,
                external_data=True,
                verbose=False,
            )
        else:
            torch.onnx.export(
                graph.module,
                args,
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes,
                opset_version=spec.opset,
                do_constant_folding=True,
                dynamo=False,
            )


def _consolidate(path: Path) -> str | None:
    """Re-save ``path`` as one file, or as one file plus one ``.data`` file over 2 GB (the
    exporters may scatter weights over hundreds of files). ``path`` is alone in its folder.
    Returns the data file's name, if any."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for produced in path.parent.iterdir():
        produced.unlink()  # the graph and the exporter's weight files: all now held in `model`
    data_file = None
    if sum(init.ByteSize() for init in model.graph.initializer) > _PROTOBUF_LIMIT - (64 << 20):
        data_file = f"{path.name}.data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return data_file


def _parity(graph: TorchGraph, path: Path) -> float:
    """max |onnxruntime - torch| / max |torch| over the outputs, at batch 3 (not the traced 2)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = graph.spec.example_inputs({"batch": 3, "k": 3}, seed=1)
    with torch.inference_mode():
        ref = graph.module(*(torch.from_numpy(inputs[n]) for n in graph.spec.input_names))
    ref = (ref,) if isinstance(ref, torch.Tensor) else ref
    got = session.run(list(graph.spec.output_names), inputs)
    err = 0.0
    for r, g in zip(ref, got):
        r = r.float().numpy()
        err = max(err, float(np.abs(g - r).max() / max(float(np.abs(r).max()), 1e-6)))
    return err


def export_model(
    components: ModelComponents,
    out_dir: str | Path,
    *,
    graphs: tuple[str, ...] | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
    verify: bool = True,
) -> ExportManifest:
    """Export ``graphs`` (default: every graph the model has) to ``out_dir`` and write the manifest.

    With ``verify``, each graph is run once in ONNX Runtime against torch and the export is
    refused (ExportError) if they differ by more than PARITY_TOLERANCE (relative).
    An existing ``out_dir`` is replaced only if it is an earlier export (has a manifest).
    """
    out_dir = Path(out_dir)
    available = build_graphs(components, opset=opset, exporter=exporter)
    names = tuple(available) if graphs is None else tuple(graphs)
    for name in names:
        if name not in available:
            why = " (the model has no adapter)" if name == "denoise_adapter" else ""
            raise ExportError(f"unknown graph {name!r}{why}; this model has {list(available)} of {list(GRAPH_NAMES)}")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ExportError(f"{out_dir} exists and is not an export (no {MANIFEST_NAME}); choose an empty or new folder")

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files: dict[str, GraphFile] = {}
    try:
        for name in names:
            graph = available[name]
            start = time.perf_counter()
            # Each graph gets its own folder while exporting so that stray weight files are its own.
            work = tmp / f".{name}"
            work.mkdir()
            path = work / f"{name}.onnx"
            _export_onnx(graph, path)
            data_file = _consolidate(path)
            for produced in [path] + ([work / data_file] if data_file else []):
                produced.rename(tmp / produced.name)
            shutil.rmtree(work)
            path = tmp / f"{name}.onnx"
            err = _parity(graph, path) if verify else None
            if err is not None and err > PARITY_TOLERANCE:
                raise ExportError(
                    f"graph {name!r}: ONNX Runtime differs from torch by {err:.2e} (relative), "
                    f"more than {PARITY_TOLERANCE:.0e}; the export is refused"
                )
            digest = file_sha256(path)
            size = path.stat().st_size
            if data_file:
                digest = hashlib.sha256((digest + file_sha256(tmp / data_file)).encode()).hexdigest()
                size += (tmp / data_file).stat().st_size
            files[name] = GraphFile(graph.spec, path.name, digest, size, data_file, err)
            logger.info(
                "exported %s (%.1f MB) in %.1f s, max rel err vs torch %s",
                name, size / 1e6, time.perf_counter() - start, "n/a" if err is None else f"{err:.1e}",
            )
        import diffusers
        import onnx

        manifest = ExportManifest(
            source=source_identity(components),
            graphs=files,
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "diffusers": diffusers.__version__},
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            model_dir=str(components.model_dir),
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_model_dir(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    lora_dir: str | Path | None = None,
    graphs: tuple[str, ...] | None = None,
    opset: int | None = None,
    exporter: str = "torchscript",
    verify: bool = True,
) -> ExportManifest:
    """:func:`export_model` of the model in ``model_dir`` (its adapter and LoRA, or the given
    ones, the LoRA fused). ``opset`` None: DEFAULT_OPSET, 18 with the dynamo exporter."""
    # Traced in float32 (ONNX graphs are device-neutral; TensorRT builds fp16 from them), on
    # --device / IRT_DEVICE.
    components = load_model(model_dir, adapter_dir=adapter_dir, lora_dir=lora_dir, device=resolve_device())
    opset = opset or (18 if exporter == "dynamo" else DEFAULT_OPSET)
    return export_model(components, out_dir, graphs=graphs, opset=opset, exporter=exporter, verify=verify)
