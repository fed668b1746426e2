"""Databases with int8 H-features (``h_dtype="int8"``, format_version 2): the build, its
manifest and checks, each bad layout refused, gathers within the quantisation bound of the
float16 build, what it does to the bundled model's images, and the page-cache warm-up."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import imageragturbo.retrieval.build as build_module
import imageragturbo.retrieval.disk as disk
from imageragturbo.cli import main
from imageragturbo.model import RagTurboPipeline
from imageragturbo.paths import bundled_model_if_present
from imageragturbo.retrieval.build import build_database
from imageragturbo.retrieval.disk import DatabaseLoadError, MemmapFeatureStore, check_database, load_database, read_manifest
from imageragturbo.retrieval.pairs import WorldPairs
from db_helpers import build_each, copy_of

N = 40


@pytest.fixture(scope="module")
def builds(pipe, tmp_path_factory):
    return build_each(pipe, tmp_path_factory.mktemp("int8"), N,
                      {h: {"h_dtype": h, "batch_size": 16, "chunk_size": 16} for h in ("float16", "int8")})


@pytest.fixture()
def int8_copy(builds, tmp_path):
    return copy_of(builds / "int8", tmp_path)


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_int8_build_writes_format_version_2_with_scales(builds, pipe):
    manifest = read_manifest(builds / "int8")
    assert manifest["format_version"] == 2 and manifest["h_dtype"] == "int8"
    arrays = manifest["arrays"]
    c = arrays["h_retr"]["shape"][1]
    assert arrays["h_retr"]["dtype"] == "int8" and arrays["h_retr"]["shape"][0] == N
    assert arrays["h_scale"] == {**arrays["h_scale"], "file": "h_scale.npy", "dtype": "float16", "shape": [N, c]}
    for name, spec in arrays.items():  # every array's checksum is the file's
        assert hashlib.sha256((builds / "int8" / spec["file"]).read_bytes()).hexdigest() == spec["sha256"], name
    assert read_manifest(builds / "float16")["format_version"] == 1
    assert "h_scale" not in read_manifest(builds / "float16")["arrays"]
    summary = check_database(builds / "int8", model_id=pipe.components.model_id)
    assert summary["ok"] and summary["arrays"]["h_retr"] == ["int8", arrays["h_retr"]["shape"]]
    # the keys, latents and captions are the float16 build's, bit for bit
    for name in ("text_emb", "z0"):
        np.testing.assert_array_equal(np.load(builds / "int8" / f"{name}.npy"), np.load(builds / "float16" / f"{name}.npy"))
    assert (builds / "int8" / "captions.json").read_text() == (builds / "float16" / "captions.json").read_text()


def test_auto_is_float16_below_the_threshold_and_int8_above(pipe, tmp_path, monkeypatch):
    assert build_database(pipe, WorldPairs(8), tmp_path / "small", progress=False).h_dtype == "float16"
    h_bytes = 8 * int(np.prod(read_manifest(tmp_path / "small")["h_shape"])) * 2
    monkeypatch.setattr(build_module, "INT8_ABOVE_BYTES", h_bytes - 1)
    result = build_database(pipe, WorldPairs(8), tmp_path / "big", progress=False)
    assert result.h_dtype == "int8" and read_manifest(tmp_path / "big")["arrays"]["h_retr"]["dtype"] == "int8"
    monkeypatch.setattr(build_module, "INT8_ABOVE_BYTES", h_bytes)  # exactly at it: float16
    assert build_database(pipe, WorldPairs(8), tmp_path / "edge", progress=False).h_dtype == "float16"


def test_gathers_from_int8_are_within_the_bound_of_the_float16_build(builds):
    f16, i8 = MemmapFeatureStore(builds / "float16"), MemmapFeatureStore(builds / "int8")
    assert i8.h_dtype == "int8" and f16.h_dtype == "float16"
    ids = np.array([[0, 7, 7, N - 1], [3, 2, 1, 0]])
    h16 = f16.h_features(ids).astype(np.float32)
    h8 = i8.h_features(ids)
    assert h8.dtype == np.float32 and h8.shape == h16.shape
    scale = np.load(builds / "int8" / "h_scale.npy").astype(np.float32)[ids][..., None, None]
    # half a step of the int8 code, plus float16's own rounding of the float16 build
    assert (np.abs(h8 - h16) <= scale / 2 + np.abs(h16) * 2**-11 + 1e-7).all()
    rel = np.sqrt(np.mean((h8 - h16) ** 2) / np.mean(h16**2))
    assert rel < 0.01, rel


def test_the_pipeline_retrieves_the_same_rows_from_both(builds, pipe):
    f16, i8 = load_database("db", builds / "float16", verify=True), load_database("db", builds / "int8", verify=True)
    captions = f16.store.all_captions()
    texts = [captions[1], captions[9], "a red circle"]
    q = np.random.default_rng(0).standard_normal((3, f16.store.text_emb.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r16, r8 = f16.retrieve(q, 4), i8.retrieve(q, 4)
    np.testing.assert_array_equal(r16.ids, r8.ids)
    np.testing.assert_array_equal(r16.gate, r8.gate)
    assert r8.h.dtype == np.float32 and np.abs(r8.h - r16.h).max() <= 0.01 * np.abs(r16.h).max()
    results = {}
    for name, db in (("float16", f16), ("int8", i8)):
        run = RagTurboPipeline(pipe.components, [db])
        with torch.inference_mode():
            results[name] = run(texts, [1, 2, 3], mode="adapter", k=3)
    a, b = results["float16"], results["int8"]
    assert [[n.id for n in row] for row in a.neighbors] == [[n.id for n in row] for row in b.neighbors]
    # measured on the tiny random model: max 1 grey level, mean 0.002
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


BAD_LAYOUTS = {
    "int8 without scales": (lambda m: m["arrays"].pop("h_scale"), "h_retr is int8 but arrays.h_scale"),
    "scales of the wrong shape": (lambda m: m["arrays"]["h_scale"].update(shape=[N, 3]), r"h_scale.shape must be \[N, C\]"),
    "scales of an integer dtype": (lambda m: m["arrays"]["h_scale"].update(dtype="int8"), "h_scale.dtype must be one of"),
    "version 1 with int8": (lambda m: m.update(format_version=1), "int8 H-features need format_version 2"),
    "an unknown H dtype": (lambda m: m["arrays"]["h_retr"].update(dtype="uint8"), "h_retr.dtype must be one of"),
}


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_each_bad_layout_is_refused_before_a_row_is_read(int8_copy, case, capsys):
    edit, needle = BAD_LAYOUTS[case]
    _edit_manifest(int8_copy, edit)
    with pytest.raises(DatabaseLoadError, match=needle):
        load_database("db", int8_copy)
    assert main(["check-database", str(int8_copy)]) == 2
    assert str(int8_copy) in capsys.readouterr().err


def test_scales_beside_float16_features_are_refused(builds, tmp_path):
    copy = tmp_path / "f16"
    shutil.copytree(builds / "float16", copy)
    shutil.copy(builds / "int8" / "h_scale.npy", copy / "h_scale.npy")
    scale = read_manifest(builds / "int8")["arrays"]["h_scale"]
    _edit_manifest(copy, lambda m: m["arrays"].update(h_scale=scale))
    with pytest.raises(DatabaseLoadError, match="h_scale is only for int8 H-features"):
        load_database("db", copy)


def test_a_negative_scale_is_refused_even_with_a_matching_checksum(int8_copy):
    scale = np.load(int8_copy / "h_scale.npy", mmap_mode="r+")
    scale[5, 1] = -scale[5, 1] - 1
    scale.flush()
    del scale
    digest = hashlib.sha256((int8_copy / "h_scale.npy").read_bytes()).hexdigest()
    _edit_manifest(int8_copy, lambda m: m["arrays"]["h_scale"].update(sha256=digest))
    load_database("db", int8_copy)  # a plain load checks the keys only
    with pytest.raises(DatabaseLoadError, match=r"h_scale.npy: row 5 holds a negative scale"):
        load_database("db", int8_copy, verify=True)


def test_a_version_1_reader_would_refuse_it():
    """What keeps an older reader from serving int8 codes as floats: the version it refuses."""
    assert disk.FORMAT_VERSION == 1 and disk.FORMAT_VERSION_INT8 == 2


def test_the_cli_builds_int8_and_names_the_h_dtype(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build-database", "--out", str(out), "--model", str(tiny_model_dir), "--world", "12",
                 "--h-dtype", "int8", "--no-progress"]) == 0
    assert "H-features int8" in capsys.readouterr().err
    assert read_manifest(out)["arrays"]["h_retr"]["dtype"] == "int8"
    assert "--h-dtype int8" in disk.rebuild_command(out, read_manifest(out))
    assert main(["build-database", "--out", str(tmp_path / "x"), "--model", str(tiny_model_dir), "--world", "12",
                 "--milvus-index", "FLAT"]) == 2
    assert "--milvus-uri and --milvus-index need --searcher milvus" in capsys.readouterr().err


# -- the page-cache warm-up -------------------------------------------------------------------


def test_warm_up_reads_the_mapped_arrays_when_they_fit(builds, monkeypatch):
    monkeypatch.setattr(disk, "RESIDENT_MAX_BYTES", 0)  # every array stays memory-mapped
    store = MemmapFeatureStore(builds / "int8")
    files = sum((builds / "int8" / spec["file"]).stat().st_size for spec in store.manifest["arrays"].values())
    seen = []
    result = store.warm_up(max_bytes=files, on_progress=lambda done, total: seen.append((done, total)), block=4096)
    assert result["warmed"] and result["bytes"] == files and result["reason"] is None
    assert len(seen) > 1 and seen[-1] == (files, files) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    refused = store.warm_up(max_bytes=files - 1, on_progress=lambda *a: pytest.fail("read a store that does not fit"))
    assert not refused["warmed"] and "do not fit" in refused["reason"] and refused["bytes"] == files


def test_warm_up_of_a_resident_store_reads_nothing(builds):
    store = MemmapFeatureStore(builds / "int8")  # a few KB: copied into memory at open
    result = store.warm_up(on_progress=lambda *a: pytest.fail("nothing is mapped"))
    assert result == {"warmed": True, "bytes": 0, "seconds": 0.0, "reason": "nothing is memory-mapped"}


def test_load_database_warms_with_progress(builds, monkeypatch):
    monkeypatch.setattr(disk, "RESIDENT_MAX_BYTES", 0)
    seen = []
    db = load_database("db", builds / "float16", warm=True, on_warm_progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert db.store.h_features(np.array([[0]])).shape[:2] == (1, 1)


def test_the_bundled_databases_cost_nothing_to_warm():
    """Why serving may warm by default: the bundled databases are read into memory at open."""
    model = bundled_model_if_present()
    if model is None:
        pytest.skip("no bundled model")
    for name in ("dim", "grey", "bright"):
        store = MemmapFeatureStore(model / "databases" / name)
        assert store.warm_up()["bytes"] == 0


# -- the bundled model ------------------------------------------------------------------------


@pytest.mark.skipif(bundled_model_if_present() is None, reason="no bundled model")
def test_int8_changes_the_bundled_models_images_by_at_most_one_grey_level(tmp_path):
    """Not "no change": measured with the bundled model's own default database (grey, all 3072
    pairs) built float16 and int8 by build_database, 50 test-held prompts in mode adapter, k=4,
    the same seeds: max |difference| 1 grey level, mean 0.031, 3.1 % of the pixel values move
    by one. This test rebuilds it at 512 pairs and 8 prompts and asserts the same bound."""
    from imageragturbo.world.splits import eval_prompts

    model = RagTurboPipeline.from_pretrained(bundled_model_if_present())
    images = {}
    prompts = eval_prompts("test-held", 8)
    for h_dtype in ("float16", "int8"):
        build_database(model, WorldPairs(512, 0, style="grey"), tmp_path / h_dtype, h_dtype=h_dtype, progress=False)
        run = RagTurboPipeline(model.components, [load_database("grey", tmp_path / h_dtype, verify=True)])
        with torch.inference_mode():
            images[h_dtype] = run([p for p, _ in prompts], [s for _, s in prompts], mode="adapter", k=4).images
    diff = np.abs(images["float16"].astype(int) - images["int8"].astype(int))
    assert diff.max() <= 1, diff.max()
    assert diff.mean() < 0.1, diff.mean()


def test_open_pipeline_warms_its_databases_when_asked(builds, tiny_model_dir, monkeypatch, caplog):
    import logging

    from imageragturbo.model.pipeline import open_pipeline

    monkeypatch.setattr(disk, "RESIDENT_MAX_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="imageragturbo.retrieval.disk"):
        open_pipeline(tiny_model_dir, databases=[f"db={builds / 'int8'}"])
        assert "warmed" not in caplog.text
        open_pipeline(tiny_model_dir, databases=[f"db={builds / 'int8'}"], warm=True)
    assert f"warmed {builds / 'int8'}" in caplog.text
