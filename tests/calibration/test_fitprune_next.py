"""The FitPrune fit on tiny LLaVA-NeXT / OneVision: the fitted recipe meets the budget on the calibration
set, as the pruned runs measure it (newline tokens are not visual tokens and never deleted).

The calibration images share one anyres layout (80 content tokens): a recipe holds absolute counts,
fitted on the mean, and can ask an image with fewer tokens for more than it has (the pruner then
refuses with a clear error)."""

from __future__ import annotations

import pytest

import atp
from atp.calibration.fitprune import FitPruneFitter
from tests.calibration.test_fitprune import measured_flops_ratio
from tests.next_inputs import SQUARE, next_batch, next_model


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_fit_meets_the_budget_on_anyres_images(family):
    model = next_model(family, num_layers=6)
    batches = [next_batch(model, [(2, [SQUARE], 3), (4, [SQUARE], 2)], seeds=[s, s + 1]) for s in (0, 5)]
    best, _ = FitPruneFitter(model, batches, 0.6).fit()
    assert best.reached and best.recipe
    assert best.flops_ratio <= 0.6
    assert measured_flops_ratio(model, batches, best.recipe) == pytest.approx(best.flops_ratio, rel=1e-9)
    atp.apply(model, atp.build_pruner("fitprune", recipe=best.recipe))
    model(**batches[0])
    stats = atp.stats(model)
    assert stats.num_visual.tolist() == [80, 80]  # content tokens only
    assert (stats.visual_tokens[:, -1] < stats.num_visual).all()
