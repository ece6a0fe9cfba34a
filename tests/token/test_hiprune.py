"""HiPrune: kept tokens against a brute-force recomputation, in plain loops, of the documented
rule from HF's own eager CLIP `output_attentions`; the LLM then equals the stock LLM on them."""

from __future__ import annotations

import pytest
import torch

import atp
from tests.conftest import GRID, make_batch, single
from tests.token.vision_reference import NUM_VISUAL, RAGGED, check_kept_and_logits, llava_without_cls, tower_outputs


def global_attention(attention: torch.Tensor) -> list[float]:
    """Per image token: its attention averaged over heads and all queries ([CLS] included).
    attention: [H, T + 1, T + 1] of one image."""
    heads, queries, _ = attention.shape
    return [
        sum(float(attention[h, i, 1 + j]) for h in range(heads) for i in range(queries)) / (heads * queries)
        for j in range(NUM_VISUAL)
    ]


def brute_force_hiprune(model, sample, total: int, alpha: float, object_layer: int) -> list[int]:
    """Sorted indices of the image tokens HiPrune keeps for one unpadded sample."""
    attentions = tower_outputs(model, sample).attentions
    objects = global_attention(attentions[object_layer - 1][0])
    registers = global_attention(attentions[-2][0])
    anchors = sorted(range(NUM_VISUAL), key=lambda j: -objects[j])[: round(total * alpha / 5)]
    chosen = set()
    for i in anchors:
        for near in (i, i - 1, i + 1, i - GRID, i + GRID):
            chosen.add(min(max(near, 0), NUM_VISUAL - 1))
    rest = sorted((j for j in range(NUM_VISUAL) if j not in chosen), key=lambda j: -registers[j])
    return sorted(chosen | set(rest[: total - len(chosen)]))


@pytest.mark.parametrize("total,alpha,object_layer", [(8, 0.7, 1), (12, 1.0, 2), (6, 0.1, 3), (10, 1.0, 1)])
def test_hiprune_matches_brute_force(model_factory, total, alpha, object_layer):
    model = model_factory(attn_implementation="eager", vision_layers=3)
    batch = make_batch(RAGGED, seed=11)
    expected = [brute_force_hiprune(model, single(batch, b), total, alpha, object_layer) for b in range(3)]
    assert all(len(e) == total for e in expected)
    build = lambda: atp.build_pruner("hiprune", keep_tokens=total, alpha=alpha, object_layer=object_layer)  # noqa: E731
    check_kept_and_logits(model, batch, build, expected)


def test_hiprune_anchor_counts_follow_the_reference_rounding():
    """round(T * alpha / 5) with Python's round: 1, 3, 4 anchors at 64, 128, 192 with alpha 0.1."""
    assert [round(t * 0.1 / 5) for t in (64, 128, 192)] == [1, 3, 4]


def test_hiprune_errors(model_factory):
    with pytest.raises(ValueError, match="alpha must be in"):
        atp.build_pruner("hiprune", alpha=2.0)
    with pytest.raises(ValueError, match="object_layer counts vision layers from 1"):
        atp.build_pruner("hiprune", object_layer=0)
    with pytest.raises(ValueError, match=r"object_layer=9 is past the vision tower's 2 layers"):
        atp.apply(model_factory(), atp.build_pruner("hiprune"))
    siglip = llava_without_cls()  # the LLaVA adapter maps visual tokens to tower tokens after a [CLS] only
    atp.apply(siglip, atp.build_pruner("hiprune", keep_tokens=4, object_layer=1))
    with pytest.raises(ValueError, match=r"SiglipVisionModel has no \[CLS\] token"), torch.no_grad():
        siglip(**make_batch(RAGGED))
    atp.remove(siglip)
    model = model_factory()
    atp.apply(model, atp.build_pruner("hiprune", keep_tokens=64, object_layer=1))
    with pytest.raises(ValueError, match="keep_tokens=64 is more than the 16 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED))
    atp.remove(model)
    # one anchor (round(3 / 5)); with its buffers 4 or 5 tokens unless it sits in a corner
    atp.apply(model, atp.build_pruner("hiprune", keep_tokens=3, alpha=1.0, object_layer=1))
    with pytest.raises(ValueError, match="anchor and buffer tokens exceed the budget of 3"):
        with torch.no_grad():
            model(**make_batch(RAGGED))
