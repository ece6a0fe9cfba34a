"""Checks every model family's runtime tests share: the seeded random pruner, greedy decoding, and
`none` against the stock model."""

from __future__ import annotations

import torch
from torch.testing import assert_close

import atp


def random_pruner(**kwargs):
    """`random` before layers 1 and 3, keeping half each time (seeded); kwargs override."""
    kwargs = {"layers": [1, 3], "keep_ratio": [0.5, 0.5], "seed": 3, **kwargs}
    return atp.build_pruner("random", **kwargs)


def greedy(model, batch, tokens: int = 8, **kwargs):
    """Exactly `tokens` greedily generated tokens."""
    return model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)


def check_none_equals_stock(model, batch) -> list[int]:
    """`none` gives the stock logits exactly at every real position and the stock greedy tokens;
    returns the visual tokens the runtime counted at layer 0, per sample."""
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**batch).logits
        stock_generated = greedy(model, batch)
        atp.apply(model, atp.build_pruner("none"))
        ours = model(**batch).logits
    assert_close(ours[real], stock[real], rtol=0, atol=0)
    counted = atp.stats(model).visual_tokens[:, 0].tolist()
    assert torch.equal(greedy(model, batch), stock_generated)
    return counted
