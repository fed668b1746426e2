import pytest
import torch

from imageragturbo.model import slerp_inject


def test_w_one_returns_target_exactly():
    h_tgt, h_retr = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    assert torch.equal(slerp_inject(h_tgt, h_retr, 1.0), h_tgt)


def test_result_keeps_target_norm_and_moves_towards_retrieved():
    h_tgt, h_retr = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    previous = None
    for w in (0.9, 0.5, 0.1):
        out = slerp_inject(h_tgt, h_retr, w)
        torch.testing.assert_close(out.flatten(1).norm(dim=1), h_tgt.flatten(1).norm(dim=1))
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), h_retr.flatten(1))
        if previous is not None:
            assert bool((cos > previous).all()), "smaller w must move closer to the retrieved feature"
        previous = cos


def test_matches_slerp_formula_per_sample():
    h_tgt, h_retr = torch.randn(2, 16, 2, 2, dtype=torch.float64), torch.randn(2, 16, 2, 2, dtype=torch.float64)
    w = torch.tensor([0.3, 0.8])
    out = slerp_inject(h_tgt, h_retr, w)
    for b in range(2):
        a, r = h_tgt[b].flatten(), h_retr[b].flatten()
        an, rn = a / a.norm(), r / r.norm()
        omega = torch.arccos(an @ rn)
        ref = (torch.sin((1 - w[b]) * omega) * rn + torch.sin(w[b] * omega) * an) / torch.sin(omega) * a.norm()
        torch.testing.assert_close(out[b].flatten(), ref.to(out.dtype), rtol=1e-5, atol=1e-6)


def test_parallel_features_do_not_divide_by_zero():
    h = torch.randn(1, 8, 2, 2)
    out = slerp_inject(h, 2 * h, 0.5)
    torch.testing.assert_close(out, h)


@pytest.mark.parametrize("w", [0.0, -0.1, 1.5])
def test_bad_w_is_refused(w):
    with pytest.raises(ValueError, match="inject w"):
        slerp_inject(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), w)
