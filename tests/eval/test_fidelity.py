import json

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model_dir

from imageragturbo.cli import main
from imageragturbo.eval.fidelity import RowSpec, evaluate_fidelity, load_prompts
from imageragturbo.retrieval import ExactSearcher, InMemoryFeatureStore, RetrievalDatabase
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
