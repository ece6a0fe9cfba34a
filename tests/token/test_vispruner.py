"""VisPruner: kept tokens against a brute-force recomputation, in plain loops, of the documented
rule from HF's own eager CLIP outputs; the LLM then equals the stock LLM on those tokens."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.token.vispruner import remove_duplicates, split_budget
from tests.conftest import make_batch, single
from tests.token.vision_reference import NUM_VISUAL, RAGGED, check_kept_and_logits, llava_without_cls, tower_outputs


def brute_force_vispruner(model, sample, total: int, important_ratio: float) -> list[int]:
    """Sorted indices of the image tokens VisPruner keeps for one unpadded sample."""
    out = tower_outputs(model, sample)
    score = out.attentions[-2][0, :, 0, 1:].mean(0).tolist()  # [CLS] row of layer -2, heads averaged
    features = out.hidden_states[-2][0, 1:]  # what LLaVA's projector receives
    ranked = sorted(range(NUM_VISUAL), key=lambda i: -score[i])  # Python's sort is stable: earlier first
    important = int(total * important_ratio)
    diverse = total - important
    return sorted(ranked[:important] + brute_force_duplicates(features, ranked[important:], diverse))


def brute_force_duplicates(features, residual: list[int], diverse: int) -> list[int]:
    """The documented rounds of at most 8 removals from alternating halves, in plain loops."""
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = (unit @ unit.T).tolist()  # cosine of every pair, looked up by the loops
    while len(residual) > diverse:
        remove = min(8, len(residual) - diverse)
        halves_a, halves_b = residual[0::2], residual[1::2]
        best = [max((similarity[a][b] for b in halves_b), default=-1.0) for a in halves_a]
        order = sorted(range(len(halves_a)), key=lambda k: -best[k])
        residual = [halves_a[k] for k in order[remove:]] + halves_b
    return residual


@pytest.mark.parametrize("total,important_ratio", [(6, 0.5), (12, 0.25), (9, 0.0), (5, 1.0)])
def test_vispruner_matches_brute_force(model_factory, total, important_ratio):
    model = model_factory(attn_implementation="eager")
    batch = make_batch(RAGGED, seed=7)
    expected = [brute_force_vispruner(model, single(batch, b), total, important_ratio) for b in range(3)]
    assert all(len(e) == total for e in expected)
    check_kept_and_logits(
        model,
        batch,
        lambda: atp.build_pruner("vispruner", keep_tokens=total, important_ratio=important_ratio),
        expected,
    )


@pytest.mark.parametrize("diverse", [0, 3, 20, 37, 50])
def test_duplicate_removal_rounds_match_the_loops_on_576_tokens(diverse):
    """Many rounds (LLaVA-1.5's 576 tokens): the survivors and their final order match the loops."""
    generator = torch.Generator().manual_seed(diverse)
    features = torch.randn(576, 16, generator=generator)
    residual = torch.randperm(576, generator=generator)[:301]  # odd: A is one longer than B
    unit = torch.nn.functional.normalize(features, dim=-1)
    expected = brute_force_duplicates(features, residual.tolist(), diverse)
    assert remove_duplicates(unit, residual, diverse).tolist() == expected


def test_vispruner_keep_ratio_and_budget_split(model_factory):
    assert [split_budget(t, 0.5) for t in (192, 128, 64)] == [(96, 96), (64, 64), (32, 32)]
    assert split_budget(7, 0.5) == (3, 4)  # important = floor, as the reference's int()
    model = model_factory(attn_implementation="eager")
    batch = make_batch(RAGGED, seed=3)
    expected = [brute_force_vispruner(model, single(batch, b), 4, 0.5) for b in range(3)]
    atp.apply(model, atp.build_pruner("vispruner", keep_tokens=None, keep_ratio=0.25))
    with torch.no_grad():
        model(**batch)
    assert [k.tolist() for k in atp.stats(model).kept[0]] == expected


def test_vispruner_errors(model_factory):
    with pytest.raises(ValueError, match=r"SiglipVisionModel has no \[CLS\] token"):
        atp.apply(llava_without_cls(), atp.build_pruner("vispruner"))
    with pytest.raises(ValueError, match="important_ratio must be in"):
        atp.build_pruner("vispruner", important_ratio=1.5)
    model = model_factory()
    atp.apply(model, atp.build_pruner("vispruner", keep_tokens=64))
    with pytest.raises(ValueError, match="keep_tokens=64 is more than the 16 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED))
