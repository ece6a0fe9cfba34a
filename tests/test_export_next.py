"""Export then atp.load_pruned on tiny LLaVA-NeXT / LLaVA-OneVision: the model read back from disk gives the
same logits, kept tokens and greedy tokens as the model the export was written from."""

from __future__ import annotations

import pytest

import atp
from tests.export_round_trip import check_export_round_trip, pruning_atp
from tests.next_inputs import FAMILIES, SQUARE, TALL, WIDE, next_batch, next_model

RAGGED = [(2, [WIDE], 3), (3, [], 6), (1, [SQUARE], 2), (2, [TALL], 1)]  # anyres images of three layouts, none


PRUNERS = {
    "fastv": lambda: atp.build_pruner("fastv", layer=2, keep_ratio=0.25),
    "pdrop": lambda: atp.build_pruner("pdrop", layers=[1, 2], keep_ratios=[0.5, 0.25]),
    "atp": pruning_atp,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_next_export_round_trip(family, name, tmp_path):
    model = next_model(family)
    check_export_round_trip(model, next_batch(model, RAGGED), PRUNERS[name](), tmp_path / "export")
