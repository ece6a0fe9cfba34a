"""Export then atp.load_pruned on tiny Qwen2.5-VL / Qwen3-VL: the model read back from disk gives the
same logits, kept tokens and greedy tokens as the model the export was written from."""

from __future__ import annotations

import pytest

import atp
from tests.export_round_trip import check_export_round_trip, pruning_atp
from tests.qwen_inputs import qwen_batch, qwen_model

RAGGED = [(2, [(4, 6), (4, 4)], 3), (3, [], 6), (1, [(6, 4)], 2)]  # two images, none, one


PRUNERS = {
    "fastv": lambda: atp.build_pruner("fastv", layer=2, keep_ratio=0.25),
    "pdrop": lambda: atp.build_pruner("pdrop", layers=[1, 2], keep_ratios=[0.5, 0.25]),
    "atp": pruning_atp,
}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_qwen_export_round_trip(family, name, tmp_path):
    model = qwen_model(family)
    policy = check_export_round_trip(model, qwen_batch(RAGGED), PRUNERS[name](), tmp_path / "export")
    assert policy == "original"  # M-RoPE ids are kept
