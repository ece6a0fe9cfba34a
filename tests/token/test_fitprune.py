"""FitPrune deletes exactly the tokens a brute-force recomputation from HF's eager attentions deletes."""

from __future__ import annotations

import json

import pytest
import torch

import atp
from tests.conftest import IMAGE, check_kept_everywhere, make_batch

RAGGED = [(2, 3), (6, 1), (1, 7)]


def brute_force_fitprune(model, batch, layer: int, delete: int) -> list[torch.Tensor]:
    """Kept image-token numbers after deleting the `delete` smallest cross * self at `layer`."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        probs = attentions[layer][b].max(0).values  # head-wise max: [S, S]
        visual = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0]
        instruction = torch.arange(int(visual[-1]) + 1, batch["input_ids"].shape[1])  # tokens after the image
        cross = probs[instruction][:, visual].sum(0) / len(instruction)
        self_ = probs[visual][:, visual].sum(0) / len(visual)
        deleted = torch.argsort(cross * self_)[:delete]
        keep = torch.ones(len(visual), dtype=torch.bool)
        keep[deleted] = False
        kept.append(keep.nonzero()[:, 0])
    return kept


@pytest.mark.parametrize("samples", [RAGGED, RAGGED[:1]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("layer,delete", [(0, 5), (2, 11)])
def test_fitprune_matches_brute_force_under_sdpa_and_eager(model_factory, samples, layer, delete):
    batch = make_batch(samples, seed=2)
    model = model_factory(attn_implementation="eager")
    reference = brute_force_fitprune(model, batch, layer, delete)
    pruner = lambda: atp.build_pruner("fitprune", recipe={layer: delete})  # noqa: E731
    for stats in check_kept_everywhere(model, batch, pruner, layer + 1, reference):
        assert stats.visual_tokens[:, layer].tolist() == [16] * len(samples)  # keys in layer l's attention


def test_recipe_loads_from_a_fitted_json(tmp_path, model_factory):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"recipe": {"1": 4, "2": 0}, "alpha": 0.3}))
    pruner = atp.build_pruner("fitprune", recipe=str(path))
    assert pruner.deletions == {1: 4} and pruner.layers == (2,)


def test_recipe_deleting_more_tokens_than_remain_is_refused(model_factory):
    model = model_factory()
    atp.apply(model, atp.build_pruner("fitprune", recipe={0: 10, 1: 8}))
    with pytest.raises(ValueError, match="deletes 8 visual tokens at layer 1, but only 6 remain"), torch.no_grad():
        model(**make_batch(RAGGED))


def test_recipe_for_layers_the_model_lacks_is_refused(model_factory):
    model = model_factory()  # 4 decoder layers: deletions can act after layers 0..2
    with pytest.raises(ValueError, match=r"deletes at layer\(s\) \[3\].*0\.\.2"):
        atp.apply(model, atp.build_pruner("fitprune", recipe={1: 2, 3: 2}))


@pytest.mark.parametrize(
    "recipe,message",
    [
        ({1: -2}, "whole count >= 0"),
        ({"x": 2}, "integer layer"),
        ({1: 0}, "deletes no tokens"),
        ("missing.json", "does not exist"),
    ],
)
def test_bad_recipes_get_clear_errors(recipe, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        atp.build_pruner("fitprune", recipe=recipe)
