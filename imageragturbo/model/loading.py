"""Load a diffusers-format model directory, offline, into the parts ImageRAGTurbo runs.

A model directory is diffusers' layout (``model_index.json``, ``tokenizer/``, ``text_encoder/``,
``unet/``, ``vae/``, ``scheduler/``) plus two optional parts of our own:

- ``adapter/``: the H-space adapter (``config.json`` + ``diffusion_pytorch_model.safetensors``);
- ``unet_lora/``: LoRA weights for the UNet decoder, saved by diffusers' ``save_lora_adapter``.
  They are fused into the UNet at load time, so serving runs a plain UNet.

The same code loads SD-Turbo (CLIP tokenizer + CLIPTextModel, UNet2DConditionModel,
AutoencoderKL or AutoencoderTiny, an Euler/DDPM-style scheduler) and the bundled shapes-world
model. Nothing is ever fetched from a hub (``local_files_only=True`` everywhere), and weights
are read only from safetensors files: the plain ones, or where a part has only those, its fp16
variant (``*.fp16.safetensors``, the text encoder's ``model.fp16.safetensors`` included).

:func:`resolve_model_dir` also takes a Hugging Face repo id (``stabilityai/sd-turbo``) and finds
its snapshot in the local Hugging Face cache, offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from imageragturbo.errors import ImageRagTurboError
from imageragturbo.model.adapter import HSpaceAdapter
from imageragturbo.paths import missing_model_hint

logger = logging.getLogger(__name__)

REQUIRED_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

# Only classes we know how to drive; a model index naming anything else is refused rather than
# imported by name.
TEXT_ENCODER_CLASSES = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection)}
VAE_CLASSES = {cls.__name__: cls for cls in (AutoencoderKL, AutoencoderTiny)}
SCHEDULER_CLASSES = {
    cls.__name__: cls
    for cls in (
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DDPMScheduler,
        DDIMScheduler,
        LCMScheduler,
    )
}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
LORA_DIRNAME = "unet_lora"
ADAPTER_DIRNAME = "adapter"


class ModelLoadError(ImageRagTurboError, ValueError):
    """A model directory is missing a file, or a file is malformed. The message names it."""


@dataclass
class ModelComponents:
    """The loaded parts of one model directory, ready for :class:`RagTurboPipeline`."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: UNet2DConditionModel
    vae: torch.nn.Module
    scheduler: object
    adapter: HSpaceAdapter | None
    model_dir: Path
    model_id: str
    """Identity of the parts that shape retrieved H-features (text encoder, UNet, VAE);
    an index built with another model is refused by comparing this string."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"malformed JSON in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"malformed JSON in {path}: expected an object, got {type(data).__name__}")
    return data


def _weights_file(part_dir: Path) -> Path:
    """The part's safetensors file (a plain or an fp16 variant); pickled weights are refused."""
    candidates = sorted(part_dir.glob("*.safetensors"))
    if not candidates:
        pickled = sorted(part_dir.glob("*.bin")) + sorted(part_dir.glob("*.pt")) + sorted(part_dir.glob("*.ckpt"))
        if pickled:
            raise ModelLoadError(
                f"{pickled[0]}: only safetensors weights are loaded (pickle files can run code); "
                "convert it with safetensors first"
            )
        raise ModelLoadError(f"missing weights: no *.safetensors file in {part_dir}")
    plain = [p for p in candidates if _variant_of(p) is None]
    return (plain or candidates)[0]


VARIANT_PATTERN = re.compile(r"\.(fp16|bf16)(\.safetensors$|-\d+-of-\d+\.safetensors$)")
"""``model.fp16.safetensors``, ``diffusion_pytorch_model.fp16.safetensors``, and sharded
``model.fp16-00001-of-00002.safetensors``: diffusers' and transformers' variant names."""


def _variant_of(path: Path) -> str | None:
    match = VARIANT_PATTERN.search(path.name)
    return match.group(1) if match else None


def _variant(part_dir: Path) -> str | None:
    """The ``variant`` argument of ``from_pretrained`` for this part: None for plain weights,
    ``fp16`` when the part has only ``*.fp16.safetensors`` files."""
    return _variant_of(_weights_file(part_dir))


# -- model dirs and hub ids -------------------------------------------------------------------------

REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""``owner/name``, as the Hugging Face Hub spells repo ids."""


def hub_cache_dir() -> Path:
    """The local Hugging Face cache, as huggingface_hub finds it now: ``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (read at each call, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def resolve_model_dir(model: str | Path) -> Path:
    """A model folder, or a Hugging Face repo id resolved offline to its snapshot in the local
    Hugging Face cache (:func:`hub_cache_dir`); the network is never used.

    A path that is a folder is returned as it is. ``owner/name`` that is not a folder is looked
    up in the cache (``owner/name@REVISION``: that branch, tag or commit; default ``main``).
    Raises :class:`ModelLoadError` saying where it looked and how to fill the cache when
    neither holds the model.
    """
    path = Path(model)
    if path.is_dir():
        return path
    text = str(model)
    repo_id, _, revision = text.partition("@")
    if not REPO_ID_PATTERN.match(repo_id) or path.exists():
        raise ModelLoadError(f"model directory not found: {path}{missing_model_hint(path)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        snapshot = snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model directory not found: {path}, and {text!r} is not in the local Hugging Face cache "
            f"(looked in {cache / ('models--' + repo_id.replace('/', '--'))}; the cache is HF_HUB_CACHE, else "
            f"HF_HOME/hub). Nothing is downloaded here: fill the cache where there is network with "
            f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`) and copy it over, or pass a "
            "model folder"
        ) from exc
    logger.info("model %s resolved offline to %s", text, snapshot)
    return Path(snapshot)


def _part_class(part: str, part_dir: Path, index: dict, allowed: dict[str, type]) -> type:
    """Resolve a part's class from its own config (``_class_name``), else from model_index.json."""
    name = None
    config_path = part_dir / "config.json"
    if part == "scheduler":
        config_path = part_dir / "scheduler_config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name is None and isinstance(index.get(part), list) and len(index[part]) == 2:
        name = index[part][1]
    if name not in allowed:
        raise ModelLoadError(
            f"{config_path}: unsupported {part} class {name!r}; expected one of {sorted(allowed)}"
        )
    return allowed[name]


def model_identity(model_dir: Path) -> str:
    """The id a model's databases are built with: a fingerprint of the text encoder's, the
    UNet's and the VAE's configs and weights (read without loading them)."""
    model_dir = Path(model_dir)
    return fingerprint([
        path
        for part in ("text_encoder", "unet", "vae")
        for path in (model_dir / part / "config.json", _weights_file(model_dir / part))
    ])


def fingerprint(paths: list[Path]) -> str:
    """A cheap identity for weights + configs: sha256 over config bytes, file sizes and the first
    and last MiB of each weights file (hashing 3 GB of SD weights at every start would cost
    seconds; changing any trained weight changes the edges or the configs in practice)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            if size <= 2 << 20:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def check_model_dir(model_dir: Path) -> dict:
    """Validate the layout before loading anything; returns the parsed model_index.json."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    index = _read_json(model_dir / "model_index.json")
    for part in REQUIRED_PARTS:
        part_dir = model_dir / part
        if not part_dir.is_dir():
            raise ModelLoadError(f"missing folder: {part_dir} (a model directory needs {', '.join(REQUIRED_PARTS)})")
        if part == "tokenizer":
            if not any((part_dir / name).is_file() for name in TOKENIZER_FILES):
                raise ModelLoadError(f"missing file: {part_dir} has none of {', '.join(TOKENIZER_FILES)}")
        elif part == "scheduler":
            _read_json(part_dir / "scheduler_config.json")
        else:
            _read_json(part_dir / "config.json")
            _weights_file(part_dir)
    return index


def load_adapter(adapter_dir: Path, dtype: torch.dtype = torch.float32) -> HSpaceAdapter:
    """Load a trained H-space adapter from ``adapter_dir`` (config.json + safetensors)."""
    _read_json(adapter_dir / "config.json")
    _weights_file(adapter_dir)
    try:
        adapter = HSpaceAdapter.from_pretrained(adapter_dir, local_files_only=True, use_safetensors=True,
                                                variant=_variant(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load adapter from {adapter_dir}: {exc}") from exc
    return adapter.to(dtype=dtype).eval()


def _fuse_lora(unet: UNet2DConditionModel, lora_dir: Path) -> None:
    weights = _weights_file(lora_dir)
    try:
        unet.load_lora_adapter(str(lora_dir), weight_name=weights.name, prefix=None, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load UNet LoRA from {weights}: {exc}") from exc
    # Fusing and unloading leaves a plain UNet: no peft wrappers on the serving path, and the
    # graph exports to ONNX like the base model.
    unet.fuse_lora()
    unet.unload_lora()


def load_model(
    model_dir: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    lora_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    base_only: bool = False,
) -> ModelComponents:
    """Load every part of a diffusers-format model directory from local files only.

    ``adapter_dir`` and ``lora_dir`` default to ``<model_dir>/adapter`` and
    ``<model_dir>/unet_lora`` when those exist; ``base_only`` skips both (training a new
    adapter and LoRA starts from the bare one-step UNet). Raises :class:`ModelLoadError`
    naming the missing or malformed file. ``model_dir`` may also be a Hugging Face repo id in
    the local cache (:func:`resolve_model_dir`).
    """
    model_dir = resolve_model_dir(model_dir)
    index = check_model_dir(model_dir)
    text_cls = _part_class("text_encoder", model_dir / "text_encoder", index, TEXT_ENCODER_CLASSES)
    vae_cls = _part_class("vae", model_dir / "vae", index, VAE_CLASSES)
    scheduler_cls = _part_class("scheduler", model_dir / "scheduler", index, SCHEDULER_CLASSES)

    def load(part: str, cls: type, **kwargs):
        part_dir = model_dir / part
        try:
            return cls.from_pretrained(part_dir, local_files_only=True, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot load {part} from {part_dir}: {exc}") from exc

    tokenizer = load("tokenizer", AutoTokenizer)
    weights = dict(use_safetensors=True, torch_dtype=dtype)
    text_encoder = load("text_encoder", text_cls, use_safetensors=True, dtype=dtype,
                        variant=_variant(model_dir / "text_encoder"))
    unet = load("unet", UNet2DConditionModel, variant=_variant(model_dir / "unet"), **weights)
    vae = load("vae", vae_cls, variant=_variant(model_dir / "vae"), **weights)
    scheduler = load("scheduler", scheduler_cls)

    model_id = model_identity(model_dir)

    lora_path = Path(lora_dir) if lora_dir is not None else model_dir / LORA_DIRNAME
    if not base_only and (lora_dir is not None or lora_path.is_dir()):
        _fuse_lora(unet, lora_path)
        logger.info("fused UNet LoRA from %s", lora_path)

    adapter_path = Path(adapter_dir) if adapter_dir is not None else model_dir / ADAPTER_DIRNAME
    adapter = None
    if not base_only and (adapter_dir is not None or adapter_path.is_dir()):
        adapter = load_adapter(adapter_path, dtype)
        expected = unet.config.block_out_channels[-1]
        if adapter.config.channels != expected:
            raise ModelLoadError(
                f"{adapter_path / 'config.json'}: adapter channels {adapter.config.channels} do not match "
                f"the UNet's H-space channels {expected}"
            )
        adapter.to(device)

    for module in (text_encoder, unet, vae):
        module.to(device).eval().requires_grad_(False)
    logger.info("loaded model %s (id %s) from %s", unet.__class__.__name__, model_id, model_dir)
    return ModelComponents(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        adapter=adapter,
        model_dir=model_dir,
        model_id=model_id,
    )


def load_teacher_unet(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The multi-step teacher kept with a model: ``teacher/`` when the model has a distilled
    student in ``unet/``, else ``unet/`` itself (a model that is still only its teacher)."""
    model_dir = Path(model_dir)
    part_dir = model_dir / "teacher" if (model_dir / "teacher").is_dir() else model_dir / "unet"
    _read_json(part_dir / "config.json")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            part_dir, local_files_only=True, use_safetensors=True, torch_dtype=dtype, variant=_variant(part_dir)
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the teacher UNet from {part_dir}: {exc}") from exc
    return unet.eval().requires_grad_(False)
