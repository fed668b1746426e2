"""`imageragturbo train world` end to end, at toy scale: every stage of the bundled model's recipe
(VAE, VAE decoder fine-tune, CLIP, CLIP entities, teacher, export, student, the three style
databases, the style-target adapter, the no-retrieval control) runs from nothing into a model
directory that the serving pipeline opens and generates from."""

import json

import numpy as np
from tiny_world import tiny_configs

from imageragturbo.cli import main
from imageragturbo.model.pipeline import open_pipeline


def test_train_world_reproduces_a_servable_model_from_nothing(tmp_path):
    tiny_configs(tmp_path / "configs")
    out, work = tmp_path / "model", tmp_path / "runs"
    argv = ["train", "world", "--out", str(out), "--work", str(work), "--configs", str(tmp_path / "configs"),
            "--index-pairs", "12", "--eval-prompts", "2"]
    assert main(argv) == 0

    for part in ("unet", "teacher", "adapter", "unet_lora", "vae", "text_encoder", "tokenizer", "scheduler",
                 "databases/dim", "databases/grey", "databases/bright", "no_retrieval/unet_lora", "no_retrieval/adapter",
                 "paper_adapter/adapter", "paper_adapter/unet_lora", "paper_adapter/no_retrieval/unet_lora"):
        assert (out / part).is_dir(), part
    assert json.loads((work / "eval.json").read_text())["n_prompts"] == 2
    assert json.loads((out / "no_retrieval" / "ladd_adapter.json").read_text())["config"]["retrieval"] is False
    served = json.loads((out / "adapter" / "config.json").read_text())
    paper = json.loads((out / "paper_adapter" / "adapter" / "config.json").read_text())
    assert served["xattn_layers"] > 0 and paper["xattn_layers"] == 0  # beyond the paper, and the paper's
    assert json.loads((out / "databases" / "dim" / "manifest.json").read_text())["source"]["style"] == "dim"
    pipe = open_pipeline(out)  # the model's own databases, grey the default
    assert list(pipe.databases) == ["grey", "bright", "dim"]
    result = pipe(["a red circle on the left"], [0], mode="adapter", k=2)
    assert result.images.shape == (1, 32, 32, 3) and result.images.dtype == np.uint8
    assert len(result.neighbors[0]) == 2

    # --resume after a finished run skips the pretraining stages and leaves a servable model.
    walls = json.loads((work / "world.json").read_text())["stage_wall_s"]
    assert {"student", "databases", "paper_adapter", "paper_no_retrieval", "adapter", "no_retrieval"} <= set(walls)
    assert main([*argv, "--resume"]) == 0
    assert open_pipeline(out)(["two blue squares"], [1], mode="adapter", k=2, database="dim").images.shape == (1, 32, 32, 3)


def test_train_world_names_a_missing_config(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    argv = ["train", "world", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--configs", str(tmp_path / "configs")]
    assert main(argv) == 2
    assert "missing config file(s) vae.json" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
