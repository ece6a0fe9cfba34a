"""DivPrune on tiny Qwen2.5-VL (default position policy: original M-RoPE ids) keeps exactly the tokens
a brute-force max-min selection over HF's own LLM input embeddings keeps, in a ragged batch."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from atp.token.selection import kept_count
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

RAGGED = [(2, [(8, 8), (4, 6)], 3), (3, [], 6), (1, [(6, 4)], 2)]  # 22, 0 and 6 image tokens
KEEP_RATIO = 0.3


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def brute_force_divprune(model, batch) -> list[list[int]]:
    """DivPrune's documented rule as loops over the stock model's LLM input embeddings
    (`output_hidden_states[0]`): distance 1 - cosine between a sample's image tokens; first the token
    farthest from its nearest neighbour, then repeatedly the token whose distance to the chosen set
    (its minimum distance to a chosen token) is largest; keep round(N * ratio). Ties: the earlier token."""
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        positions = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0].tolist()
        tokens = [embeds[b, p].double().tolist() for p in positions]
        n = len(tokens)
        if n == 0:
            kept.append([])
            continue
        distance = [[cosine_distance(tokens[i], tokens[j]) for j in range(n)] for i in range(n)]
        nearest = [min(distance[i][j] for j in range(n) if j != i) for i in range(n)]
        chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
        while len(chosen) < int(kept_count(torch.tensor([n]), KEEP_RATIO)[0]):
            to_set = {i: min(distance[i][c] for c in chosen) for i in range(n) if i not in chosen}
            chosen.append(max(to_set, key=lambda i: (to_set[i], -i)))
        kept.append(sorted(chosen))
    return kept


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_divprune_keeps_what_the_brute_force_keeps(mode):
    model = qwen_model("qwen2_5_vl")
    batch = qwen_batch(RAGGED)
    reference = brute_force_divprune(model, batch)
    assert [len(k) for k in reference] == [7, 0, 2]
    atp.apply(model, atp.build_pruner("divprune", keep_ratio=KEEP_RATIO), mode=mode)
    with torch.no_grad():
        model(**batch)
    kept = atp.stats(model).kept[0]
    assert [kept[b].tolist() for b in range(len(RAGGED))] == reference
