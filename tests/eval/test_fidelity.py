import json

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model_dir

from imageragturbo.cli import main
from imageragturbo.eval.fidelity import RowSpec, evaluate_fidelity, fidelity_table, load_prompts
from imageragturbo.index import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
from imageragturbo.model import HSpaceAdapter, RagTurboPipeline, load_model
from imageragturbo.model.loading import load_teacher_unet
from imageragturbo.world.splits import world_arrays


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    # 16x16 latents and the two-block KL VAE: 32x32 images, the verifier's size.
    return build_tiny_model_dir(tmp_path_factory.mktemp("eval_model"), sample_size=16, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def pipe(world_model):
    parts = load_model(world_model)
    torch.manual_seed(0)
    parts.adapter = HSpaceAdapter(channels=64, num_heads=4).eval()
    torch.nn.init.normal_(parts.adapter.proj_out.weight, std=0.2)
    pipe = RagTurboPipeline(parts)
    images, captions, _ = world_arrays("database", 32)
    e, h = pipe.encode_database_rows(pipe.encode_images(images), captions)
    store = InMemoryFeatureStore(e.numpy(), h.numpy(), captions, parts.model_id)
    pipe.add_database(RetrievalDatabase("db", ExactSearcher(e.numpy()), store))
    return pipe


def test_prompts_from_split_and_file(tmp_path):
    assert load_prompts("test-held", 3) == load_prompts("test-held", 5)[:3]
    path = tmp_path / "p.txt"
    path.write_text("a red circle\t7\n\ntwo blue squares\n")
    assert load_prompts(str(path), 10) == [("a red circle", 7), ("two blue squares", 3)]
    path.write_text("a red circle\tseven\n")
    with pytest.raises(ValueError, match="p.txt:1: seed 'seven'"):
        load_prompts(str(path), 10)
    with pytest.raises(ValueError, match="no such file"):
        load_prompts("test-unseen", 10)


def test_rows_score_in_range_and_oracle_dominates_fixed_w(pipe, world_model):
    prompts = load_prompts("test-held", 6)
    teacher = load_teacher_unet(world_model)
    fixed = evaluate_fidelity(pipe, RowSpec("w", "inject", inject_w=0.8), prompts, "test-held")
    oracle = evaluate_fidelity(pipe, RowSpec("oracle", "inject", inject_w=None), prompts, "test-held")
    teacher_row = evaluate_fidelity(pipe, RowSpec("t", "teacher", steps=2), prompts, "test-held", teacher_unet=teacher)
    for res in (fixed, oracle, teacher_row):
        assert res.images.shape == (6, 32, 32, 3) and 0.0 <= res.benchmark.mean_score <= 1.0
    assert oracle.benchmark.mean_score >= fixed.benchmark.mean_score
    assert sum(oracle.extra["oracle_w_histogram"].values()) == 6
    assert teacher_row.row.nfe == 4  # CFG doubles the UNet evaluations


def test_table_writes_every_artifact(pipe, world_model, tmp_path):
    rows = (RowSpec("off", "off"), RowSpec("adapter 1-step", "adapter"), RowSpec("teacher", "teacher", steps=2))
    report = fidelity_table(pipe, load_teacher_unet(world_model), tmp_path, n=4, rows=rows, model_label="tiny")
    assert len(report["results"]) == 6
    text = (tmp_path / "fidelity.md").read_text()
    assert "| adapter 1-step | 1 |" in text and "| teacher | 4 |" in text
    assert (tmp_path / "fidelity_categories.png").stat().st_size > 1000
    assert len(list((tmp_path / "samples").glob("*.png"))) == 6
    assert json.loads((tmp_path / "fidelity.json").read_text())["results"][0]["n"] == 4


def test_plain_rows_use_the_base_pipeline_and_the_lora_ablation_does_not(pipe, world_model, tmp_path, monkeypatch):
    import imageragturbo.eval.fidelity as fidelity

    base = object()
    used = {}
    real = fidelity.evaluate_fidelity

    def spy(row_pipe, row, prompts, split, **kwargs):
        used[row.name] = "base" if row_pipe is base else "lora"
        return real(pipe, row, prompts, split, **kwargs)

    monkeypatch.setattr(fidelity, "evaluate_fidelity", spy)
    rows = (RowSpec("off", "off"), RowSpec("inject", "inject"), RowSpec("off + lora", "off", with_lora=True),
            RowSpec("adapter", "adapter"))
    fidelity_table(pipe, load_teacher_unet(world_model), tmp_path, n=2, rows=rows, base_pipe=base)
    assert used == {"off": "base", "inject": "base", "off + lora": "lora", "adapter": "lora"}
    assert any(r.with_lora and r.mode == "off" for r in fidelity.PAPER_ROWS)


def test_eval_fidelity_command(world_model, tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["eval", "fidelity", "--model", str(world_model), "--mode", "off", "--prompts", "test-seen",
                 "--n", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 4 and set(report["per_category"]) >= {"existence", "position"}
    assert out.with_suffix(".png").is_file()
    assert "mean" in capsys.readouterr().out
    assert main(["eval", "fidelity", "--model", str(world_model), "--mode", "adapter", "--n", "2", "--json", str(out)]) == 2
    assert "adapter" in capsys.readouterr().err
    assert np.isfinite(report["mean_score"])
