"""The `imageragturbo` command: generate | serve | build-index | train | export | bench | eval.

Each subcommand registers its own arguments; heavy imports happen inside the handlers so that
`imageragturbo --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("imageragturbo")

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-v1"


def default_model_dir() -> Path:
    """IRT_MODEL, else the bundled shapes-world model."""
    return Path(os.environ.get("IRT_MODEL", BUNDLED_MODEL))


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate one image from a prompt and write it as PNG")
    p.add_argument("prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mode",
        choices=("auto", "adapter", "inject", "off"),
        default="auto",
        help="auto: 'adapter' when the model has an adapter and an index, else 'off'",
    )
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--inject-w", type=float, default=0.8)
    p.add_argument("-k", "--k", type=int, default=4, help="neighbours to retrieve")
    p.add_argument("--out", type=Path, required=True, help="output .png")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: IRT_MODEL or the bundled model)")
    p.add_argument("--adapter", type=Path, default=None, help="adapter directory (default: <model>/adapter)")
    p.add_argument("--lora", type=Path, default=None, help="UNet-decoder LoRA directory (default: <model>/unet_lora)")
    p.add_argument(
        "--index",
        action="append",
        default=None,
        metavar="NAME=DIR",
        help="a retrieval database folder (repeatable; default: <model>/index if it exists)",
    )
    p.add_argument("--database", default=None, help="which --index to retrieve from (default: the first)")
    p.add_argument("--verify-index", action="store_true", help="check every index file's checksum before use")
    p.add_argument("--engine", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="what runs text encoding, denoise and VAE decode (default: torch)")
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="an `imageragturbo export` folder (needed by onnxruntime and tensorrt)")
    p.set_defaults(handler=_generate)


def _generate(args) -> int:
    from PIL import Image

    from imageragturbo.model.pipeline import open_pipeline

    model_dir = args.model or default_model_dir()
    try:
        # ModelLoadError and IndexLoadError are ValueErrors naming the file at fault.
        pipe = open_pipeline(model_dir, indexes=args.index, adapter_dir=args.adapter, lora_dir=args.lora,
                             verify_index=args.verify_index)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if args.engine != "torch":
        from imageragturbo.engines import EngineLoadError, load_pipeline_engines

        try:
            pipe.use_engines(load_pipeline_engines(args.engine, args.engine_dir, pipe.components))
        except (EngineLoadError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    mode = args.mode
    if mode == "auto":
        mode = "adapter" if ("adapter" in pipe.denoisers and pipe.databases) else "off"
    try:
        result = pipe([args.prompt], [args.seed], mode=mode, steps=args.steps, inject_w=args.inject_w, k=args.k,
                      database=args.database)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.images[0]).save(args.out, format="PNG")
    timings = " ".join(f"{stage}={ms:.1f}ms" for stage, ms in result.timings_ms.items())
    print(f"wrote {args.out} (mode={mode}, steps={args.steps}, seed={args.seed}; {timings})", file=sys.stderr)
    if result.neighbors[0]:
        database = args.database or next(iter(pipe.databases))
        found = "; ".join(f"{n.caption!r} ({n.score:.3f})" for n in result.neighbors[0])
        print(f"retrieved from {database}: {found}", file=sys.stderr)
    return 0


# Subcommands that live with their subsystem. Each module defines ``register(sub, group)``:
# ``sub`` is the top-level subparsers object; ``group(name, help)`` returns the nested
# subparsers of a shared command (``train``, ``bench``, ``eval``), creating it once, so several
# subsystems can add e.g. ``bench latency`` and ``bench retrieval``.
COMMAND_MODULES: tuple[str, ...] = ("imageragturbo.index.commands", "imageragturbo.service.commands", "imageragturbo.training.commands", "imageragturbo.eval.commands", "imageragturbo.engines.commands")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="imageragturbo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    groups: dict[str, argparse._SubParsersAction] = {}

    def group(name: str, help: str) -> argparse._SubParsersAction:
        if name not in groups:
            groups[name] = sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)
        return groups[name]

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub, group)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except CliError as exc:
        print(f"imageragturbo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
