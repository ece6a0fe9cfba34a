"""The VFlowOpt search: its budget constraint against the official closed form and a per-layer loop, its
objective against stock HF forwards, the optimiser's bookkeeping, and the recipe's round trip through disk."""

from __future__ import annotations

import json

import pytest
import torch

import atp
from atp.calibration.vflowopt import (
    OFFICIAL_SPACE,
    VFlowOptSearch,
    average_share,
    expected_improvement,
    last_keep_ratio,
)
from tests.token.test_vflowopt import multi_image_batch

LAYERS = [0, 1, 2]
SPACE = {**OFFICIAL_SPACE, "t": [0.0, 2.0], "merge_grid": [1.5, 3.0]}  # t, cells that matter on 4x4 images


def share_by_layers(ratios: list[float], layers: list[int], num_layers: int) -> float:
    """Average over decoder layers of the share of visual tokens each sees, layer by layer."""
    shares = []
    for layer in range(num_layers):
        share = 1.0
        for stage, ratio in zip(layers, ratios):
            if stage <= layer:
                share *= ratio
        shares.append(share)
    return sum(shares) / num_layers


@pytest.mark.parametrize("free", [[0.3, 0.8], [0.26, 0.6], [0.37, 0.99]])
def test_last_ratio_meets_the_target_as_the_official_closed_form(free):
    target = 0.25
    last = last_keep_ratio(free, [0, 9, 18], 28, target)
    official = min(1.0, ((28 * target - free[0] * 9 - free[0] * free[1] * 9) / 10) / (free[0] * free[1]))
    assert last == pytest.approx(official)
    if last < 1.0:
        assert share_by_layers(free + [last], [0, 9, 18], 28) == pytest.approx(target)
    assert average_share(free + [last], [0, 9, 18], 28) == pytest.approx(share_by_layers(free + [last], [0, 9, 18], 28))


def stock_last_states(model, batch) -> torch.Tensor:
    """[B, d] HF's own last hidden state at each prompt's last real token, no runtime attached."""
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    last = [int(row.nonzero()[-1]) for row in batch["attention_mask"]]
    return torch.stack([hidden[b, i] for b, i in enumerate(last)])


def right_padded(batch: dict) -> dict:
    """The same prompts with their padding moved to the right."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for b in range(len(ids)):
        pad = int((mask[b] == 0).sum())
        ids[b], mask[b] = ids[b].roll(-pad), mask[b].roll(-pad)
    return {**batch, "input_ids": ids, "attention_mask": mask}


def test_objective_is_the_summed_cosine_to_the_stock_model(model_factory):
    model = model_factory(attn_implementation="eager")
    batches = [
        multi_image_batch([(2, 1, 3), (4, 2, 1)], seed=1),
        right_padded(multi_image_batch([(1, 1, 1), (5, 2, 2)])),
    ]
    search = VFlowOptSearch(model, batches, LAYERS, target=0.4, space=SPACE)
    setting = dict(keep_ratios=[0.5, 0.75, 0.5], t=1.0, merge_grid=2.0, alpha=0.3)
    expected = 0.0
    for batch, reference in zip(batches, search.reference):
        stock = stock_last_states(model, batch)
        torch.testing.assert_close(reference, stock.float())
        atp.apply(model, atp.build_pruner("vflowopt", layers=LAYERS, setting=None, **setting))
        pruned = stock_last_states(model, batch)
        atp.remove(model)
        expected += sum(
            float(torch.nn.functional.cosine_similarity(pruned[b], stock[b], dim=0)) for b in range(len(stock))
        )
    assert search.similarity(setting) == pytest.approx(expected, rel=1e-6)
    assert expected < len(batches[0]["input_ids"]) + len(batches[1]["input_ids"]) - 1e-4  # pruning changes states


def test_expected_improvement_vanishes_at_the_observed_best():
    x = torch.tensor([[0.1, 0.2], [0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    y = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    candidates = torch.cat([x, torch.rand(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)])
    gain = expected_improvement(x, y, candidates)
    assert float(gain[1]) < 1e-3 < 0.05 < float(gain.max()) and bool((gain >= 0).all())  # ~0 only at the best


def test_search_keeps_the_best_trial_and_its_recipe_round_trips(model_factory, tmp_path):
    model = model_factory(attn_implementation="eager")
    batches = [multi_image_batch([(2, 1, 3), (4, 2, 1)], seed=1)]
    search = VFlowOptSearch(model, batches, LAYERS, target=0.4, space=SPACE, seed=7)
    best, trials = search.fit(calls=5, initial_points=3)
    assert len(trials) == 5 and best.similarity == max(t.similarity for t in trials)
    generator = torch.Generator().manual_seed(7)
    first = torch.rand(5, generator=generator, dtype=torch.float64)
    low, high = search.bounds[:, 0], search.bounds[:, 1]
    assert trials[0].t == pytest.approx(float(low[2] + first[2] * (high[2] - low[2])))
    for trial in trials:
        assert trial.keep_ratios[-1] == pytest.approx(last_keep_ratio(trial.keep_ratios[:-1], LAYERS, 4, 0.4))
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"recipe": best.recipe(LAYERS, -2)}))
    loaded = atp.build_pruner("vflowopt", recipe=str(path))
    assert loaded.budgets == dict(zip(LAYERS, best.keep_ratios)) and loaded.t == best.t
    setting = {k: v for k, v in json.loads(path.read_text())["recipe"].items() if k not in ("layers", "vision_layer")}
    assert search.similarity(setting) == pytest.approx(best.similarity)


def test_bad_search_input_is_refused(model_factory):
    model = model_factory()
    batches = [multi_image_batch([(2, 1, 3)])]
    with pytest.raises(ValueError, match=r"target .* must be in \(0, 1\)"):
        VFlowOptSearch(model, batches, LAYERS, target=1.5)
    with pytest.raises(ValueError, match="need bounds for 2 free keep ratios"):
        VFlowOptSearch(model, batches, LAYERS, target=0.3, space={**OFFICIAL_SPACE, "keep_ratios": [[0.2, 0.4]]})
    with pytest.raises(ValueError, match="calibration set is empty"):
        VFlowOptSearch(model, [], LAYERS, target=0.3)
    with pytest.raises(ValueError, match="at or past the model's depth"):
        VFlowOptSearch(model, batches, [0, 9, 18], target=0.3)
