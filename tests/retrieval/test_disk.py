import numpy as np
import pytest

from imageragturbo.retrieval.disk import DIRECT_GATHER_MAX, gather_rows


@pytest.fixture()
def memmapped(tmp_path):
    rows = np.arange(500 * 3 * 2, dtype=np.float16).reshape(500, 3, 2)
    np.save(tmp_path / "rows.npy", rows)
    return rows, np.load(tmp_path / "rows.npy", mmap_mode="r", allow_pickle=False)


@pytest.mark.parametrize("shape", [(1, 4), (2, 3), (1, DIRECT_GATHER_MAX), (4, DIRECT_GATHER_MAX)])
def test_gather_rows_small_and_large_requests_agree_with_numpy(memmapped, shape):
    rows, mapped = memmapped
    ids = np.random.default_rng(shape[1]).integers(0, 500, shape)
    ids[0, :2] = 7  # a repeated id
    got = gather_rows(mapped, ids)
    assert type(got) is np.ndarray and got.shape == (*shape, 3, 2) and got.dtype == np.float16
    np.testing.assert_array_equal(got, rows[ids])


@pytest.mark.parametrize("bad", [-1, 500])
@pytest.mark.parametrize("size", [2, DIRECT_GATHER_MAX + 1])
def test_gather_rows_refuses_ids_out_of_range(memmapped, bad, size):
    ids = np.zeros((1, size), dtype=np.int64)
    ids[0, -1] = bad
    with pytest.raises(IndexError, match=r"ids must be in \[0, 500\)"):
        gather_rows(memmapped[1], ids)
