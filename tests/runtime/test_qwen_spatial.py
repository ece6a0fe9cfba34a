"""`spatial` on tiny Qwen2-VL / Qwen3-VL: per-image grids (the rule itself is checked against loops in
tests/token/test_per_image_grids.py); here a ragged batch of 3 (two images, none, one) keeps what its
batch-1 runs keep and gives their logits, and drop equals mask at every kept position."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

RAGGED = [(2, [(8, 8), (4, 6)], 3), (3, [], 6), (1, [(16, 8)], 2)]  # grids 4x4 + 2x3, none, 8x4


def run(model, batch, mode):
    atp.apply(model, atp.build_pruner("spatial", layer=1, keep_ratio=0.25), mode=mode)
    with torch.no_grad():
        logits = model(**batch).logits
    stats = atp.stats(model)
    atp.remove(model)
    return logits, stats


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_spatial_ragged_batch_equals_batch_one_and_mask(family):
    model = qwen_model(family)
    batch = qwen_batch(RAGGED)
    logits, stats = run(model, batch, "drop")
    masked, mask_stats = run(model, batch, "mask")
    assert stats.visual_tokens[:, -1].tolist() == [4 + 2, 0, 8]  # 4x4 -> stride 2; 2x3 -> 2; 8x4 -> stride 2
    for b, spec in enumerate(RAGGED):
        single = qwen_batch([spec], [b])
        alone, alone_stats = run(model, single, "drop")
        assert stats.kept[1][b].tolist() == alone_stats.kept[1][0].tolist() == mask_stats.kept[1][b].tolist()
        length = single["input_ids"].shape[1]
        offset = logits.shape[1] - length
        image = (single["input_ids"][0] == IMAGE).nonzero()[:, 0].tolist()
        rows = sorted([p for p in range(length) if p not in image] + [image[n] for n in stats.kept[1][b].tolist()])
        rows = torch.tensor(rows)
        assert_close(logits[b, offset + rows], alone[0, rows], rtol=1e-4, atol=1e-5)
        assert_close(logits[b, offset + rows], masked[b, offset + rows], rtol=1e-4, atol=1e-5)
