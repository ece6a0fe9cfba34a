"""Every pruner on tiny InternVL runs (drop and mask agree) or refuses clearly; ATP trains and prunes;
FitPrune fits a recipe that meets its FLOPs budget."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.calibration.fitprune import FitPruneFitter
from atp.models import get_adapter
from atp.token.atp import SAP_FLOOR, SAP_LEVELS, ATPPruner, atp_losses, sap_scores_at
from tests.internvl_inputs import IMAGE, PER_TILE, internvl_batch, internvl_model, token_places

ONE_IMAGE_EACH = [(2, [3], 3), (3, [], 6), (1, [2], 2)]  # 48, 0 and 32 image tokens

PRUNERS = {
    "none": {},
    "random": dict(layers=[1], keep_ratio=0.5),
    "fastv": dict(layer=2, keep_ratio=0.25),
    "pdrop": dict(layers=[1, 2], keep_ratios=[0.5, 0.25]),
    "sparsevlm": dict(layers=[1, 2], keep_tokens=[16, 8]),
    "divprune": dict(keep_ratio=0.25),
    "spatial": dict(keep_ratio=0.25),
    "fitprune": dict(recipe={0: 4, 1: 4}),
    "atp": dict(num_layers=4, layers=[1, 3]),
    "fastervlm": dict(keep_ratio=0.25),
    "visionzip": dict(keep_tokens=12),
    "dart": dict(layer=2, keep_tokens=12),
    "transprune": dict(layers=[1, 2, 3], transition_layers=[0, 1, 2], keep_ratios=[0.875, 0.625, 0.25]),
    "aim": dict(merge_removals=[8, 4], start_layer=1, step=0.5),
    "vispruner": dict(keep_tokens=12),
    "vtc_cls": dict(keep_tokens=12, start_layer=1),
    "hiprune": dict(keep_tokens=12, object_layer=1),
    "holov": dict(keep_tokens=12),
    "cdpruner": dict(keep_tokens=12),
    "flowcut": dict(keep_tokens=12),
    "zero_tprune": dict(keep_tokens=12),
    "vflowopt": dict(layers=[0, 2], keep_ratios=[0.5, 0.5], t=1.0, alpha=0.3, merge_grid=2.0, setting=None),
    "catp": dict(keep_ratio=0.25, layer=1),
}
SEVERAL_IMAGES = [(2, [1, 2], 3), (3, [], 6), (1, [1, 1], 2)]  # CATP: in-context prompts, same tiles as above
GRID = "one image's fixed grid"
IN_TOWER = "pruning inside the vision tower is not supported"
REFUSED = {
    "aim": GRID,
    "vispruner": GRID,
    "holov": GRID,
    "hiprune": GRID,
    "flowcut": IN_TOWER,
    "zero_tprune": IN_TOWER,
}  # what the error names


def test_the_table_covers_every_registered_pruner():
    assert sorted(PRUNERS) == atp.available_pruners()


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_runs_and_drop_equals_mask(name):
    model = internvl_model()
    specs = [spec for spec in ONE_IMAGE_EACH if spec[1] or name != "fitprune"]  # a recipe's counts need images
    specs = SEVERAL_IMAGES if name == "catp" else specs
    batch = internvl_batch(specs)
    pruner = atp.build_pruner(name, **PRUNERS[name]).eval()  # ATP: hard decisions in both modes
    if name in REFUSED:  # at atp.apply or at the forward
        with pytest.raises(ValueError, match=REFUSED[name]), torch.no_grad():
            atp.apply(model, pruner, mode="drop")
            model(**batch)
        return
    logits, stats = {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, pruner, mode=mode)
        with torch.no_grad():
            logits[mode] = model(**batch).logits[:, -1]
        stats[mode] = atp.stats(model)
    assert torch.isfinite(logits["drop"]).all()
    images = [3 * PER_TILE, 0, 2 * PER_TILE] if len(specs) == 3 else [3 * PER_TILE, 2 * PER_TILE]
    assert stats["drop"].num_visual.tolist() == images
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    with_image = stats["drop"].num_visual > 0
    if name not in ("none", "atp"):  # ATP's untrained modules keep (almost) everything
        assert (stats["drop"].visual_tokens[with_image, -1] < stats["drop"].num_visual[with_image]).all()
    if name != "visionzip":  # merged tokens differ from the mask path's kept originals by design
        assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-5)


def test_atp_trains_a_few_steps_then_prunes_in_drop_mode():
    model = internvl_model()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    batch = internvl_batch(ONE_IMAGE_EACH)
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    labels[:, :-2] = -100
    torch.manual_seed(0)
    pruner = ATPPruner(num_layers=4, layers=[1, 3], straight_through=True).train()
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():  # thresholds inside the score ranges
            module.redundancy_head.bias.fill_(0.0)
            module.spatial_head.bias.fill_(0.3)
    before = {name: p.detach().clone() for name, p in pruner.named_parameters()}
    optimiser = torch.optim.Adam(pruner.parameters(), lr=1e-2)
    atp.apply(model, pruner, mode="mask")
    for _ in range(3):
        out = model(**batch, labels=labels)
        num_visual = atp.stats(model).num_visual
        losses = atp_losses(pruner, num_visual, target_tokens=0.25 * num_visual.float())
        loss = out.loss + losses["atp"] + losses["target"]
        assert torch.isfinite(loss)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    moved = [name for name, p in pruner.named_parameters() if not torch.equal(p, before[name])]
    assert any("redundancy_head" in name for name in moved) and any("spatial_head" in name for name in moved)
    pruner.eval()
    logits, kept = {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, pruner, mode=mode)
        with torch.no_grad():
            logits[mode] = model(**batch).logits[:, -1]
        kept[mode] = atp.stats(model).kept
        visual = atp.stats(model).visual_tokens
    assert (visual[[0, 2], -1] < torch.tensor([48, 32])).all()  # it prunes
    for layer in kept["drop"]:
        for a, b in zip(kept["drop"][layer], kept["mask"][layer]):
            assert torch.equal(a, b)
    assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-5)


def test_fitprune_fits_a_recipe_within_its_budget():
    model = internvl_model()
    batches = [internvl_batch([(2, [3], 3), (1, [2], 2)])]
    best, trials = FitPruneFitter(model, batches, flops_budget=0.7).fit()
    assert best.reached and best.flops_ratio <= 0.7 and best.recipe
    atp.apply(model, atp.build_pruner("fitprune", recipe=best.recipe))
    with torch.no_grad():
        model(**batches[0])
    deleted = sum(best.recipe.values())
    assert atp.stats(model).visual_tokens[:, -1].tolist() == [max(0, 48 - deleted), max(0, 32 - deleted)]
    assert (batches[0]["input_ids"] == IMAGE).sum() == 80


def test_sap_scores_follow_each_tiles_own_grid():
    """ATP's spatial score: the nested-grid level of (row, col) in the token's own tile (loops)."""
    model = internvl_model()
    batch = internvl_batch(ONE_IMAGE_EACH)
    visual = batch["input_ids"] == IMAGE
    geometry = get_adapter(model).visual_geometry(visual, None)
    score = sap_scores_at(geometry.row, geometry.col, visual)
    for b, places in enumerate(token_places(batch, ONE_IMAGE_EACH)):
        positions = visual[b].nonzero()[:, 0]
        for position, (_, _, row, col) in zip(positions.tolist(), places):
            expected = next(
                (value for stride, value in SAP_LEVELS if row % stride == 0 and col % stride == 0), SAP_FLOOR
            )
            assert float(score[b, position]) == expected
    assert sorted(set(score[visual].tolist())) != [SAP_FLOOR]  # several levels on a 4 x 4 tile
