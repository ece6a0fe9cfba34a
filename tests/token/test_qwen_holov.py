"""HoloV on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL (no [CLS]: the official Qwen2.5-VL port's score, the
attention each token receives in the last tower layer) keeps exactly the tokens a brute-force
recomputation keeps: the rule written as loops (`holov_by_loops`) over the stock tower's attention
(`tests.qwen_tower_reference`) and the stock model's LLM input embeddings, with the Qwen port's crop
count, under sdpa and eager, drop and mask, for a ragged batch of 3 images of different sizes and for
each sample alone."""

from __future__ import annotations

import pytest
import torch

import atp
from tests.qwen_inputs import FAMILIES, IMAGE, qwen_batch, qwen_model
from tests.qwen_tower_reference import brute_force_attention, check_kept_on_qwen
from tests.token.test_holov import holov_by_loops

RAGGED = [(2, [(8, 8)], 3), (3, [(6, 10)], 1), (1, [(4, 8)], 2)]  # 16, 15 and 8 visual tokens


def received_by_loops(probs: torch.Tensor) -> list[float]:
    """Per visual token: the attention its 4 patches receive, averaged over heads, queries and patches."""
    heads, queries, _ = probs.shape
    return [
        sum(float(probs[h, i, 4 * u + p]) for h in range(heads) for i in range(queries) for p in range(4))
        / (4 * heads * queries)
        for u in range(queries // 4)
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("total,crops", [(6, None), (5, 3), (8, 5)])  # (8, 5): sample 3 padded
def test_holov_on_qwen_matches_brute_force(family, total, crops):
    model = qwen_model(family, attn="eager")
    batch = qwen_batch(RAGGED)
    attention = brute_force_attention(model, batch, -1 % len(model.model.visual.blocks))
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    expected, counts = [], []
    for b in range(len(RAGGED)):
        features = embeds[b, batch["input_ids"][b] == IMAGE].double().tolist()
        count = crops or max(1, int(1024 / 576 * len(features) / total))  # the Qwen port's crops
        chosen, pads = holov_by_loops(features, received_by_loops(attention[b]), total, count, 0.09)
        expected.append(sorted(chosen))
        counts.append(len(chosen) + pads)
    build = lambda: atp.build_pruner("holov", keep_tokens=total, num_patches=crops)  # noqa: E731
    check_kept_on_qwen(model, RAGGED, build, {0: expected}, {0: counts})


def test_holov_on_qwen_pads_somewhere():
    """The zero padding of the reference happens on this input (a full crop leaves the budget short)."""
    model = qwen_model("qwen2_5_vl", attn="eager")
    batch = qwen_batch(RAGGED)
    atp.apply(model, atp.build_pruner("holov", keep_tokens=8, num_patches=5))
    with torch.no_grad():
        model(**batch)
    stats = atp.stats(model)
    atp.remove(model)
    assert any(len(stats.kept[0][b]) < int(stats.visual_tokens[b, 0]) for b in range(3))


def test_holov_cls_score_refuses_qwen_clearly():
    model = qwen_model("qwen2_vl")
    atp.apply(model, atp.build_pruner("holov", keep_tokens=4, score="cls"))
    try:
        with pytest.raises(ValueError, match=r"vision tower has no \[CLS\] token"), torch.no_grad():
            model(**qwen_batch(RAGGED))
    finally:
        atp.remove(model)
