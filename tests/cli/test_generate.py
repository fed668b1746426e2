import hashlib

from PIL import Image

from imageragturbo.cli import main


def test_generate_writes_png_and_same_seed_same_bytes(tiny_v_model_dir, tmp_path, capsys):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.png"
        assert main(["generate", "a red circle on the left", "--seed", str(seed), "--mode", "off",
                     "--model", str(tiny_v_model_dir), "--out", str(out)]) == 0
        outs.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert outs[0] == outs[1] != outs[2]
    image = Image.open(tmp_path / "a.png")
    assert image.format == "PNG" and image.mode == "RGB"
    assert "mode=off" in capsys.readouterr().err


def test_generate_errors_name_the_problem(tmp_path, tiny_v_model_dir, capsys):
    code = main(["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "model directory not found" in capsys.readouterr().err
    code = main(["generate", "x", "--mode", "adapter", "--model", str(tiny_v_model_dir), "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "adapter" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _png_bytes(path):
    return path.read_bytes()


def test_prompts_file_one_png_per_line_same_as_alone(tiny_v_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n\n# a comment\ntwo blue squares\t7\na green triangle, at the top!\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), "--seed", "5", "--mode", "off", "--max-batch", "2",
                 "--model", str(tiny_v_model_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0001-a-red-circle-on-the-left.png", "0004-two-blue-squares.png",
                     "0005-a-green-triangle-at-the-top.png"]
    assert "wrote 3 images" in err and "2 pipeline call(s) of up to 2" in err
    assert "warm-up call (1 image, not written)" in err and "warm, per image over 3 image(s)" in err
    # Batched with the model loaded once, each line's PNG is the one `generate PROMPT --seed S` writes.
    for name, prompt, seed in ((names[0], "a red circle on the left", 5), (names[1], "two blue squares", 7),
                               (names[2], "a green triangle, at the top!", 5)):
        alone = tmp_path / f"alone-{name}"
        assert main(["generate", prompt, "--seed", str(seed), "--mode", "off", "--model", str(tiny_v_model_dir),
                     "--out", str(alone)]) == 0
        assert _png_bytes(alone) == _png_bytes(out / name), name
        assert Image.open(out / name).format == "PNG"


def test_n_images_of_one_prompt_take_consecutive_seeds(tiny_v_model_dir, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert main(["generate", "two red circles", "--n", "3", "--seed", "10", "--mode", "off", "--no-warmup",
                 "--model", str(tiny_v_model_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many-0.png", "many-1.png", "many-2.png"]
    assert "seeds 10..12; 1 pipeline call(s) of up to 3" in err and "warm-up call" not in err
    single = tmp_path / "single" / "s.png"
    assert main(["generate", "two red circles", "--seed", "11", "--mode", "off", "--model", str(tiny_v_model_dir),
                 "--out", str(single)]) == 0
    assert _png_bytes(single) == _png_bytes(tmp_path / "many-1.png")
    assert len({_png_bytes(tmp_path / f"many-{i}.png") for i in range(3)}) == 3


def test_quiet_by_default_and_verbose_brings_library_chatter_back(tiny_v_model_dir, tmp_path, capsys):
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    argv = ["generate", "x", "--mode", "off", "--model", str(tiny_v_model_dir), "--out", str(tmp_path / "x.png")]
    assert main(argv) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert not transformers_logging.is_progress_bar_enabled() and not diffusers_logging.is_progress_bar_enabled()
    assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    assert main([*argv, "-v"]) == 0
    assert "Loading weights" in capsys.readouterr().err
    assert transformers_logging.is_progress_bar_enabled() and diffusers_logging.is_progress_bar_enabled()
    assert diffusers_logging.get_verbosity() == diffusers_logging.WARNING
    assert main(argv) == 0  # and back to quiet


def test_prompts_file_errors_name_the_line(tiny_v_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\nbad seed\tseven\n")
    base = ["--model", str(tiny_v_model_dir), "--mode", "off"]
    assert main(["generate", "--prompts-file", str(prompts), "--out", str(tmp_path / "o"), *base]) == 2
    assert f"{prompts}:2: the seed after the tab must be an integer" in capsys.readouterr().err
    prompts.write_text("a red circle\n")
    assert main(["generate", "--prompts-file", str(prompts), "--out", str(tmp_path / "o.png"), *base]) == 2
    assert "--out is a folder" in capsys.readouterr().err
    assert main(["generate", "x", "--prompts-file", str(prompts), "--out", str(tmp_path / "o"), *base]) == 2
    assert "either a PROMPT or --prompts-file" in capsys.readouterr().err
    assert main(["generate", "--out", str(tmp_path / "o.png"), *base]) == 2
    assert not (tmp_path / "o").exists()


def test_version_flag(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("imageragturbo 0.")
