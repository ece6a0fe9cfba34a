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


def check_generate_identical_across_modes_and_cache(model, batch, tokens: int = 10, build=random_pruner) -> None:
    """The pruner `build()` (default `random_pruner()`) gives the same greedy tokens in drop and mask mode,
    with the KV cache and without, and different ones from the stock model (the pruner really acts)."""
    outputs = {}
    for mode in ("drop", "mask"):
        atp.apply(model, build(), mode=mode)
        for use_cache in (True, False):
            outputs[mode, use_cache] = greedy(model, batch, tokens, use_cache=use_cache)
    reference = outputs["drop", True]
    assert reference.shape[1] == batch["input_ids"].shape[1] + tokens
    for key, generated in outputs.items():
        assert torch.equal(generated, reference), key
    atp.remove(model)
    assert not torch.equal(greedy(model, batch, tokens), reference)


def check_ragged_equals_batch_of_one(model, batch, singles: list[dict], mode: str) -> None:
    """With `random_pruner()` in `mode`, each sample of the ragged `batch` gets the last-position
    logits, kept tokens and greedy tokens it gets alone (`singles[b]`: the same sample as a batch of one)."""
    atp.apply(model, random_pruner(), mode=mode)
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        batched_kept = atp.stats(model).kept
        for b, single in enumerate(singles):
            alone = model(**single).logits[:, -1]
            assert_close(alone[0], batched[b], rtol=1e-4, atol=1e-5)
            for layer, kept in atp.stats(model).kept.items():
                assert torch.equal(kept[0], batched_kept[layer][b])
    together = greedy(model, batch)[:, -8:]
    for b, single in enumerate(singles):
        assert torch.equal(greedy(model, single)[0, -8:], together[b])
