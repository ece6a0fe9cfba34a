"""Attention probes: `attention_received` against the full attention rows it replaces."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
import atp.runtime.probe as probe
from atp.runtime.pruner import PruneContext, TokenPruner
from tests.conftest import make_batch


class Recorder(TokenPruner):
    """Before layer 2: layer 1's full attention rows and `attention_received` for given weights."""

    name = "probe_recorder"

    def __init__(self, heads: str, exclude_self: bool) -> None:
        super().__init__([2])
        self.heads, self.exclude_self = heads, exclude_self
        self.seen: dict = {}

    def probe_layers(self) -> set[int]:
        return {1}

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        length = ctx.visual.shape[1]
        slots = torch.arange(length).expand_as(ctx.visual)
        weights = torch.rand(ctx.visual.shape[0], 2, length, generator=torch.Generator().manual_seed(0))
        weights[:, :, :3] = 0.0  # rows nobody asks for are skipped
        weights[:, 1] *= ctx.visual  # a weight that is zero on non-visual rows
        self.seen = {
            "full": ctx.attention(1, slots),  # [B, H, S, S]
            "weights": weights,
            "received": ctx.attention_received(1, weights, heads=self.heads, exclude_self=self.exclude_self),
        }
        return torch.ones_like(ctx.visual)


@pytest.mark.parametrize(
    ("chunk_elements", "min_rows"),
    [
        (1, 64),  # one query row and one key group's heads per block
        (700, 64),  # a few rows, one key group (GQA: 2 of the 4 heads) per block
        (2**21, 64),  # all rows and heads at once
        (2**21, 10**6),  # all rows, one key group per block
    ],
)
@pytest.mark.parametrize("heads", ["mean", "max"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_attention_received_equals_reduced_full_rows(
    model_factory, monkeypatch, chunk_elements, min_rows, heads, exclude_self
):
    monkeypatch.setattr(probe, "QUERY_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(probe, "MIN_CHUNK_ROWS", min_rows)
    model = model_factory()
    recorder = Recorder(heads, exclude_self)
    atp.apply(model, recorder, mode="drop")
    with torch.no_grad():
        model(**make_batch([(2, 3), (6, 1), (1, 7)]))
    full, weights = recorder.seen["full"], recorder.seen["weights"]
    probs = full.mean(1) if heads == "mean" else full.amax(1)  # [B, S, S]
    if exclude_self:
        probs = probs * (1 - torch.eye(probs.shape[-1]))
    expected = torch.einsum("bni,bij->bnj", weights, probs)
    assert_close(recorder.seen["received"], expected, rtol=1e-5, atol=1e-7)


def test_attention_received_refuses_unknown_head_reduction(model_factory):
    model = model_factory()
    atp.apply(model, Recorder("median", False), mode="drop")
    with pytest.raises(ValueError, match="heads must be one of"):
        with torch.no_grad():
            model(**make_batch([(2, 3)]))
