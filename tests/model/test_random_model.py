"""The SD-Turbo-scale random model and the synthetic database: parameter counts of the
published architectures (meta device), and, at toy scale, a directory and a database the
pipeline loads and serves like real ones."""

import numpy as np
import pytest

from imageragturbo.benchmarks.synthetic import SyntheticPairs, build_synthetic_database, model_row_shapes
from imageragturbo.cli import main
from imageragturbo.model import random_model
from imageragturbo.model.pipeline import open_pipeline


def test_the_parameter_counts_are_the_published_ones():
    counts = random_model.parameter_counts()
    for name, published in random_model.PUBLISHED.items():
        assert abs(counts[name] - published) / published < 0.005, (name, counts[name])
    assert random_model.parameter_counts(tiny_vae=True)["vae"] < 3e6  # TAESD


def test_a_random_model_at_toy_scale_loads_and_serves_a_synthetic_database(tmp_path):
    model = random_model.write_random_model(tmp_path / "sd", toy=True)
    assert not (tmp_path / "sd.partial").exists()
    assert sorted(p.name for p in (model / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(FileExistsError):
        random_model.write_random_model(model)
    shapes = model_row_shapes(model)
    assert shapes == {"key_dim": 64, "latent": (4, 8, 8), "h": (64, 4, 4)}

    assert main(["synthetic", "database", "--model", str(model), "--n", "40", "--out", str(tmp_path / "db")]) == 0
    pipe = open_pipeline(model, databases=[f"synthetic={tmp_path / 'db'}"])
    result = pipe(["a red circle", "anything at all"], [1, 2], mode="adapter", k=3)
    assert result.images.shape == (2, 64, 64, 3) and result.images.dtype == np.uint8
    assert all(len(row) == 3 and row[0].caption.startswith("synthetic pair ") for row in result.neighbors)
    store = pipe.databases["synthetic"].store
    np.testing.assert_allclose(np.linalg.norm(store.text_emb, axis=1), 1, atol=1e-3)
    assert store.h_features(np.array([[0]])).shape == (1, 1, 64, 4, 4)
    # rows are drawn from their row number: the same database twice is the same bytes
    build_synthetic_database(model, 40, tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "h_retr.npy").read_bytes() == (tmp_path / "db" / "h_retr.npy").read_bytes()


def test_a_synthetic_source_needs_rows():
    with pytest.raises(ValueError, match="at least 1 row"):
        SyntheticPairs(0)
