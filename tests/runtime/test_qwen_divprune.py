"""DivPrune on tiny Qwen2.5-VL (default position policy: original M-RoPE ids) keeps exactly the tokens
a brute-force max-min selection over HF's own LLM input embeddings keeps, in a ragged batch."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.token.selection import kept_count
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model
from tests.runtime.family_checks import divprune_by_loops

RAGGED = [(2, [(8, 8), (4, 6)], 3), (3, [], 6), (1, [(6, 4)], 2)]  # 22, 0 and 6 image tokens
KEEP_RATIO = 0.3


def brute_force_divprune(model, batch) -> list[list[int]]:
    """DivPrune's documented rule (`divprune_by_loops`) over the stock model's LLM input embeddings
    (`output_hidden_states[0]`) of each sample's image tokens; keep round(N * ratio)."""
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        positions = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0].tolist()
        tokens = [embeds[b, p].double().tolist() for p in positions]
        kept.append(divprune_by_loops(tokens, int(kept_count(torch.tensor([len(tokens)]), KEEP_RATIO)[0])))
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
