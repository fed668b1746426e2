"""A corrupt database is refused before it is served: by ``load_database(verify=True)`` (what
``serve`` runs at start), by ``imageragturbo check-database``, and by ``serve`` itself, each
naming the file at fault. One test per class of corruption."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from imageragturbo.cli import main
from imageragturbo.model import RagTurboPipeline
from imageragturbo.model.loading import model_identity
from imageragturbo.retrieval.build import build_database
from imageragturbo.retrieval.disk import DatabaseLoadError, check_database, load_database
from imageragturbo.retrieval.pairs import WorldPairs


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("db") / "good"
    build_database(RagTurboPipeline.from_pretrained(tiny_model_dir), WorldPairs(24), folder, progress=False)
    return folder


@pytest.fixture()
def folder(built, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(built, copy)
    return copy


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _reseal(folder, name):
    """Recompute one array's checksum in the manifest: the value checks alone must then catch it."""
    manifest = _manifest(folder)
    spec = manifest["arrays"][name]
    spec["sha256"] = hashlib.sha256((folder / spec["file"]).read_bytes()).hexdigest()
    _write_manifest(folder, manifest)


def _set_value(folder, name, row, value):
    array = np.load(folder / f"{name}.npy", mmap_mode="r+")
    array[row].flat[0] = value
    array.flush()


def _refused(folder, needle, capsys, model_id=None, cli_args=()):
    """Refused by the loader serve uses and by check-database, both naming ``needle``."""
    with pytest.raises(DatabaseLoadError, match=needle) as caught:
        load_database("db", folder, verify=True, model_id=model_id)
    assert str(folder) in str(caught.value)
    capsys.readouterr()
    assert main(["check-database", str(folder), *cli_args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err, err  # one line, naming the folder


def test_a_good_database_passes_every_check(folder, tiny_model_dir, capsys):
    summary = check_database(folder, model_id=model_identity(tiny_model_dir))
    assert summary["ok"] and summary["count"] == 24
    assert main(["check-database", str(folder), "--model", str(tiny_model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 24


def test_one_flipped_bit_is_a_checksum_mismatch(folder, capsys):
    data = bytearray((folder / "h_retr.npy").read_bytes())
    data[-7] ^= 0x10
    (folder / "h_retr.npy").write_bytes(bytes(data))
    _refused(folder, r"h_retr\.npy: checksum mismatch", capsys)


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("text_emb", np.nan, r"text_emb\.npy: row 5 holds NaN"),
    ("text_emb", 7.8e34, r"text_emb\.npy: row 5 (holds NaN|has norm)"),
    ("h_retr", np.inf, r"h_retr\.npy: row 5 holds NaN or infinite"),
    ("z0", np.nan, r"z0\.npy: row 5 holds NaN or infinite"),
])
def test_nan_inf_and_huge_values_are_refused_even_with_matching_checksums(folder, capsys, name, value, needle):
    _set_value(folder, name, 5, value)
    _reseal(folder, name)
    _refused(folder, needle, capsys)


def test_a_truncated_array_is_refused(folder, capsys):
    with open(folder / "z0.npy", "r+b") as handle:
        handle.truncate(300)
    _refused(folder, r"z0\.npy", capsys)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda m: m.update(arrays=list(m["arrays"].values())), "field 'arrays' must be an object"),
    (lambda m: m["arrays"]["h_retr"].pop("shape"), r"arrays\.h_retr has no 'shape'"),
    (lambda m: m.update(count="abc"), "field 'count' must be a non-negative integer"),
    (lambda m: m.update(count=True), "field 'count' must be a non-negative integer"),
    (lambda m: m["arrays"]["z0"].update(shape="big"), r"arrays\.z0\.shape' must be a non-empty list"),
    (lambda m: m["arrays"]["z0"].update(sha256=17), r"arrays\.z0\.sha256' must be 64 hex digits"),
    (lambda m: m.update(model_id=None), "field 'model_id' must be a non-empty string"),
    (lambda m: m.update(files=["captions.json"]), "field 'files' must be an object"),
    (lambda m: m.update(searcher="exact"), "field 'searcher' must be an object"),
    (lambda m: m.pop("searcher"), "missing field 'searcher'"),
])
def test_malformed_manifest_fields_are_named(folder, capsys, edit, needle):
    manifest = _manifest(folder)
    edit(manifest)
    _write_manifest(folder, manifest)
    _refused(folder, needle, capsys)


def test_captions_as_a_directory_is_refused(folder, capsys):
    (folder / "captions.json").unlink()
    (folder / "captions.json").mkdir()
    _refused(folder, r"captions\.json", capsys)


@pytest.mark.parametrize("where", ["absolute", "parent", "link"])
def test_array_paths_outside_the_folder_are_refused(folder, tmp_path, capsys, where):
    outside = tmp_path / "elsewhere.npy"
    shutil.copy(folder / "h_retr.npy", outside)
    manifest = _manifest(folder)
    if where == "absolute":
        manifest["arrays"]["h_retr"]["file"] = str(outside)
    elif where == "parent":
        manifest["arrays"]["h_retr"]["file"] = "../elsewhere.npy"
    else:
        os.symlink(outside, folder / "linked.npy")
        manifest["arrays"]["h_retr"]["file"] = "linked.npy"
    _write_manifest(folder, manifest)
    _refused(folder, "relative file name inside|points outside the database folder", capsys)


def test_an_unknown_searcher_kind_is_refused(folder, capsys):
    manifest = _manifest(folder)
    manifest["searcher"]["kind"] = "faiss"
    _write_manifest(folder, manifest)
    _refused(folder, "unknown searcher kind 'faiss'", capsys)


def test_missing_searcher_assets_are_refused(folder, capsys):
    manifest = _manifest(folder)
    manifest["searcher"] = {"kind": "bm25", "params": {}}
    _write_manifest(folder, manifest)
    _refused(folder, "searcher", capsys)


def test_a_database_of_another_model_is_refused_against_model(folder, tiny_v_model_dir, capsys):
    other = model_identity(tiny_v_model_dir)
    _refused(folder, "was built with model", capsys, model_id=other, cli_args=["--model", str(tiny_v_model_dir)])


def test_serve_refuses_a_corrupt_database_at_start_and_exits(folder, tiny_model_dir):
    _set_value(folder, "h_retr", 2, np.inf)
    _reseal(folder, "h_retr")
    proc = subprocess.run(
        [sys.executable, "-m", "imageragturbo.cli", "serve", "--model", str(tiny_model_dir),
         "--database", f"db={folder}", "--port", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "IRT_WARMUP": "0"},
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "h_retr.npy: row 2 holds NaN or infinite" in last and "Traceback" not in proc.stderr


def test_serve_can_skip_the_checks_for_stores_verified_elsewhere(folder, tiny_model_dir, monkeypatch):
    from imageragturbo.model import pipeline as pipeline_module
    from imageragturbo.service import serve as serve_module

    seen = []
    monkeypatch.setattr(pipeline_module, "open_pipeline", lambda *a, **kw: seen.append(kw["verify"]) or 1 / 0)
    for flags in ({}, {"verify_databases": False}):
        with pytest.raises(serve_module.ServeFailedError, match="ZeroDivisionError"):
            serve_module.serve(tiny_model_dir, databases=[f"db={folder}"], **flags)
    assert seen == [True, False]
