"""Grid-based methods on images with their own grids (Qwen2-VL dynamic resolution)."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from atp.models import get_adapter
from atp.token.atp import SAP_FLOOR, SAP_LEVELS, sap_scores_at
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

SPECS = [(2, [(4, 6), (8, 8)], 3), (1, [(6, 4)], 2)]  # grids 2x3, 4x4, 3x2 of visual tokens


def image_grids(batch) -> list[list[tuple[int, int, int]]]:
    """Per sample, (image-token number, row, col, rows, cols) of its image tokens, from image_grid_thw (loops)."""
    grids = [(h // 2, w // 2) for _, h, w in batch["image_grid_thw"].tolist()]
    out, image, within = [], 0, 0
    for b in range(batch["input_ids"].shape[0]):
        tokens = []
        for number in range(int((batch["input_ids"][b] == IMAGE).sum())):
            rows, cols = grids[image]
            tokens.append((number, within // cols, within % cols, rows, cols))
            within += 1
            if within == rows * cols:
                image, within = image + 1, 0
        out.append(tokens)
    return out


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_spatial_keeps_a_uniform_grid_on_every_image(mode):
    model = qwen_model("qwen2_vl")
    batch = qwen_batch(SPECS)
    atp.apply(model, atp.build_pruner("spatial", layer=0, keep_ratio=0.25), mode=mode)
    with torch.no_grad():
        model(**batch)
    kept = atp.stats(model).kept[0]
    for b, tokens in enumerate(image_grids(batch)):
        expected = []
        for number, row, col, rows, cols in tokens:
            budget = max(1, math.floor(rows * cols * 0.25 + 0.5))
            stride = next(s for s in range(1, 100) if math.ceil(rows / s) * math.ceil(cols / s) <= budget)
            if row % stride == 0 and col % stride == 0:
                expected.append(number)
        assert kept[b].tolist() == expected
    assert [len(k) for k in kept] == [2 + 4, 2]  # 2x3 -> stride 2 (2 kept); 4x4 -> stride 2 (4); 3x2 -> 2


def test_sap_scores_on_each_image_grid():
    model = qwen_model("qwen2_vl")
    adapter = get_adapter(model)
    batch = qwen_batch(SPECS)
    rope, _ = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    visual = batch["input_ids"] == IMAGE
    geometry = adapter.visual_geometry(visual, adapter.split_position_ids(rope)[1])
    score = sap_scores_at(geometry.row, geometry.col, visual)
    for b, tokens in enumerate(image_grids(batch)):
        positions = visual[b].nonzero()[:, 0]
        for number, row, col, _, _ in tokens:
            expected = SAP_FLOOR
            for stride, value in SAP_LEVELS:  # coarsest level first: the highest score that applies
                if row % stride == 0 and col % stride == 0:
                    expected = value
                    break
            assert float(score[b, positions[number]]) == expected
    assert bool((score[~visual] == 0).all())


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_atp_runs_on_per_image_grids(mode):
    model = qwen_model("qwen2_5_vl")
    batch = qwen_batch(SPECS)
    atp.apply(model, atp.build_pruner("atp", num_layers=4), mode=mode)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert atp.stats(model).visual_tokens[:, 0].tolist() == [22, 6]
