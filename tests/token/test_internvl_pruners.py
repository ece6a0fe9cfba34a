"""ATP trains and prunes on tiny InternVL, FitPrune fits a recipe that meets its FLOPs budget, SAP follows each
tile's grid. (Every pruner runs or refuses clearly: tests/token/test_every_family.py.)"""

from __future__ import annotations

import torch
from torch.testing import assert_close

import atp
from atp.calibration.fitprune import FitPruneFitter
from atp.models import get_adapter
from atp.token.atp import SAP_FLOOR, SAP_LEVELS, ATPPruner, atp_losses, sap_scores_at
from tests.internvl_inputs import IMAGE, internvl_batch, internvl_model, token_places

ONE_IMAGE_EACH = [(2, [3], 3), (3, [], 6), (1, [2], 2)]  # 48, 0 and 32 image tokens


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
