"""`imageragturbo export`: the model's graphs as ONNX, with a manifest."""

from __future__ import annotations

import sys
from pathlib import Path

from imageragturbo.cli import options


def register(sub) -> None:
    p = sub.add_parser("export", help="export the model's graphs to ONNX (text encoder, denoise per mode, VAE decoder) with a manifest")
    p.add_argument("--out", type=Path, required=True, help="export folder (replaced if it holds an earlier export)")
    options.add_model(p)
    options.add_device(p, dtype=False)
    options.add_adapter_and_lora(p, lora_help="UNet-decoder LoRA directory, fused before export (default: <model>/unet_lora)")
    p.add_argument("--graphs", type=options.csv, default=None, help="comma-separated subset (default: every graph the model has)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17; 18 with --exporter dynamo)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx's TorchScript tracer (seconds) or torch.export-based exporter (minutes)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check of each graph")
    p.set_defaults(handler=run)


def run(args) -> int:
    from imageragturbo.engines.export import export_model_dir

    manifest = export_model_dir(options.model_dir(args), args.out, adapter_dir=args.adapter, lora_dir=args.lora,
                                graphs=tuple(args.graphs) if args.graphs else None, opset=args.opset,
                                exporter=args.exporter, verify=not args.no_verify)
    for name, graph in manifest.graphs.items():
        err = "not checked" if graph.max_rel_err is None else f"max rel err vs torch {graph.max_rel_err:.1e}"
        print(f"{name}: {args.out / graph.file} ({graph.size_bytes / 1e6:.1f} MB, {err})", file=sys.stderr)
    print(f"wrote {args.out / 'manifest.json'} (model {manifest.source['model_id']})", file=sys.stderr)
    return 0
