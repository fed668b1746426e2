"""Every shell command in README.md (its ```bash blocks) runs here, or is checked as far as this
machine allows, and the README's configuration table is the one the settings generate.

Each command line of the README is one test, in the README's order, in one shared workspace
(a temporary folder holding links to the repository's models/, imageragturbo/, docker/ and
scripts/, and toy versions of the files the README names: prompts.txt, my-pairs/, ...):

- ``imageragturbo ...``: parsed by ``build_parser()`` (so every flag exists), then run:
  in this process (generate, build-database, check-database), or, for ``serve``, as a server
  process on a free port that the ``curl`` lines after it talk to. Models the README points at
  that are not here are replaced by the tiny test models (``TOY``), and ``--device cuda`` by cpu;
- ``curl``: sent to the last server started, its answer checked (status 200, a PNG or JSON);
- ``make``: the target exists; ``pip install``: every pin equals the project's; ``pythonX.Y -m
  venv``: the version is one pyproject allows; ``docker``: the Dockerfile and stage, the image
  built above, the compose file, service and profile exist; ``kubectl apply -k``: the
  kustomization renders offline;
- lines that cannot run here are in ``CANNOT_RUN`` with the reason, and still get the checks above.

A command of another kind fails the test: give it a check here, or a reason in ``CANNOT_RUN``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BUNDLED = REPO / "models" / "shapes-v2"
HAS_BUNDLED = (BUNDLED / "model_index.json").is_file()

CANNOT_RUN = {
    r"^make test\b": "the whole test suite, of which this file is a part",
    r"^make world\b": "hours of training on this CPU; the recipe runs at toy scale in tests/training/test_world_recipe.py",
    r"^make serve\b": "serves until stopped; `imageragturbo serve` itself is started by the next lines",
    r"^python3\.\d+ -m venv\b": "builds a GPU host's venv from the network (PyTorch's CUDA wheel)",
    r"^\S*pip (install|uninstall)\b": "installs from the network (the GPU host's wheels)",
    r"^scripts/gpu-check\.sh\b": "needs a CUDA GPU; `--toy --no-tests` runs in tests/benchmarks/test_gpu_check.py",
    r"^hf download\b": "downloads from the Hugging Face Hub: no network here (a fake local cache stands in below)",
    r"^docker\b": "no Docker engine here; tests/service/test_docker.py checks the files and the compose config",
    r"imageragturbo train adapter\b": "GPU-scale LADD (batch 2048, SD 2.1-base's teacher, 20k steps); the adapter "
                                      "run at toy scale is tests/training/test_ladd.py",
    r"imageragturbo serve --ray\b": "starts a Ray Serve cluster (the [ray] extra); tests/service/test_ray_app.py runs it "
                                    "where ray is installed",
    r"^kubectl apply\b": "no Kubernetes cluster here; the kustomization is rendered offline (`kubectl kustomize`)",
    r"--milvus-uri http://HOST\b": "needs a Milvus server; tests/retrieval/test_milvus_server.py runs this path where "
                                   "IRT_TEST_MILVUS_URI names one",
}
"""Regex over a command line -> why it cannot run here."""

IN_PROCESS = ("generate", "build-database", "check-database")
"""Commands run in this process (the model loads in seconds); ``serve`` runs as a process."""


# -- the README's commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    line: int
    """The README line the command starts on."""
    text: str
    """The command as written (continuations joined, the comment dropped)."""
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    """Leading NAME=VALUE assignments."""

    @property
    def id(self) -> str:
        return f"L{self.line}: {self.text[:70]}"


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```bash block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start, "\n".join(body)))
        i += 1
    return blocks


def split_commands(start: int, body: str) -> list[Command]:
    """Logical lines (``\\`` continuations joined), split at ``&&`` and ``;``; comments dropped."""
    commands, lines, i = [], body.split("\n"), 0
    while i < len(lines):
        first, text = start + i, lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i].strip()
        i += 1
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens = list(lexer)
        current: list[str] = []
        for token in [*tokens, ";"]:
            if token in (";", "&&"):
                if current:
                    env = []
                    while current and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", current[0]):
                        env.append(tuple(current.pop(0).split("=", 1)))
                    shown = shlex.join([f"{k}={v}" for k, v in env] + current)
                    commands.append(Command(first, shown, tuple(current), tuple(env)))
                current = []
            elif token in ("|", "||", "&"):
                raise AssertionError(f"README line {first}: pipes and background jobs are not checked here: {text}")
            else:
                current.append(token)
    return commands


def readme_commands() -> list[Command]:
    return [c for start, body in bash_blocks(README.read_text()) for c in split_commands(start, body)]


COMMANDS = readme_commands()


def cannot_run(command: Command) -> str | None:
    return next((reason for pattern, reason in CANNOT_RUN.items() if re.search(pattern, command.text)), None)


# -- the workspace: links to the repository, toy inputs, a fake Hugging Face cache ----------------


class Workspace:
    def __init__(self, root: Path, tiny_model: Path, tiny_v_model: Path):
        self.root = root
        self.server: Server | None = None
        self.images: set[str] = set()
        """Docker images built by earlier lines."""
        for name in ("models", "imageragturbo", "docker", "scripts", "Makefile", "pyproject.toml"):
            if (REPO / name).exists():
                (root / name).symlink_to(REPO / name)
        self.hub = root / "hub"
        sys.path.insert(0, str(REPO / "tests" / "model"))
        from test_loading import build_fake_hub_cache

        build_fake_hub_cache(self.hub, "stabilityai/sd-turbo", tiny_v_model)
        self.sd_turbo = shutil.copytree(tiny_model, root / "toy" / "sd-turbo")
        self._toy_inputs()
        self.toy = {
            "/models/sd-turbo": str(self.sd_turbo),
            "/data/my-pairs.parquet": str(root / "my-pairs.parquet"),
            "/data/sd-turbo-db": str(root / "toy" / "sd-turbo-db"),
            "path/to/model-dir": str(BUNDLED),
        }
        """What the README points at that is not here -> its stand-in."""

    def _toy_inputs(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from PIL import Image

        from imageragturbo.world.splits import world_pairs

        (self.root / "prompts.txt").write_text("a red circle on the left\ntwo blue squares\t7\n\n# a comment\n"
                                               "a purple triangle above a yellow square\n")
        pairs = world_pairs("train", 4, seed=11)
        folder, imagefolder = self.root / "my-pairs", self.root / "my-imagefolder"
        folder.mkdir()
        imagefolder.mkdir()
        rows, metadata = [], []
        for i, (image, caption, _) in enumerate(pairs):
            Image.fromarray(image).save(folder / f"p{i}.png")
            (folder / f"p{i}.txt").write_text(caption)
            Image.fromarray(image).save(imagefolder / f"p{i}.png")
            rows.append({"image": f"my-pairs/p{i}.png", "caption": caption})
            metadata.append({"file_name": f"p{i}.png", "text": caption})
        (self.root / "my-pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (imagefolder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metadata))
        table = pa.table({"image": [r["image"] for r in rows], "caption": [r["caption"] for r in rows]})
        pq.write_table(table, self.root / "my-pairs.parquet")

    def substitute(self, argv: tuple[str, ...]) -> list[str]:
        out = []
        for index, token in enumerate(argv):
            if token == "cuda" and index and argv[index - 1] == "--device":
                token = "cpu"
            for path, stand_in in self.toy.items():
                token = token.replace(path, stand_in)
            out.append(token)
        return out

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``imageragturbo serve ...`` as the README writes it, on a free port; stopped with SIGTERM."""

    def __init__(self, argv: list[str], cwd: Path, env: dict):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(cwd / f"serve-{self.port}.log", "w+")
        self.process = subprocess.Popen([*argv, "--port", str(self.port)], cwd=cwd, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise AssertionError(f"serve did not turn ready in 600 s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, tiny_v_model_dir):
    ws = Workspace(tmp_path_factory.mktemp("readme"), tiny_model_dir, tiny_v_model_dir)
    yield ws
    ws.stop_server()


# -- checks by program -----------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _project_pins() -> dict[str, str]:
    from imageragturbo.engines.tensorrt_engine import TENSORRT_PIN

    pins = {}
    for requirement in _pyproject()["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        pins[name.strip().lower()] = version.strip()
    pins["onnxruntime-gpu"] = pins["onnxruntime"]  # the GPU build of the same version
    name, _, version = TENSORRT_PIN.partition("==")
    pins[name] = version
    return pins


def check_pip(argv: list[str]) -> None:
    pins, extras = _project_pins(), _pyproject()["project"]["optional-dependencies"]
    for token in argv[2:]:
        if "==" in token:
            name, version = token.split("==")
            assert pins.get(name.lower()) == version, f"{token}: the project pins {name}=={pins.get(name.lower())}"
        for extra in re.findall(r"\.\[([^\]]+)\]", token):
            assert all(e in extras for e in extra.split(",")), f"{token}: pyproject has extras {sorted(extras)}"


def check_venv(argv: list[str]) -> None:
    from packaging.specifiers import SpecifierSet

    version = re.fullmatch(r"python(\d+\.\d+)", argv[0]).group(1)
    allowed = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert f"{version}.0" in allowed, f"{argv[0]}: pyproject requires Python {allowed}"


def check_make(argv: list[str]) -> None:
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    for target in argv[1:]:
        assert target in targets, f"make {target}: the Makefile has {sorted(targets)}"


def check_docker(argv: list[str], ws: Workspace) -> None:
    import yaml

    args = argv[1:]
    if args[0] == "build":
        dockerfile = REPO / args[args.index("-f") + 1]
        assert dockerfile.is_file(), dockerfile
        stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile.read_text(), re.M | re.I))
        if "--target" in args:
            target = args[args.index("--target") + 1]
            assert target in stages, f"--target {target}: {dockerfile.name} has stages {sorted(stages)}"
        tag = args[args.index("-t") + 1] if "-t" in args else None
        if tag:
            ws.images.add(tag if ":" in tag else f"{tag}:latest")
        assert args[-1] == ".", "the build context is the repository root"
    elif args[0] == "run":
        image = args[-1] if ":" in args[-1] else f"{args[-1]}:latest"
        assert image in ws.images, f"docker run {image}: no README line builds it ({sorted(ws.images)})"
        for i, token in enumerate(args):
            if token == "-v":
                source = Path(args[i + 1].split(":")[0].replace("$PWD", str(REPO)))
                assert source.exists(), f"-v {args[i + 1]}: {source} does not exist"
    elif args[0] == "compose":
        compose_file = REPO / args[args.index("-f") + 1]
        compose = yaml.safe_load(compose_file.read_text())
        services = compose["services"]
        profiles = {p for s in services.values() for p in s.get("profiles", [])}
        if "--profile" in args:
            profile = args[args.index("--profile") + 1]
            assert profile in profiles, f"--profile {profile}: {compose_file.name} has {sorted(profiles)}"
        rest = args[args.index("up") + 1:]
        for service in [a for a in rest if not a.startswith("-")]:
            assert service in services, f"service {service}: {compose_file.name} has {sorted(services)}"
    else:
        raise AssertionError(f"docker {args[0]}: no check for it here")


def check_kubectl(argv: list[str]) -> None:
    assert argv[1:3] == ["apply", "-k"], f"{shlex.join(argv)}: only `kubectl apply -k DIR` is checked here"
    folder = REPO / argv[3]
    assert (folder / "kustomization.yaml").is_file(), f"{folder}: no kustomization.yaml"
    if shutil.which("kubectl"):
        done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def parse_imageragturbo(argv: list[str]):
    from imageragturbo.cli.main import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"imageragturbo {shlex.join(argv)}: the parser refused it (exit {exc.code})") from None


def run_in_process(argv: list[str], ws: Workspace, monkeypatch) -> None:
    from imageragturbo.cli.main import main

    saved = dict(os.environ)  # --device/--dtype set IRT_DEVICE/IRT_DTYPE for the process
    os.environ.pop("IRT_MODEL", None)
    os.environ["HF_HUB_CACHE"] = str(ws.hub)
    monkeypatch.chdir(ws.root)
    try:
        code = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0, f"imageragturbo {shlex.join(argv)} exited {code}"


def run_curl(argv: list[str], ws: Workspace) -> None:
    assert ws.server is not None, "a curl line before any `imageragturbo serve` line"
    argv = [a.replace("localhost:8000", ws.server.url.removeprefix("http://")) for a in argv]
    done = subprocess.run([*argv, "--max-time", "300", "-w", "\n%{http_code}"], cwd=ws.root, capture_output=True,
                          text=True, timeout=360)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", f"HTTP {status}: {body[:500]}\n{ws.server.output()[-2000:]}"
    if "-o" in argv:
        assert (ws.root / argv[argv.index("-o") + 1]).read_bytes()[:4] == b"\x89PNG"
    else:
        answer = json.loads(body)
        assert answer.get("data"), answer


# -- the tests -------------------------------------------------------------------------------------


def test_the_readme_has_commands_of_every_kind():
    programs = {Path(c.argv[0]).name for c in COMMANDS}
    assert {"imageragturbo", "curl", "make", "docker"} <= programs
    assert len(COMMANDS) >= 20


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model is not trained here (make world)")
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.id)
def test_readme_command(command: Command, workspace: Workspace, monkeypatch):
    argv, program = list(command.argv), Path(command.argv[0]).name
    reason = cannot_run(command)
    if program == "imageragturbo":
        toy = workspace.substitute(command.argv)
        args = parse_imageragturbo(toy[1:])
        if reason:
            pytest.skip(f"parsed; cannot run here: {reason}")
        if args.command in IN_PROCESS:
            run_in_process(toy[1:], workspace, monkeypatch)
        elif args.command == "serve":
            workspace.stop_server()
            env = {k: v for k, v in os.environ.items() if k != "IRT_MODEL"} | {"OMP_NUM_THREADS": "1"}
            workspace.server = Server([str(REPO / ".venv" / "bin" / "imageragturbo"), *toy[1:]], workspace.root, env)
        else:
            raise AssertionError(f"no way to run `imageragturbo {args.command}` here: add it to IN_PROCESS, or a "
                                 "reason to CANNOT_RUN")
        return
    if program == "curl":
        run_curl(argv, workspace)
        return
    if program == "cp":
        done = subprocess.run(argv, cwd=workspace.root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        json.loads((workspace.root / argv[-1]).read_text())
        return
    if program == "make":
        check_make(argv)
    elif re.fullmatch(r"python\d+\.\d+", program):
        check_venv(argv)
    elif program == "pip":
        check_pip(argv)
    elif program == "docker":
        check_docker(argv, workspace)
    elif program == "gpu-check.sh":
        script = REPO / argv[0]
        assert script.is_file() and os.access(script, os.X_OK), f"{argv[0]}: not an executable file"
    elif program == "kubectl":
        check_kubectl(argv)
    elif program == "hf":
        assert shutil.which("hf", path=str(REPO / ".venv" / "bin")) or shutil.which("hf"), "no hf command"
    else:
        raise AssertionError(f"no check for `{program}`: add one to tests/test_readme.py, or a reason to CANNOT_RUN")
    assert reason, f"`{command.text}` was only checked, not run: give it a reason in CANNOT_RUN"
    pytest.skip(f"checked; cannot run here: {reason}")


def test_every_cannot_run_entry_is_used():
    unused = [p for p, reason in CANNOT_RUN.items() if not any(re.search(p, c.text) for c in COMMANDS)]
    assert not unused, f"CANNOT_RUN entries no README line matches (remove them): {unused}"


def test_the_configuration_table_is_generated_from_the_settings():
    from imageragturbo.cli.settings_table import readme_table, settings_table

    table = readme_table(README.read_text())
    assert table is not None, "README.md lost the settings-table markers"
    assert table == settings_table(), (
        "README.md's configuration table is out of date: run `python -m imageragturbo.cli.settings_table --write README.md`"
    )


def test_every_irt_variable_the_package_reads_is_in_the_table():
    from imageragturbo.cli.settings_table import settings_table

    table = settings_table()
    read = set()
    for path in (REPO / "imageragturbo").rglob("*.py"):
        read |= set(re.findall(r"""environ(?:\.get)?\s*[\[(]\s*["'](IRT_[A-Z_]+)["']""", path.read_text()))
    missing = sorted(v for v in read if f"`{v}`" not in table)
    assert not missing, f"IRT_* variables read by the package but missing from the README's table: {missing}"
