import pytest
import torch

from imageragturbo.engines.fused_adapter import FusedHSpaceAdapter
from imageragturbo.engines.graphs import build_graphs
from imageragturbo.model import HSpaceAdapter, load_model
from imageragturbo.model.denoiser import RagDenoiser


def _trained(adapter: HSpaceAdapter, seed: int) -> HSpaceAdapter:
    """Every weight perturbed (layer norms' scale and shift included), as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return adapter.eval()


CONFIGS = [
    dict(channels=192, num_heads=4, num_layers=2, ff_mult=2),  # models/shapes-v1's adapter
    dict(channels=64, num_heads=8, num_layers=3, ff_mult=0),
    dict(channels=48, num_heads=2, head_dim=32, num_layers=1, ff_mult=4, pos_embed=False),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("hw", "k", "batch"), [((2, 2), 4, 1), ((3, 5), 2, 3)])
def test_fused_adapter_equals_the_adapter(config, hw, k, batch):
    adapter = _trained(HSpaceAdapter(**config), seed=len(config))
    fused = FusedHSpaceAdapter(adapter, hw, hw).eval()
    gen = torch.Generator().manual_seed(1)
    h_tgt = torch.randn(batch, config["channels"], *hw, generator=gen)
    h_retr = torch.randn(batch, k, config["channels"], *hw, generator=gen)
    lam = torch.rand(batch, generator=gen)
    with torch.inference_mode():
        ref, got = adapter(h_tgt, h_retr, lam), fused(h_tgt, h_retr, lam)
    # The edit itself (not only h_tgt + edit) must agree.
    delta_ref, delta_got = ref - h_tgt, got - h_tgt
    assert delta_ref.abs().max() > 0.1
    assert ((delta_got - delta_ref).abs().max() / delta_ref.abs().max()).item() < 1e-5


def test_fused_adapter_refuses_another_h_space_size():
    fused = FusedHSpaceAdapter(HSpaceAdapter(channels=32, num_heads=4).eval(), (2, 2), (2, 2))
    with pytest.raises(ValueError, match=r"built for H-features \(2, 2\) / \(2, 2\)"):
        fused(torch.zeros(1, 32, 4, 4), torch.zeros(1, 2, 32, 4, 4), torch.ones(1))


def test_denoise_adapter_graph_equals_the_reference_denoiser(adapter_model_dir):
    components = load_model(adapter_model_dir)
    _trained(components.adapter, seed=3)
    graph = build_graphs(components)["denoise_adapter"]
    assert isinstance(graph.module.adapter, FusedHSpaceAdapter)
    inputs = graph.spec.example_inputs({"batch": 2, "k": 3}, seed=2)
    args = [torch.from_numpy(inputs[name]) for name in graph.spec.input_names]
    with torch.inference_mode():
        ref = RagDenoiser(components.unet, components.adapter, "adapter")(*args)
        got = graph.module(*args)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
