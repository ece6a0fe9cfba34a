"""Training runs through the runtime: gradients reach soft masks and flow through drops."""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

import atp
from atp.runtime.pruner import PruneContext, TokenPruner
from tests.conftest import make_batch


class LearnedSoftMask(TokenPruner):
    """A toy learned pruner: one logit per image-token index -> sigmoid keep weight."""

    name = "test_soft"

    def __init__(self, layer: int, num_visual: int) -> None:
        super().__init__([layer])
        self.logits = nn.Parameter(torch.linspace(-2.0, 2.0, num_visual))

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        weight = torch.sigmoid(self.logits)[ctx.visual_index.clamp_min(0)]
        return torch.where(ctx.visual, weight, torch.ones_like(weight))


def test_gradient_reaches_soft_mask_parameters(model_factory, attn):
    model = model_factory(attn_implementation=attn)
    pruner = LearnedSoftMask(layer=1, num_visual=16)
    atp.apply(model, pruner, mode="mask")
    batch = make_batch([(2, 3), (4, 2)])
    logits = model(**batch).logits
    logits[:, -1].logsumexp(-1).sum().backward()
    assert pruner.logits.grad is not None
    assert pruner.logits.grad.abs().min() > 0  # every token's weight influenced the output
    soft = atp.stats(model).soft_visual_tokens[0]
    assert soft[0] == 16 and 0 < soft[1] < 16


def test_soft_mask_of_ones_and_zeros_equals_hard_mask(model_factory):
    """A soft weight of exactly 0/1 hides/keeps like a hard decision (up to the 1e-6 floor)."""
    model = model_factory()
    batch = make_batch([(2, 3)])
    pruner = LearnedSoftMask(layer=1, num_visual=16)
    with torch.no_grad():
        pruner.logits.copy_(torch.tensor([40.0, -40.0] * 8))
    atp.apply(model, pruner, mode="mask")
    with torch.no_grad():
        soft = model(**batch).logits[:, -1]
    keep = [i for i in range(16) if i % 2 == 0]

    class Hard(TokenPruner):
        name = "test_hard"

        def prune(self, ctx):
            return torch.isin(ctx.visual_index, torch.tensor(keep)) | ~ctx.visual

    atp.apply(model, Hard([1]), mode="drop")
    with torch.no_grad():
        hard = model(**batch).logits[:, -1]
    assert_close(soft, hard, rtol=1e-3, atol=1e-4)


def test_drop_and_mask_give_equal_gradients_to_the_projector(model_factory):
    model = model_factory()
    batch = make_batch([(2, 3), (5, 1)])
    grads = {}
    for mode in ("drop", "mask"):
        model.zero_grad()
        atp.apply(model, atp.build_pruner("random", layers=[1, 2], keep_ratio=0.5), mode=mode)
        model(**batch).logits[:, -1].logsumexp(-1).sum().backward()
        grads[mode] = model.model.multi_modal_projector.linear_1.weight.grad.clone()
    assert grads["drop"].abs().sum() > 0
    assert_close(grads["drop"], grads["mask"], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_runs_the_pruner_once_per_forward(model_factory):
    model = model_factory()
    model.activation_checkpointing_enable()
    model.train()
    calls = []
    pruner = atp.build_pruner("random", layers=[1], keep_ratio=0.5)
    original = pruner.prune
    pruner.prune = lambda ctx: calls.append(ctx.layer) or original(ctx)
    atp.apply(model, pruner, mode="drop")
    batch = make_batch([(2, 3)])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert calls == [1]
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
