"""Checks every model family's runtime tests share: the seeded random pruner, greedy decoding, and
`none` against the stock model."""

from __future__ import annotations

import math

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


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def divprune_by_loops(tokens: list[list[float]], count: int) -> list[int]:
    """DivPrune's max-min rule as plain loops over one sample's token vectors: distance 1 - cosine;
    first the token farthest from its nearest neighbour, then repeatedly the token whose distance to
    the chosen set (its minimum distance to a chosen token) is largest, until `count` are chosen.
    Ties: the earlier token. Returns the chosen indices in order."""
    n = len(tokens)
    if n == 0:
        return []
    distance = [[cosine_distance(tokens[i], tokens[j]) for j in range(n)] for i in range(n)]
    nearest = [min(distance[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < count:
        to_set = {i: min(distance[i][c] for c in chosen) for i in range(n) if i not in chosen}
        chosen.append(max(to_set, key=lambda i: (to_set[i], -i)))
    return sorted(chosen)
