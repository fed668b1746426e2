import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from imageragturbo.cli import main
from imageragturbo.eval.leverage import measure_leverage
from imageragturbo.model import load_model
from imageragturbo.model.text import PromptEncoder

PROMPTS = ["a red circle on the left", "two blue squares", "a green triangle above a red circle"]


def test_a_decoder_without_cross_attention_takes_nothing_from_the_decoder_text(tiny_model_dir):
    torch.manual_seed(0)
    parts = load_model(tiny_model_dir)
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder)
    full = measure_leverage(parts.unet, encoder, PROMPTS, 999)
    assert full.change["decoder_text"] > 0  # this decoder cross-attends to the prompt
    n = len(parts.unet.config.up_block_types)
    mid_only = UNet2DConditionModel.from_config({**parts.unet.config, "up_block_types": ("UpBlock2D",) * n}).eval()
    lev = measure_leverage(mid_only, encoder, PROMPTS, 999)
    assert lev.change["decoder_text"] == 0.0
    assert lev.change["h"] > 0 and lev.change["h_zero"] > 0
    with pytest.raises(ValueError, match="two different prompts"):
        measure_leverage(parts.unet, encoder, [PROMPTS[0]] * 3, 999)


def test_eval_leverage_command_prints_and_writes_every_timestep(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lev.json"
    assert main(["eval", "leverage", "--model", str(tiny_model_dir), "--n", "4", "--timesteps", "999,499", "--json", str(out)]) == 0
    assert "| student (unet/) | 999 |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["timestep"] for r in rows] == [999, 499] and all(r["n"] == 4 for r in rows)
