import pytest
import torch

from imageragturbo.model import HSpaceAdapter


def _inputs(b=2, k=3, c=64, h=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, h, generator=gen), torch.randn(b, k, c, h, h, generator=gen)


def test_untrained_adapter_is_identity():
    adapter = HSpaceAdapter(channels=64, num_heads=4, num_layers=2, ff_mult=2).eval()
    h_tgt, h_retr = _inputs()
    with torch.no_grad():
        out = adapter(h_tgt, h_retr, torch.tensor([0.9, 0.4]))
    assert torch.equal(out, h_tgt)


def test_trained_adapter_uses_retrieval_and_lambda():
    torch.manual_seed(0)
    adapter = HSpaceAdapter(channels=64, num_heads=4).eval()
    torch.nn.init.normal_(adapter.proj_out.weight, std=0.1)
    h_tgt, h_retr = _inputs()
    _, other_retr = _inputs(seed=1)
    lam = torch.tensor([1.0, 0.5])
    with torch.no_grad():
        out = adapter(h_tgt, h_retr, lam)
        out_other = adapter(h_tgt, other_retr, lam)
        g = adapter.delta(h_tgt, h_retr)
        out_zero_gate = adapter(h_tgt, h_retr, torch.zeros(2))
    assert (out - out_other).abs().max() > 1e-3, "the output must depend on the retrieved features"
    torch.testing.assert_close(out, h_tgt + lam.view(-1, 1, 1, 1) * g)
    assert torch.equal(out_zero_gate, h_tgt)


def test_retrieved_grid_may_differ_from_target_grid():
    adapter = HSpaceAdapter(channels=32, num_heads=4)
    torch.nn.init.normal_(adapter.proj_out.weight, std=0.1)
    out = adapter(torch.randn(1, 32, 4, 4), torch.randn(1, 2, 32, 6, 6), torch.ones(1))
    assert out.shape == (1, 32, 4, 4)


def test_bad_shapes_are_named():
    adapter = HSpaceAdapter(channels=64, num_heads=4)
    with pytest.raises(ValueError, match="h_retr must be"):
        adapter(torch.randn(2, 64, 4, 4), torch.randn(2, 32, 4, 4), torch.ones(2))


def test_save_and_reload_gives_identical_output(tmp_path):
    torch.manual_seed(0)
    adapter = HSpaceAdapter(channels=64, num_heads=4, num_layers=2, ff_mult=2)
    torch.nn.init.normal_(adapter.proj_out.weight, std=0.1)
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = HSpaceAdapter.from_pretrained(tmp_path, local_files_only=True, use_safetensors=True)
    h_tgt, h_retr = _inputs()
    lam = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        assert torch.equal(adapter.eval()(h_tgt, h_retr, lam), loaded.eval()(h_tgt, h_retr, lam))


def test_cached_position_embedding_serves_inference_then_training():
    torch.manual_seed(0)
    adapter = HSpaceAdapter(channels=64, num_heads=4)
    torch.nn.init.normal_(adapter.proj_out.weight, std=0.1)
    h_tgt, h_retr = _inputs()
    lam = torch.tensor([0.9, 0.4])
    with torch.inference_mode():
        first = adapter(h_tgt, h_retr, lam)  # fills the cache inside inference mode
    assert adapter._pos(4, 4, h_tgt) is adapter._pos(4, 4, h_tgt)
    assert not any("pos" in name for name in adapter.state_dict())
    h = h_tgt.clone().requires_grad_(True)
    again = adapter(h, h_retr, lam)
    again.sum().backward()  # a cached inference tensor would refuse this
    assert torch.equal(again.detach(), first) and h.grad.abs().sum() > 0
