"""Helpers for the service tests: a tiny pipeline with an in-memory database, a real uvicorn
server on loopback (in a thread, or in a subprocess), and free ports.

Run as a script it serves a tiny model directory with an in-memory database, the way
``imageragturbo serve`` serves a model directory with an index on disk:
``python tests/service/serving.py MODEL_DIR PORT`` (settings from IRT_* variables).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def bundled_model() -> Path | None:
    """The model that ships with the repository (the newest models/shapes-v*), when it is there."""
    found = sorted(REPO.glob("models/shapes-v*/model_index.json"), key=lambda p: p.parent.name, reverse=True)
    return found[0].parent if found else None


CAPTIONS = [
    "a red circle on the left",
    "two blue squares",
    "a green triangle at the top",
    "three red circles",
    "a yellow square above a purple triangle",
    "one blue circle",
]


def build_tiny_pipeline(
    model_dir: Path,
    *,
    adapter: bool = True,
    database: bool = True,
    databases: tuple[str, ...] = ("shapes",),
    tokenizer=None,
    rows: dict[str, int] | None = None,
):
    """A RagTurboPipeline over a tiny model dir, with a random (non-zero) adapter and in-memory
    databases (``databases``, the first the default) of six captions (or ``rows[name]``) with
    random latents (kept, so neighbours can be drawn), as tests/model does; ``tokenizer``
    replaces the model's."""
    from imageragturbo.retrieval import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
    from imageragturbo.model import HSpaceAdapter, RagTurboPipeline, load_model

    parts = load_model(model_dir)
    if tokenizer is not None:
        parts.tokenizer = tokenizer
    if adapter:
        torch.manual_seed(0)
        parts.adapter = HSpaceAdapter(channels=parts.unet.config.block_out_channels[-1], num_heads=4).eval()
        torch.nn.init.normal_(parts.adapter.proj_out.weight, std=0.2)
    pipe = RagTurboPipeline(parts)
    for i, name in enumerate(databases if database else ()):
        captions = CAPTIONS[: (rows or {}).get(name, len(CAPTIONS))]
        gen = torch.Generator().manual_seed(i)
        z0 = torch.randn(len(captions), *pipe.latent_shape, generator=gen)
        e, h = pipe.encode_database_rows(z0, captions)
        store = InMemoryFeatureStore(
            e.numpy(),
            h.numpy().astype(np.float16),
            captions,
            pipe.components.model_id,
            source_ids=[f"{name}-{j}" for j in range(len(captions))] if i else None,
            z0=z0.numpy().astype(np.float16),
        )
        pipe.add_database(RetrievalDatabase(name, ExactSearcher(e.numpy()), store))
    return pipe


def word_level_tokenizer(words: list[str], max_length: int = 16):
    """A word-level tokenizer like the bundled shapes model's: lower-cased, split on whitespace
    and punctuation, every other word <|unk|>; ids below the tiny text encoder's vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )


def metric_value(url: str, name: str, **labels) -> float:
    """A sample's value in the server's /metrics (0 when the series is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 60.0, process: subprocess.Popen | None = None, thread=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the server thread ended before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


class ServerThread:
    """The real uvicorn server as ``imageragturbo serve`` configures it (connection limits and
    all), in a thread of this process (uvicorn installs no signal handlers off the main thread);
    ``stop()`` asks it to exit as SIGTERM would."""

    def __init__(self, app):
        from imageragturbo.service.http_server import make_server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = app.state.service.settings
        self.server = make_server(app, host="127.0.0.1", port=self.port, settings=settings, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_ready(self.url, timeout_s=300.0, thread=self.thread)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ServerProcess:
    """A server in its own process: this script (tiny pipeline + in-memory database) or any
    command line given; stopped with SIGTERM."""

    def __init__(self, command: list[str] | None = None, *, model_dir: Path | None = None, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if command is None:
            command = [sys.executable, str(Path(__file__).resolve()), str(model_dir), str(self.port)]
        else:
            command = [part.replace("{port}", str(self.port)) for part in command]
        self.command = command
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen | None = None
        # A file, not a pipe: nobody reads the server's log while it runs, and a full pipe
        # would block it.
        self.log = tempfile.TemporaryFile(mode="w+")

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        try:
            # Generous: importing torch and diffusers takes seconds, minutes on a starved CPU.
            wait_ready(self.url, timeout_s=600.0, process=self.process)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    import logging

    from imageragturbo.service import ServiceSettings, create_app
    from imageragturbo.service.app import run_server

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    model_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    settings = ServiceSettings()
    app = create_app(build_tiny_pipeline(model_dir), settings, model_name="tiny")
    run_server(app, host="127.0.0.1", port=port, settings=settings, log_level="warning")


if __name__ == "__main__":
    main()
