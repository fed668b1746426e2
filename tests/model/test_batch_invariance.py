"""An image is bit-identical alone or in any batch: k = 1..16 x batch sizes 1..16 on the
bundled model, where the stock CPU kernels do change images (model/batch_invariance.py)."""

import numpy as np
import pytest
import torch

from imageragturbo.model.batch_invariance import ItemwiseConv2d, ItemwiseLinear, batch_invariant, make_batch_invariant
from imageragturbo.paths import bundled_model_if_present
from imageragturbo.world.splits import eval_prompts

BUNDLED = bundled_model_if_present()
needs_bundled = pytest.mark.skipif(BUNDLED is None, reason="the bundled model is not trained (make world)")


@pytest.fixture(scope="module")
def bundled_pipe():
    from imageragturbo.model.pipeline import open_pipeline

    torch.set_num_threads(1)
    return open_pipeline(BUNDLED)


@needs_bundled
def test_every_k_and_batch_size_gives_the_image_of_the_request_alone(bundled_pipe):
    prompts = [p for p, _ in eval_prompts("test-seen", 16)]
    seeds = [7 * i + 1 for i in range(16)]
    differ = []
    for k in range(1, 17):
        alone = [bundled_pipe([p], [s], mode="adapter", k=k).images[0] for p, s in zip(prompts, seeds)]
        for size in range(2, 17):
            batch = bundled_pipe(prompts[:size], seeds[:size], mode="adapter", k=k).images
            differ += [(k, size, i) for i in range(size) if not np.array_equal(batch[i], alone[i])]
    assert differ == [], f"{len(differ)} images changed with the batch (k, batch size, item): {differ[:10]}"


@needs_bundled
def test_the_stock_kernels_do_change_images_with_the_batch(bundled_pipe):
    """The control: without the batch-invariant layers some latent of these batches changes
    (whether a pixel level moves too depends on the CPU's kernels: on an AVX-512 machine no
    uint8 image of these batches did, so the control reads the latents)."""
    prompts = [p for p, _ in eval_prompts("test-seen", 16)]
    bundled_pipe.batch_invariant = False
    try:
        changed = 0
        for k in (2, 3):
            alone = [bundled_pipe([p], [i], mode="adapter", k=k).latents[0] for i, p in enumerate(prompts)]
            batch = bundled_pipe(prompts, list(range(16)), mode="adapter", k=k).latents
            changed += sum(not torch.equal(b, a) for b, a in zip(batch, alone))
    finally:
        bundled_pipe.batch_invariant = True
    assert changed > 0


def test_outside_the_context_the_layers_are_the_stock_ones():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(6, 3, 8, 8)
    stock = model(x)
    keys = list(model.state_dict())
    make_batch_invariant(model)
    assert isinstance(model[0], ItemwiseConv2d) and isinstance(model[3], ItemwiseLinear)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), stock)
    with batch_invariant():
        invariant = model(x)
        assert torch.equal(invariant[4:5], model(x[4:5]))
        # a channels-last slice gets the image of its contiguous copy
        assert torch.equal(model(x.contiguous(memory_format=torch.channels_last))[4:5], invariant[4:5])
    torch.testing.assert_close(invariant, stock)
