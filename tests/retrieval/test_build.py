import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imageragturbo.cli import main
from imageragturbo.retrieval.build import DatabaseBuildError, build_database, partial_dir
from imageragturbo.retrieval.disk import DatabaseLoadError, MemmapFeatureStore, load_database, parse_database_spec, read_manifest
from imageragturbo.retrieval.pairs import PairSourceError, WorldPairs, open_pairs
from imageragturbo.model import RagTurboPipeline, load_model


@pytest.fixture(scope="module")
def world_index(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "world"
    build_database(pipe, WorldPairs(48), out, batch_size=16, chunk_size=20, progress=False)
    return out


def test_world_index_layout_and_rows(pipe, world_index):
    manifest = read_manifest(world_index)
    assert manifest["model_id"] == pipe.components.model_id and manifest["count"] == 48
    assert manifest["searcher"] == {"kind": "exact", "params": {}}
    assert manifest["source"] == {"kind": "world", "split": "database", "n": 48, "seed": 0}
    assert not partial_dir(world_index).exists()
    store = MemmapFeatureStore(world_index)
    assert isinstance(store.text_emb, np.memmap)
    ids = np.array([[3, 0, 3]])
    h = store.h_features(ids)
    assert h.dtype == np.float16 and h.shape == (1, 3, 64, 4, 4) and not isinstance(h, np.memmap)
    np.testing.assert_array_equal(h[0, 0], h[0, 2])
    np.testing.assert_allclose(np.linalg.norm(store.text_embeddings(ids), axis=-1), 1.0, atol=1e-5)
    # Rows are what the pipeline computes for the same pair.
    from imageragturbo.world.splits import world_pair

    image, caption, _ = world_pair("database", 0, 3)
    image = np.array(Image.fromarray(image).resize((16, 16), Image.Resampling.BICUBIC))
    z0 = pipe.encode_images(image[None])
    e, h_ref = pipe.encode_database_rows(z0, [caption])
    assert store.captions(ids)[0][0] == caption and store.source_ids(ids)[0][0] == "world/database/0/3"
    np.testing.assert_allclose(store.text_embeddings(ids)[0, 0], e[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(h[0, 0].astype(np.float32), h_ref[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store.latents(ids)[0, 0].astype(np.float32), z0[0].numpy(), rtol=2e-3, atol=2e-3)


def test_small_store_arrays_are_read_into_memory_and_large_ones_stay_mapped(world_index, monkeypatch):
    import imageragturbo.retrieval.disk as disk

    ids = np.array([[5, 1, 5, 40]])
    resident = MemmapFeatureStore(world_index)
    assert not any(isinstance(a, np.memmap) or a.base is not None for a in resident._rows.values())
    monkeypatch.setattr(disk, "RESIDENT_MAX_BYTES", 0)
    mapped = MemmapFeatureStore(world_index)
    assert all(isinstance(a.base, np.memmap) for a in mapped._rows.values())
    for gather in ("h_features", "text_embeddings", "latents"):
        np.testing.assert_array_equal(getattr(resident, gather)(ids), getattr(mapped, gather)(ids))


def test_loaded_database_drives_the_pipeline(pipe, world_index):
    db = load_database("world", world_index, verify=True)
    pipe.add_database(db)
    try:
        captions = db.store.all_captions()
        result = pipe([captions[5]], [1], mode="adapter", k=3)
        assert result.neighbors[0][0].caption == captions[5]
        assert result.neighbors[0][0].score == pytest.approx(1.0, abs=1e-5)
    finally:
        pipe.databases.pop("world")


def test_model_mismatch_is_refused_naming_both(world_index, tiny_v_model_dir, pipe, tmp_path, capsys):
    code = main(["generate", "a red circle", "--mode", "inject", "--model", str(tiny_v_model_dir),
                 "--index", f"w={world_index}", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "rebuild the database with this model: imageragturbo build-database" in capsys.readouterr().err
    other = load_model(tiny_v_model_dir)
    built_with = pipe.components.model_id
    assert other.model_id != built_with
    with pytest.raises(DatabaseLoadError, match=f"built with model {built_with}.*model is {other.model_id}") as caught:
        load_database("w", world_index, model_id=other.model_id)
    assert f"imageragturbo build-database --out {world_index} --world 48 --world-seed 0 --searcher exact" in str(caught.value)
    with pytest.raises(ValueError, match=f"built with model {built_with}.*loaded model is {other.model_id}"):
        RagTurboPipeline(other).add_database(load_database("w", world_index))


def test_verify_detects_corruption(pipe, tmp_path):
    out = tmp_path / "db"
    build_database(pipe, WorldPairs(8), out, batch_size=8, progress=False)
    load_database("ok", out, verify=True)
    with open(out / "h_retr.npy", "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-3, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    load_database("unverified", out)  # opening checks shapes and dtypes only
    with pytest.raises(DatabaseLoadError, match=r"h_retr\.npy: checksum mismatch"):
        load_database("bad", out, verify=True)
    assert main(["check-index", str(out)]) == 2
    # A truncated array is caught on open, without --verify.
    with open(out / "z0.npy", "r+b") as handle:
        handle.truncate(200)
    with pytest.raises(DatabaseLoadError, match="z0.npy"):
        load_database("short", out)


def _rows(path):
    store = MemmapFeatureStore(path)
    return {name: np.asarray(a) for name, a in store.arrays.items()}, store.all_captions()


def test_killed_build_leaves_nothing_loadable_and_resume_completes(pipe, tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "imageragturbo.cli", "build-index", "--out", str(out), "--model", str(tiny_model_dir),
           "--world", "24", "--chunk-size", "4", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second_chunk = partial_dir(out) / "chunks" / "chunk-000001.npz"
    deadline = time.monotonic() + 120
    while not second_chunk.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second_chunk.exists(), proc.stderr.read().decode()[-2000:]
    assert not out.exists()
    for folder in (out, partial_dir(out)):
        with pytest.raises(DatabaseLoadError):
            load_database("x", folder)
    # --resume continues only a build of the same thing.
    with pytest.raises(DatabaseBuildError, match=r"cannot resume .*chunk_size"):
        build_database(pipe, WorldPairs(24), out, chunk_size=8, resume=True, progress=False)
    result = build_database(pipe, WorldPairs(24), out, batch_size=4, chunk_size=4, resume=True, progress=False)
    assert result.resumed_chunks >= 2 and result.count == 24
    load_database("done", out, verify=True)
    # The resumed index equals one built in one go.
    clean = tmp_path / "clean"
    build_database(pipe, WorldPairs(24), clean, batch_size=4, chunk_size=4, progress=False)
    resumed_rows, resumed_captions = _rows(out)
    clean_rows, clean_captions = _rows(clean)
    assert resumed_captions == clean_captions
    for name in clean_rows:
        np.testing.assert_array_equal(resumed_rows[name], clean_rows[name])
    with pytest.raises(DatabaseBuildError, match="already exists"):
        build_database(pipe, WorldPairs(4), out, progress=False)


@pytest.mark.parametrize("kind", ["scann", "bm25"])
def test_other_searchers_round_trip_through_the_folder(pipe, tmp_path, kind):
    out = tmp_path / kind
    build_database(pipe, WorldPairs(40), out, searcher=kind, batch_size=20, progress=False)
    db = load_database(kind, out, verify=True)
    assert db.searcher.kind == kind and read_manifest(out)["searcher"]["kind"] == kind
    captions = db.store.all_captions()
    q = db.store.text_embeddings(np.array([[7]]))[:, 0]
    ids, _ = db.searcher.search(q, 3, texts=[captions[7]])
    assert captions[ids[0, 0]] == captions[7] or sorted(captions[ids[0, 0]].split()) == sorted(captions[7].split())


def _write_folder(root, pairs):
    root.mkdir()
    for i, (image, caption, _) in enumerate(pairs):
        Image.fromarray(image).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(caption + "\n")


def test_build_from_folder_and_jsonl(pipe, tmp_path):
    from imageragturbo.world.splits import world_pairs

    pairs = world_pairs("train", 6, seed=3)
    _write_folder(tmp_path / "folder", pairs)
    build_database(pipe, open_pairs(tmp_path / "folder"), tmp_path / "from_folder", progress=False)
    store = MemmapFeatureStore(tmp_path / "from_folder")
    assert store.all_captions() == [c for _, c, _ in pairs]
    assert store.source_ids(np.array([[0]])) == [["img00.png"]]

    lines = [json.dumps({"image": f"folder/img{i:02d}.png", "caption": c, "id": f"p{i}"}) for i, (_, c, _) in enumerate(pairs)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    build_database(pipe, open_pairs(tmp_path / "pairs.jsonl"), tmp_path / "from_jsonl", progress=False)
    jsonl_store = MemmapFeatureStore(tmp_path / "from_jsonl")
    assert jsonl_store.source_ids(np.array([[1]])) == [["p1"]]
    np.testing.assert_array_equal(np.asarray(jsonl_store.arrays["h_retr"]), np.asarray(store.arrays["h_retr"]))


def test_build_from_a_hugging_face_imagefolder(pipe, tmp_path):
    """An imagefolder dataset (images + metadata.jsonl of {file_name, text}), as a folder and as its file."""
    from imageragturbo.world.splits import world_pairs

    pairs = world_pairs("train", 5, seed=4)
    root = tmp_path / "imagefolder"
    (root / "train").mkdir(parents=True)
    lines = []
    for i, (image, caption, _) in enumerate(pairs):
        Image.fromarray(image).save(root / "train" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"train/{i}.png", "text": caption, "aesthetic": 5.0}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    source = open_pairs(root)
    assert source.description["kind"] == "imagefolder" and len(source) == 5
    assert main(["build-database", "--pairs", str(root), "--out", str(tmp_path / "db"), "--model",
                 str(pipe.components.model_dir), "--no-progress"]) == 0
    store = MemmapFeatureStore(tmp_path / "db")
    assert store.all_captions() == [c for _, c, _ in pairs]
    assert store.source_ids(np.array([[2]])) == [["train/2.png"]]
    assert len(open_pairs(root / "metadata.jsonl")) == 5
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "train/0.png", "label": 3}) + "\n")
    with pytest.raises(PairSourceError, match=r"metadata\.jsonl:1: expected .*file_name"):
        open_pairs(root)


def test_bad_pairs_are_named(tmp_path):
    from imageragturbo.world.splits import world_pairs

    _write_folder(tmp_path / "folder", world_pairs("train", 2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "folder/img00.png", "caption": "ok"}\n{"image": "folder/img01.png"\n')
    with pytest.raises(PairSourceError, match=r"bad\.jsonl:2: not valid JSON"):
        open_pairs(bad)
    bad.write_text('{"image": "folder/img00.png", "caption": "ok"}\n\n{"image": "folder/nope.png", "caption": "x"}\n')
    with pytest.raises(PairSourceError, match=r"bad\.jsonl:3: image not found: .*nope\.png"):
        open_pairs(bad)
    bad.write_text('{"picture": "folder/img00.png", "caption": "ok"}\n')
    with pytest.raises(PairSourceError, match=r"bad\.jsonl:1: expected"):
        open_pairs(bad)
    (tmp_path / "folder" / "img01.txt").unlink()
    with pytest.raises(PairSourceError, match=r"img01\.png: no caption file img01\.txt"):
        open_pairs(tmp_path / "folder")
    (tmp_path / "folder" / "img01.png").write_bytes(b"not a png")
    (tmp_path / "folder" / "img01.txt").write_text("broken")
    with pytest.raises(PairSourceError, match=r"cannot read image .*img01\.png"):
        open_pairs(tmp_path / "folder").read(0, 2, (16, 16))


def test_parse_database_spec(tmp_path):
    assert parse_database_spec("art=/data/art") == ("art", tmp_path.__class__("/data/art"))
    assert parse_database_spec(str(tmp_path / "photos"))[0] == "photos"
    for bad in ("", "=x", "name="):
        with pytest.raises(ValueError, match="database spec"):
            parse_database_spec(bad)


def test_build_index_cli_errors(tiny_model_dir, tmp_path, capsys):
    code = main(["build-index", "--out", str(tmp_path / "x"), "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "none.jsonl")])
    assert code == 2 and "pairs not found" in capsys.readouterr().err
    assert main(["check-index", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_two_databases_selectable_by_name(pipe, tiny_model_dir, tmp_path, capsys):
    build_database(pipe, WorldPairs(16, seed=0), tmp_path / "a", progress=False)
    build_database(pipe, WorldPairs(16, seed=1), tmp_path / "b", progress=False)
    local = RagTurboPipeline(pipe.components, [load_database("a", tmp_path / "a"), load_database("b", tmp_path / "b")])
    prompt = MemmapFeatureStore(tmp_path / "b").all_captions()[2]
    from_a = local([prompt], [0], mode="adapter", k=2, database="a")
    from_b = local([prompt], [0], mode="adapter", k=2, database="b")
    default = local([prompt], [0], mode="adapter", k=2)
    assert [n.id for n in default.neighbors[0]] == [n.id for n in from_a.neighbors[0]]
    assert all(n.id.startswith("world/database/0/") for n in from_a.neighbors[0])
    # (The tiny text encoder truncates at 16 tokens, so several captions can tie at score 1.)
    assert all(n.id.startswith("world/database/1/") for n in from_b.neighbors[0])
    assert from_b.neighbors[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert not torch.equal(from_a.latents, from_b.latents)

    outputs = {}
    for name in ("a", "b"):
        out = tmp_path / f"{name}.png"
        code = main(["generate", prompt, "--mode", "inject", "--model", str(tiny_model_dir), "--out", str(out),
                     "--index", f"a={tmp_path / 'a'}", "--index", f"b={tmp_path / 'b'}", "--database", name])
        assert code == 0
        err = capsys.readouterr().err
        assert f"retrieved from {name}: " in err
        outputs[name] = out.read_bytes()
    assert outputs["a"] != outputs["b"]
    code = main(["generate", prompt, "--mode", "inject", "--model", str(tiny_model_dir), "--out", str(tmp_path / "c.png"),
                 "--index", f"a={tmp_path / 'a'}", "--database", "nope"])
    assert code == 2 and "unknown database 'nope'" in capsys.readouterr().err


def test_build_from_parquet_paths_and_bytes(pipe, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    from imageragturbo.world.splits import world_pairs

    pairs = world_pairs("train", 5, seed=4)
    _write_folder(tmp_path / "folder", pairs)
    encoded = []
    for image, _, _ in pairs:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    captions = [c for _, c, _ in pairs]
    # Two row groups, images as bytes: rows are read across the group boundary.
    pq.write_table(pa.table({"image": encoded, "caption": captions}), tmp_path / "bytes.parquet", row_group_size=3)
    pq.write_table(pa.table({"image": [f"folder/img{i:02d}.png" for i in range(5)], "caption": captions,
                             "id": [f"q{i}" for i in range(5)]}), tmp_path / "paths.parquet")
    build_database(pipe, open_pairs(tmp_path / "bytes.parquet"), tmp_path / "a", batch_size=2, chunk_size=4, progress=False)
    build_database(pipe, open_pairs(tmp_path / "paths.parquet"), tmp_path / "b", progress=False)
    a, b = MemmapFeatureStore(tmp_path / "a"), MemmapFeatureStore(tmp_path / "b")
    assert a.all_captions() == b.all_captions() == captions
    assert b.source_ids(np.array([[4]])) == [["q4"]] and a.source_ids(np.array([[4]])) == [["bytes.parquet:4"]]
    # (Batch sizes differ, so float rounding may differ by an fp16 ulp.)
    np.testing.assert_allclose(np.asarray(a.arrays["h_retr"], np.float32), np.asarray(b.arrays["h_retr"], np.float32), atol=2e-3)
    pq.write_table(pa.table({"image": encoded[:2], "caption": ["ok", " "]}), tmp_path / "bad.parquet")
    with pytest.raises(PairSourceError, match=r"bad\.parquet: row 1: caption must be a non-empty string"):
        open_pairs(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"picture": encoded[:1], "caption": ["ok"]}), tmp_path / "cols.parquet")
    with pytest.raises(PairSourceError, match="expected columns 'image' and 'caption'"):
        open_pairs(tmp_path / "cols.parquet")


def _corrupt(folder, name, row, value):
    import json as _json

    spec = _json.loads((folder / "manifest.json").read_text())["arrays"][name]
    array = np.load(folder / spec["file"], mmap_mode="r+")
    array[row].flat[0] = value
    array.flush()


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("text_emb", np.nan, "row 3 holds NaN or infinite"),
    ("text_emb", 7.8e4, "row 3 has norm"),
    ("h_retr", np.inf, "row 3 holds NaN or infinite"),
    ("z0", np.nan, "row 3 holds NaN or infinite"),
])
def test_a_database_with_bad_values_is_refused_naming_the_file_and_row(tiny_model_dir, tmp_path, name, value, needle):
    from imageragturbo.retrieval.disk import DatabaseLoadError, MemmapFeatureStore, load_database, verify_values

    pipe = RagTurboPipeline.from_pretrained(tiny_model_dir)
    folder = tmp_path / "db"
    build_database(pipe, WorldPairs(8), folder, progress=False)
    _corrupt(folder, name, 3, value)
    with pytest.raises(DatabaseLoadError, match=needle) as err:
        if name == "text_emb":
            load_database("db", folder)  # the keys are checked at every load
        else:
            verify_values(folder, MemmapFeatureStore(folder))  # the features with verification
    assert str(folder) in str(err.value)
    if name != "text_emb":
        with pytest.raises(DatabaseLoadError, match="checksum mismatch"):
            load_database("db", folder, verify=True)
