"""`imageragturbo train world` end to end, at toy scale: every stage of the bundled model's recipe
(VAE, VAE decoder fine-tune, CLIP, CLIP entities, teacher, export, student, the three style
databases, the style-target adapter, the no-retrieval control) runs from nothing into a model
directory that the serving pipeline opens and generates from."""

import json

import numpy as np

from imageragturbo.cli import main
from imageragturbo.model.pipeline import open_pipeline
from imageragturbo.training.ladd import CONFIG_DIR

TINY = {
    "vae.json": dict(steps=2, batch_size=4, warmup_steps=1, block_out_channels=[8, 8, 8], norm_num_groups=4,
                     scaling_images=16, eval_images=8, num_threads=1),
    "vae_decoder_ft.json": dict(steps=2, batch_size=4, warmup_steps=1, block_out_channels=[8, 8, 8],
                                norm_num_groups=4, scaling_images=16, eval_images=8, num_threads=1),
    "clip.json": dict(steps=2, batch_size=8, warmup_steps=1, images_per_caption=2, text_hidden=32, text_layers=1,
                      text_heads=2, text_intermediate=64, vision_hidden=32, vision_layers=1, vision_heads=2,
                      vision_intermediate=64, eval_database=32, eval_queries=8, num_threads=1),
    "clip_entities.json": dict(steps=2, batch_size=8, warmup_steps=1, images_per_caption=2, text_hidden=32,
                               text_layers=1, text_heads=2, text_intermediate=64, vision_hidden=32, vision_layers=1,
                               vision_heads=2, vision_intermediate=64, eval_database=32, eval_queries=8, num_threads=1),
    "teacher.json": dict(steps=2, batch_size=4, warmup_steps=1, block_out_channels=[32, 32, 32], attention_heads=2,
                         train_images=16, eval_prompts=2, eval_steps=2, num_threads=1),
    "ladd_student_shapes.json": dict(steps=1, synthetic_pairs=4, teacher_steps=2, batch_size=4, micro_batch_size=4,
                                     database="world:8", disc_channels=8, eval_prompts=2, num_threads=1),
    "ladd_adapter_shapes.json": dict(steps=1, synthetic_pairs=4, teacher_steps=2, batch_size=4, micro_batch_size=4,
                                     database="world:8", disc_channels=8, eval_prompts=2, k=2, lora_rank=2,
                                     adapter_heads=2, num_threads=1),
}
TINY["ladd_no_retrieval_shapes.json"] = TINY["ladd_adapter_shapes.json"]


def _tiny_configs(folder):
    folder.mkdir()
    for name, overrides in TINY.items():
        config = json.loads((CONFIG_DIR / name).read_text())
        config.update(overrides)
        (folder / name).write_text(json.dumps(config))


def test_train_world_reproduces_a_servable_model_from_nothing(tmp_path):
    _tiny_configs(tmp_path / "configs")
    out, work = tmp_path / "model", tmp_path / "runs"
    argv = ["train", "world", "--out", str(out), "--work", str(work), "--configs", str(tmp_path / "configs"),
            "--index-pairs", "12", "--eval-prompts", "2"]
    assert main(argv) == 0

    for part in ("unet", "teacher", "adapter", "unet_lora", "vae", "text_encoder", "tokenizer", "scheduler",
                 "databases/dim", "databases/grey", "databases/bright", "no_retrieval/unet_lora", "no_retrieval/adapter"):
        assert (out / part).is_dir(), part
    assert json.loads((work / "eval.json").read_text())["n_prompts"] == 2
    assert json.loads((out / "no_retrieval" / "ladd_adapter.json").read_text())["config"]["retrieval"] is False
    assert json.loads((out / "databases" / "dim" / "manifest.json").read_text())["source"]["style"] == "dim"
    pipe = open_pipeline(out)  # the model's own databases, grey the default
    assert list(pipe.databases) == ["grey", "bright", "dim"]
    result = pipe(["a red circle on the left"], [0], mode="adapter", k=2)
    assert result.images.shape == (1, 32, 32, 3) and result.images.dtype == np.uint8
    assert len(result.neighbors[0]) == 2

    # --resume after a finished run skips the pretraining stages and leaves a servable model.
    walls = json.loads((work / "world.json").read_text())["stage_wall_s"]
    assert {"student", "databases", "adapter", "no_retrieval"} <= set(walls)
    assert main([*argv, "--resume"]) == 0
    assert open_pipeline(out)(["two blue squares"], [1], mode="adapter", k=2, database="dim").images.shape == (1, 32, 32, 3)


def test_train_world_names_a_missing_config(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    argv = ["train", "world", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"), "--configs", str(tmp_path / "configs")]
    assert main(argv) == 2
    assert "missing config file(s) vae.json" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
