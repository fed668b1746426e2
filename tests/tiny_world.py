"""The shapes-world recipe at toy scale: every stage's config shrunk so that `train world` runs
from nothing in seconds, for tests that need a complete v2 model directory (style databases,
adapter, no-retrieval control)."""

import json
from pathlib import Path

from imageragturbo.paths import TRAINING_CONFIGS

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
for _name in ("ladd_adapter_no_retrieval_shapes.json", "ladd_adapter_xattn_shapes.json",
              "ladd_adapter_xattn_no_retrieval_shapes.json"):
    TINY[_name] = TINY["ladd_adapter_shapes.json"]


def tiny_configs(folder: Path) -> Path:
    """Every stage's config at toy scale, written into ``folder``."""
    folder.mkdir()
    for name, overrides in TINY.items():
        config = json.loads((TRAINING_CONFIGS / name).read_text())
        config.update(overrides)
        (folder / name).write_text(json.dumps(config))
    return folder


def build_tiny_world(root: Path) -> Path:
    """A complete toy-scale v2 model directory under ``root`` (``root/model``)."""
    from imageragturbo.training.world_recipe import build_world

    configs = tiny_configs(root / "configs")
    build_world(root / "model", root / "runs", configs=configs, index_pairs=12, eval_prompts=2)
    return root / "model"
