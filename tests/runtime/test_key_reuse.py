"""PyramidDrop's probe projects the keys of the layer about to run for every token; in inference the
layer reuses them for the tokens it keeps instead of projecting them again. Checked against the
run without reuse (gradients on: the probe's keys are never reused) and against FlopCounterMode:
the matmul FLOPs saved are exactly those k_proj rows."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import atp
from tests.conftest import make_batch

LAYERS = [1, 2, 3]


def pdrop():
    return atp.build_pruner("pdrop", layers=LAYERS, keep_ratios=[0.5, 0.25, 0.125])


def forward(model, batch, grad: bool):
    """(logits, matmul FLOPs, stats) of one forward, with gradients on (no reuse) or off."""
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(grad), counter:
        logits = model(**batch).logits.detach()
    return logits, counter.get_total_flops(), atp.stats(model)


@pytest.mark.parametrize("mode", ["drop", "mask"])
@pytest.mark.parametrize("prompts", [[(3, 4)], [(2, 3), (5, 6)]])
def test_reused_keys_give_the_same_logits_and_save_exactly_the_kept_rows_k_proj(model_factory, mode, prompts):
    model = model_factory()
    batch = make_batch(prompts)
    atp.apply(model, pdrop(), mode=mode)
    reused, reused_flops, stats = forward(model, batch, grad=False)
    reference, reference_flops, reference_stats = forward(model, batch, grad=True)
    for layer in LAYERS:
        for a, b in zip(stats.kept[layer], reference_stats.kept[layer]):
            assert torch.equal(a, b)
    real = batch["attention_mask"].bool()
    assert_close(reused[real], reference[real], rtol=1e-5, atol=1e-6)
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    if mode == "drop":  # the batch's padded length per layer: max over samples of the tokens left
        rows = [int(stats.tokens[:, layer].max()) for layer in LAYERS]
    else:  # mask mode keeps the length
        rows = [batch["input_ids"].shape[1]] * len(LAYERS)
    saved = sum(2 * len(prompts) * n * config.hidden_size * config.num_key_value_heads * head_dim for n in rows)
    assert reference_flops - reused_flops == saved
    # the reused projections are booked apart from the pruner's overhead, and only when reused
    assert 0.0 < stats.reused_seconds < stats.scoring_seconds
    assert reference_stats.reused_seconds == 0.0


def test_no_override_outlives_the_forward(model_factory):
    model = model_factory()
    atp.apply(model, pdrop())
    with torch.no_grad():
        model(**make_batch([(3, 4)]))
    runtime = atp.runtime_of(model)
    assert all("forward" not in layer.self_attn.k_proj.__dict__ for layer in runtime.adapter.layers)
    atp.remove(model)
    assert all("forward" not in layer.self_attn.k_proj.__dict__ for layer in runtime.adapter.layers)
