"""Flags that several commands share, each defined once here.

Choices come from the library's own constants (modes, engine kinds, searcher kinds) through
modules that import without torch, so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from imageragturbo.errors import ImageRagTurboError
from imageragturbo.modes import MODES
from imageragturbo.paths import default_model_dir

MODEL_HELP = "model directory (default: IRT_MODEL or the bundled model)"


class CliError(ImageRagTurboError):
    """A flag's value the command cannot use (caught where the library has no say in it)."""


def deprecated(namespace: argparse.Namespace, message: str) -> None:
    """Print ``message`` to stderr, once per command line."""
    said = namespace.__dict__.setdefault("_deprecations", set())
    if message not in said:
        said.add(message)
        print(f"imageragturbo: {message}", file=sys.stderr)


class _Renamed(argparse.Action):
    """An old flag name: one line on stderr, then exactly what the new name does."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(namespace, f"{option_string} is deprecated, use {self.new}")
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, *, flag: bool = False, **kwargs) -> None:
    """``old``, a deprecated name of the flag ``new`` (already added); ``flag``: a store_true one."""
    dest = new.lstrip("-").replace("-", "_")
    if flag:
        kwargs.update(nargs=0, const=True)
    parser.add_argument(old, dest=dest, action=_Renamed, new=new, help=f"deprecated name of {new}", **kwargs)


def add_model(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    parser.add_argument("--model", type=Path, default=None, help=help)


def model_dir(args: argparse.Namespace) -> Path:
    """``--model``, else IRT_MODEL, else the bundled model."""
    return args.model or default_model_dir()


DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""The names ``model.device.DTYPES`` accepts (here as strings, so --help needs no torch)."""


def add_device(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """``--device`` and ``--dtype``: for this command they are ``IRT_DEVICE`` / ``IRT_DTYPE``
    (so the pipeline, the databases' gathers, the engines and any server it starts honour
    them); applied and checked by :func:`device_environment` around the handler."""
    parser.add_argument("--device", default=None, metavar="cpu|cuda|cuda:N",
                        help="where the torch modules run (default: IRT_DEVICE, else cpu)")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                            help="the torch modules' precision (default: IRT_DTYPE, else float32)")


@contextmanager
def device_environment(args: argparse.Namespace):
    """Check ``--device`` / ``--dtype`` against this machine and make them ``IRT_DEVICE`` /
    ``IRT_DTYPE`` while the command runs (a machine without CUDA is a one-line error here);
    the variables are restored afterwards, so a caller of ``main()`` keeps its environment."""
    import os

    wanted = {"IRT_DEVICE": getattr(args, "device", None), "IRT_DTYPE": getattr(args, "dtype", None)}
    wanted = {name: value for name, value in wanted.items() if value is not None}
    if wanted:
        from imageragturbo.model.device import resolve_device, resolve_dtype

        if "IRT_DEVICE" in wanted:
            resolve_device(wanted["IRT_DEVICE"])
        if "IRT_DTYPE" in wanted:
            resolve_dtype(wanted["IRT_DTYPE"])
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def add_mode(parser: argparse.ArgumentParser, *, extra: tuple[str, ...] = (), default: str | None, help: str | None = None) -> None:
    parser.add_argument("--mode", choices=(*extra, *MODES), default=default, help=help)


def engine_kinds() -> tuple[str, ...]:
    from imageragturbo.engines.protocol import ENGINE_KINDS

    return ENGINE_KINDS


def add_engine(parser: argparse.ArgumentParser, *, default: str | None = "torch", help: str | None = None,
               dir_help: str = "an `imageragturbo export` folder (needed by onnxruntime and tensorrt)") -> None:
    parser.add_argument("--engine", choices=engine_kinds(), default=default,
                        help=help or "what runs text encoding, denoise and VAE decode (default: torch)")
    import os

    parser.add_argument("--engine-dir", type=Path, default=os.environ.get("IRT_ENGINE_DIR") or None,
                        help=f"{dir_help} (default: IRT_ENGINE_DIR)")


def add_adapter_and_lora(parser: argparse.ArgumentParser, lora_help: str = "UNet-decoder LoRA directory (default: <model>/unet_lora)") -> None:
    parser.add_argument("--adapter", type=Path, default=None, help="adapter directory (default: <model>/adapter)")
    parser.add_argument("--lora", type=Path, default=None, help=lora_help)


def searcher_kinds() -> tuple[str, ...]:
    from imageragturbo.retrieval.searchers import SEARCHER_KINDS

    return SEARCHER_KINDS


def h_dtype_choices() -> tuple[str, ...]:
    from imageragturbo.retrieval.build import H_DTYPE_CHOICES

    return H_DTYPE_CHOICES


def milvus_index_types() -> tuple[str, ...]:
    from imageragturbo.retrieval.milvus import INDEX_TYPES

    return INDEX_TYPES


# -- databases -------------------------------------------------------------------------------------


class _Database(argparse.Action):
    """``--database NAME=DIR``. Where ``--database NAME`` chose the database to retrieve from
    (generate, eval), a value without '=' still does, deprecated for ``--retrieve-from``; elsewhere
    a bare DIR is named after its folder."""

    def __init__(self, option_strings, dest, many: bool = True, chooses: bool = False, **kwargs):
        self.many, self.chooses = many, chooses
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if self.chooses and "=" not in value:
            deprecated(namespace, "--database NAME (the database to retrieve from) is deprecated, use --retrieve-from NAME")
            namespace.retrieve_from = value
            return
        _add_database(self, namespace, value)


class _Index(_Database):
    """``--index NAME=DIR``: the old name of ``--database``, identical but for one line on stderr."""

    def __call__(self, parser, namespace, value, option_string=None):
        deprecated(namespace, f"{option_string} is deprecated, use --database")
        _add_database(self, namespace, value)


def _add_database(action: _Database, namespace: argparse.Namespace, value: str) -> None:
    from imageragturbo.retrieval.disk import parse_database_spec

    try:
        parse_database_spec(value)
    except ValueError as exc:  # it only parses the text
        raise argparse.ArgumentError(action, str(exc)) from exc
    if action.many:
        setattr(namespace, action.dest, [*(getattr(namespace, action.dest) or []), value])
    else:
        setattr(namespace, action.dest, [value])


def add_databases(parser: argparse.ArgumentParser, *, many: bool = True, chooses: bool = False, help: str) -> None:
    """``--database NAME=DIR`` (repeatable unless not ``many``) into ``args.databases`` (None when
    not given), its deprecated old name ``--index``, and, with ``chooses``, ``--retrieve-from NAME``."""
    metavar = "NAME=DIR"
    parser.add_argument("--database", dest="databases", action=_Database, many=many, chooses=chooses, default=None,
                        metavar=metavar, help=help + (" (repeatable)" if many else ""))
    parser.add_argument("--index", dest="databases", action=_Index, many=many, metavar=metavar,
                        help="deprecated name of --database")
    if chooses:
        parser.add_argument("--retrieve-from", default=None, metavar="NAME",
                            help="which --database to retrieve from (default: the first)")


# -- list values ------------------------------------------------------------------------------------


def csv(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [item.strip() for item in text.split(",") if item.strip()]


def csv_ints(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (argparse reports a ValueError as a bad value)."""
    return [int(item) for item in csv(text)]
