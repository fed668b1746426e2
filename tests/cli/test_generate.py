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
