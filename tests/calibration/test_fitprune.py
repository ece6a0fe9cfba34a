"""The FitPrune fit: its walk rule against a per-sample reference loop, and the budget boundary."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.calibration.fitprune import FitPruneFitter, lowest_set
from atp.metrics.accounting import cost_report
from tests.conftest import make_batch

RAGGED = [(2, 3), (6, 1), (1, 7)]


def reference_lowest_count(score: torch.Tensor, threshold: float) -> int:
    """The reference code's loop: delete in ascending order while the rest keeps >= threshold."""
    ordered = torch.sort(score).values
    total = float(score.sum())
    count = 0
    for i in range(1, len(ordered)):  # keep at least one token
        if total - float(ordered[:i].sum()) < threshold:
            break
        count = i
    return count


def test_lowest_set_matches_the_reference_loop():
    generator = torch.Generator().manual_seed(0)
    score = torch.rand(4, 12, generator=generator)
    visual = torch.zeros(4, 12, dtype=torch.bool)
    visual[:, 2:11] = True
    visual[3, 2:4] = False  # ragged
    score = score.masked_fill(~visual, 0.0)
    for fraction in (0.0, 0.3, 0.7, 0.95, 1.0):
        threshold = fraction * score.sum(1)
        chosen = lowest_set(score, visual, threshold)
        for b in range(4):
            values = score[b][visual[b]]
            count = reference_lowest_count(values, float(threshold[b]))
            assert int(chosen[b].sum()) == count, (fraction, b)
            if count:
                assert float(score[b][chosen[b]].max()) <= float(torch.sort(values).values[count - 1])


def measured_flops_ratio(model, batches, recipe) -> float:
    """The recipe run through the runtime in drop mode, measured by the accounting module."""
    atp.apply(model, atp.build_pruner("fitprune", recipe=recipe), mode="drop")
    pruned = unpruned = 0.0
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            report = cost_report(model.config.text_config, atp.stats(model))
            pruned += float(report.flops.sum())
            unpruned += float(report.flops_unpruned.sum())
    atp.remove(model)
    return pruned / unpruned


@pytest.mark.parametrize("budget", [0.55, 0.7])
def test_fit_meets_the_budget_and_sits_on_the_boundary(model_factory, budget):
    model = model_factory(num_layers=6)
    batches = [make_batch(RAGGED, seed=seed) for seed in range(3)]
    best, trials = FitPruneFitter(model, batches, budget).fit()
    assert best.reached and best.recipe
    assert measured_flops_ratio(model, batches, best.recipe) == pytest.approx(best.flops_ratio, rel=1e-9)
    assert best.flops_ratio <= budget
    smaller = FitPruneFitter(model, batches, budget).trial(round(best.alpha - 0.01, 2))
    assert not smaller.reached
    assert measured_flops_ratio(model, batches, smaller.recipe) > budget  # its whole walk falls short


@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5, -0.2])
def test_budget_outside_the_open_unit_interval_is_refused(model_factory, budget):
    with pytest.raises(ValueError, match=r"flops_budget must be in \(0, 1\)"):
        FitPruneFitter(model_factory(), [make_batch(RAGGED)], budget)


def test_empty_calibration_set_is_refused(model_factory):
    with pytest.raises(ValueError, match="calibration set is empty"):
        FitPruneFitter(model_factory(), [], 0.5)


def test_unreachable_budget_is_refused(model_factory):
    with pytest.raises(ValueError, match="cannot be reached"):
        FitPruneFitter(model_factory(), [make_batch(RAGGED)], 0.01).fit()
