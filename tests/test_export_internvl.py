"""Export then atp.load_pruned on tiny InternVL: the model read back from disk gives the same logits,
kept tokens and greedy tokens as the model the export was written from (a [CLS]-scored method included)."""

from __future__ import annotations

import pytest

import atp
from tests.export_round_trip import check_export_round_trip, pruning_atp
from tests.internvl_inputs import internvl_batch, internvl_model

ONE_IMAGE_EACH = [(2, [3], 3), (3, [], 6), (1, [2], 2)]  # 3 tiles, none, 2 tiles


PRUNERS = {
    "fastv": lambda: atp.build_pruner("fastv", layer=2, keep_ratio=0.25),
    "fastervlm": lambda: atp.build_pruner("fastervlm", keep_ratio=0.25),
    "atp": pruning_atp,
}


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_internvl_export_round_trip(name, tmp_path):
    check_export_round_trip(internvl_model(), internvl_batch(ONE_IMAGE_EACH), PRUNERS[name](), tmp_path / "export")
