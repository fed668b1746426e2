"""int8 H-features (retrieval/quantize.py): the error bound, zero channels, and float16 scales
at both ends of their range."""

import numpy as np
import pytest

from imageragturbo.paths import bundled_model_if_present
from imageragturbo.retrieval.quantize import QMAX, dequantize_h, quantize_h


def _within_half_a_step(h, q, scale):
    h = np.asarray(h, np.float32)
    error = np.abs(dequantize_h(q, scale) - h)
    half = scale.astype(np.float32)[..., None, None] / 2
    # float32 arithmetic of the check itself: a few ulps of the value
    assert (error <= half + 4 * np.finfo(np.float32).eps * np.abs(h)).all(), float((error - half).max())


@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
def test_every_value_is_within_half_a_step_and_no_code_clips(scale_dtype):
    rng = np.random.default_rng(0)
    # channels of very different magnitudes, heavy tails, and one outlier per channel
    h = rng.standard_t(3, size=(64, 32, 4, 4)).astype(np.float32) * np.logspace(-3, 3, 32, dtype=np.float32)[None, :, None, None]
    q, scale = quantize_h(h, scale_dtype)
    assert q.dtype == np.int8 and q.shape == h.shape
    assert scale.dtype == scale_dtype and scale.shape == (64, 32)
    assert np.abs(q.astype(int)).max() <= QMAX
    # the scale is never rounded below the channel's max / 127: |h| / scale <= 127, nothing clips
    assert (np.abs(h).max(axis=(2, 3)) <= QMAX * scale.astype(np.float64)).all()
    # and each channel's largest value uses the full range
    assert (np.abs(q.astype(int)).max(axis=(2, 3)) >= QMAX - 1).all()
    _within_half_a_step(h, q, scale)


def test_gaussian_rows_lose_about_a_third_of_a_percent():
    h = np.random.default_rng(1).standard_normal((256, 64, 2, 2)).astype(np.float32)
    d = dequantize_h(*quantize_h(h))
    rel = np.sqrt(np.mean((d - h) ** 2) / np.mean(h**2))
    # uniform rounding error: step / sqrt(12), step = max|h| / 127 over 4 values
    assert 0.0015 < rel < 0.0035, rel


@pytest.mark.skipif(bundled_model_if_present() is None, reason="no bundled model")
def test_the_bundled_default_database_quantises_with_relative_rms_error_0_003():
    """Measured on the bundled model's default database (grey, 3072 rows of [192, 2, 2]):
    relative RMS error 0.00296 (results/retrieval.md: 0.0030 on 256 pairs of it)."""
    h = np.load(bundled_model_if_present() / "databases" / "grey" / "h_retr.npy").astype(np.float32)
    q, scale = quantize_h(h)
    d = dequantize_h(q, scale)
    rel = float(np.sqrt(np.mean((d - h) ** 2) / np.mean(h**2)))
    assert 0.0025 < rel < 0.0035, rel
    _within_half_a_step(h, q, scale)


def test_a_zero_channel_has_scale_zero_and_comes_back_as_zeros():
    h = np.ones((3, 4, 2, 2), np.float32)
    h[1, 2] = 0
    h[2] = 0
    q, scale = quantize_h(h)
    assert scale[1, 2] == 0 and (scale[2] == 0).all() and (scale[0] > 0).all()
    assert (q[1, 2] == 0).all() and (q[2] == 0).all()
    d = dequantize_h(q, scale)
    assert np.isfinite(d).all() and (d[1, 2] == 0).all() and (d[2] == 0).all()
    np.testing.assert_allclose(d[0], 1.0, rtol=1e-3)


def test_a_scale_below_float16s_range_becomes_its_smallest_value_and_keeps_the_bound():
    tiny = np.finfo(np.float16).smallest_subnormal
    h = np.zeros((1, 3, 2, 2), np.float32)
    h[0, 0] = [[1e-9, -2e-9], [0, 5e-10]]  # max / 127 underflows float16 to 0
    h[0, 1] = [[1.06e-5, -0.5e-5], [0.2e-5, 0]]  # max / 127 = 1.4 subnormal steps: rounds down to 1
    h[0, 2] = [[3.0, -1.0], [0.5, 0]]
    q, scale = quantize_h(h, np.float16)
    assert scale[0, 0] == tiny
    assert scale[0, 1] == 2 * tiny and 127 * float(scale[0, 1]) >= 1.06e-5
    _within_half_a_step(h, q, scale)


def test_a_scale_above_float16s_range_is_refused_and_float32_scales_hold_it():
    h = np.full((1, 2, 2, 2), 1e7, np.float32)  # 1e7 / 127 > 65504
    with pytest.raises(ValueError, match="overflows a float16 scale; use float32 scales"):
        quantize_h(h, np.float16)
    q, scale = quantize_h(h, np.float32)
    _within_half_a_step(h, q, scale)
    # just below the edge: the largest float16 scale still holds it
    h = np.full((1, 1, 2, 2), 65504 * 127, np.float32)
    q, scale = quantize_h(h, np.float16)
    assert np.isfinite(scale).all()
    _within_half_a_step(h, q, scale)


@pytest.mark.parametrize("h, needle", [
    (np.full((1, 2, 2, 2), np.nan, np.float32), "NaN or infinite"),
    (np.ones((4, 8), np.float32), r"must be \[N, C, ...\]"),
])
def test_what_cannot_be_quantised_is_refused(h, needle):
    with pytest.raises(ValueError, match=needle):
        quantize_h(h)


def test_dequantise_broadcasts_over_gathered_batches():
    h = np.random.default_rng(2).standard_normal((6, 5, 3, 3)).astype(np.float32)
    q, scale = quantize_h(h)
    ids = np.array([[4, 0], [4, 5]])
    batched = dequantize_h(q[ids], scale[ids])
    assert batched.shape == (2, 2, 5, 3, 3) and batched.dtype == np.float32
    np.testing.assert_array_equal(batched[1, 0], dequantize_h(q, scale)[4])
