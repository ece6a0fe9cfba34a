"""Budgeted pruners round a keep ratio's token count half up (round(2.5) = 3, round(6.5) = 7),
on exact ties, against the documented rule recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from atp.models.adapter import VisualGeometry
from atp.token.spatial import grid_stride
from atp.token.visionzip import split_budget
from tests.conftest import NUM_VISUAL, make_batch

RAGGED = [(2, 3), (6, 1), (1, 7)]
TIES = (5 / 32, 13 / 32)  # 16 * ratio = 2.5 and 6.5 exactly: half up 3 and 7, banker's rounding 2 and 6


def half_up(count: int, ratio: float) -> int:
    """The documented count: round(count * ratio) with ties up, at least 1."""
    exact = count * ratio
    assert exact - math.floor(exact) == 0.5  # an exact tie, or the test proves nothing
    return max(1, math.floor(exact) + 1)


def budgeted(name: str, ratio: float) -> tuple[atp.TokenPruner, int]:
    """(pruner at `ratio`, the first decoder layer that sees its cut)."""
    if name == "fastv":
        return atp.build_pruner("fastv", layer=1, keep_ratio=ratio), 1
    if name == "pdrop":
        return atp.build_pruner("pdrop", layers=[1], keep_ratios=[ratio]), 1
    if name == "random":
        return atp.build_pruner("random", layers=1, keep_ratio=ratio), 1
    if name == "visionzip":
        return atp.build_pruner("visionzip", keep_tokens=None, keep_ratio=ratio), 0
    return atp.build_pruner(name, keep_ratio=ratio), 0  # fastervlm, divprune: before the LLM


@pytest.mark.parametrize("ratio", TIES)
@pytest.mark.parametrize("name", ["fastv", "pdrop", "random", "fastervlm", "divprune", "visionzip"])
def test_keep_ratio_ties_round_half_up(model_factory, name, ratio):
    model = model_factory()
    pruner, layer = budgeted(name, ratio)
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        model(**make_batch(RAGGED, seed=1))
    expected = half_up(NUM_VISUAL, ratio)
    assert atp.stats(model).visual_tokens[:, layer].tolist() == [expected] * len(RAGGED)


def test_visionzip_splits_a_tied_budget_half_up(model_factory):
    """16 kept tokens split as round(16 * 54 / 64) = round(13.5) = 14 dominant + 2 contextual."""
    assert split_budget(16) == (14, 2) and split_budget(64) == (54, 10) and split_budget(7) == (6, 1)
    model = model_factory()
    atp.apply(model, atp.build_pruner("visionzip", keep_tokens=16), mode="drop")
    with torch.no_grad():
        model(**make_batch(RAGGED, seed=1))
    stats = atp.stats(model)
    assert stats.visual_tokens[:, 0].tolist() == [16] * len(RAGGED)
    assert [len(kept) for kept in stats.kept[0]] == [14] * len(RAGGED)  # merged tokens are not original tokens


def test_spatial_budget_tie_rounds_half_up():
    """An 8 x 8 grid at 17/128: round(8.5) = 9 tokens allow stride 3 (3 x 3 = 9 tokens); banker's
    rounding (8) would force stride 4 (2 x 2 = 4)."""
    ratio, rows, cols = 17 / 128, 8, 8
    budget = half_up(rows * cols, ratio)
    stride = next(s for s in range(1, 9) if math.ceil(rows / s) * math.ceil(cols / s) <= budget)
    assert (budget, stride) == (9, 3) and grid_stride(rows, cols, budget) == 3
    expected = [r * cols + c for r in range(rows) for c in range(cols) if r % stride == 0 and c % stride == 0]
    slots = rows * cols
    ctx = atp.PruneContext(
        layer=0,
        hidden=torch.zeros(1, slots, 4),
        visual=torch.ones(1, slots, dtype=torch.bool),
        visual_index=torch.arange(slots)[None],
        weight=torch.ones(1, slots),
        instruction=torch.zeros(1, slots, dtype=torch.bool),
        last_prompt=torch.tensor([slots - 1]),
        num_visual=torch.tensor([slots]),
        grid=(rows, cols),
        mode="drop",
        attention=None,
        geometry=VisualGeometry(  # one 8 x 8 image in raster order
            image=torch.zeros(1, slots, dtype=torch.long),
            crop=torch.zeros(1, slots, dtype=torch.long),
            row=torch.arange(slots)[None] // cols,
            col=torch.arange(slots)[None] % cols,
            rows=torch.full((1, slots), rows),
            cols=torch.full((1, slots), cols),
        ),
    )
    keep = atp.build_pruner("spatial", layer=0, keep_ratio=ratio).prune(ctx)
    assert keep[0].nonzero()[:, 0].tolist() == expected
