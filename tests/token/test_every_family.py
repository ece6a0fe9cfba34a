"""Every registered pruner on every model family: it runs (drop and mask agree, visual tokens reduced,
the visual-token count is the family's content tokens) or it refuses with a ValueError naming why.

The expected visual-token counts come from the inputs, not from atp: the placeholder tokens of each
sample, less LLaVA-NeXT / OneVision's newline tokens (read from the stock model's embeddings)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.models.tiny import tiny_llava
from tests.conftest import IMAGE as LLAVA_IMAGE
from tests.conftest import make_batch
from tests.internvl_inputs import IMAGE as INTERNVL_IMAGE
from tests.internvl_inputs import internvl_batch, internvl_model
from tests.next_inputs import IMAGE as NEXT_IMAGE
from tests.next_inputs import SQUARE, TALL, WIDE, next_batch, next_model, stock_reference
from tests.qwen_inputs import IMAGE as QWEN_IMAGE
from tests.qwen_inputs import qwen_batch, qwen_model
from tests.token.test_vflowopt import multi_image_batch

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")

PRUNERS = {
    "none": {},
    "random": dict(layers=[1], keep_ratio=0.5),
    "fastv": dict(layer=2, keep_ratio=0.25),
    "pdrop": dict(layers=[1, 2], keep_ratios=[0.5, 0.25]),
    "sparsevlm": dict(layers=[1, 2], keep_tokens=[8, 4]),
    "divprune": dict(keep_ratio=0.25),
    "spatial": dict(keep_ratio=0.25),
    "fitprune": dict(recipe={0: 4, 1: 4}),
    "atp": dict(num_layers=4, layers=[1, 3]),
    "fastervlm": dict(keep_ratio=0.25),
    "visionzip": dict(keep_tokens=8),
    "dart": dict(layer=2, keep_tokens=8),
    "transprune": dict(layers=[1, 2, 3], transition_layers=[0, 1, 2], keep_ratios=[0.875, 0.625, 0.25]),
    "aim": dict(merge_removals=[4, 2], start_layer=1, step=0.5),
    "vispruner": dict(keep_tokens=8),
    "vtc_cls": dict(keep_tokens=8, start_layer=1),
    "hiprune": dict(keep_tokens=8, object_layer=1),
    "fopru": dict(keep_tokens=8),
    "holov": dict(keep_tokens=8),
    "cdpruner": dict(keep_tokens=8),
    "flowcut": dict(keep_tokens=8),
    "zero_tprune": dict(keep_tokens=8),
    "vflowopt": dict(layers=[0, 2], keep_ratios=[0.5, 0.5], t=1.0, alpha=0.3, merge_grid=2.0, setting=None),
    "catp": dict(keep_ratio=0.25, layer=1),
    "lazyllm": dict(layers=[2, 3], keep_ratios=[0.5, 0.5]),  # revival after Qwen3-VL's two deepstack layers
}
ALL_CLAUSE = ("none", "atp")  # none keeps everything; ATP's untrained modules keep (almost) everything

GRID = "one image's fixed grid"
ONE_GRID = "works on one image's grid of visual tokens .*splits the image into several crops or tiles"
IN_TOWER = "pruning inside the vision tower is not supported for .*: "
ONEVISION_NO_CLS = r"\(SiglipVisionModel\) has no \[CLS\] token"
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CROPS = ("llava_next", "llava_onevision", "internvl")  # an image is several crops / tiles of their own grids
FIXED_GRID_METHODS = ("aim", "fopru")  # on one image's fixed grid (LLaVA-1.5), as their references; vispruner too
ONE_GRID_METHODS = ("hiprune", "holov")  # on one image's own grid per prompt (LLaVA-1.5 and Qwen-VL references)
IN_TOWER_METHODS = ("flowcut", "zero_tprune")
CLS_METHODS = ("fastervlm", "visionzip", "vtc_cls", "vispruner")  # score by the tower's [CLS] row
# (family, method) -> a fragment of the ValueError's message that names the reason
REFUSED: dict[tuple[str, str], str] = {
    **{(family, name): GRID for family in FAMILIES if family != "llava" for name in FIXED_GRID_METHODS},
    **{(family, "vispruner"): GRID for family in ("llava_next", "internvl")},
    **{(family, name): ONE_GRID for family in CROPS for name in ONE_GRID_METHODS},
    **{(family, name): IN_TOWER for family in FAMILIES if family != "llava" for name in IN_TOWER_METHODS},
    **{("llava_onevision", name): ONEVISION_NO_CLS for name in (*CLS_METHODS, "vflowopt")},
    **{(family, name): r"vision tower has no \[CLS\] token" for family in QWEN for name in CLS_METHODS},
}


# The visual tokens each sample keeps after the last stage, from each method's documented budget rule:
# a share of the sample's content tokens, a fixed count, or (FitPrune) the recipe's deletions. Left out:
# rules whose count depends on the scores (sparsevlm's recycling, dart's pivots, aim's merges, vflowopt's
# recycled cells, atp's learned thresholds).
FINAL_SHARE = {"none": 1, "random": 0.5, "fastv": 0.25, "pdrop": 0.25, "transprune": 0.25, "divprune": 0.25}
FINAL_SHARE |= {"spatial": 0.25, "fastervlm": 0.25, "catp": 0.25}
FINAL_TOKENS = {name: 8 for name in ("visionzip", "vispruner", "vtc_cls", "hiprune", "holov", "cdpruner", "fopru")}
FINAL_TOKENS |= {"flowcut": 8, "zero_tprune": 8}


def expected_final(name: str, content: int) -> int | None:
    if content == 0:
        return 0
    if name in FINAL_SHARE:
        return int(content * FINAL_SHARE[name])  # whole numbers here: contents are multiples of 4
    if name in FINAL_TOKENS:
        return min(content, FINAL_TOKENS[name])
    if name == "fitprune":
        return content - sum(PRUNERS["fitprune"]["recipe"].values())
    return None


def refused(family: str, name: str) -> str | None:
    return REFUSED.get((family, name))


class Family:
    """One family's tiny model and its batches: one image per sample, and several (for CATP)."""

    def __init__(self, family: str):
        self.family = family
        if family == "llava":
            self.model, self.image = tiny_llava(grid=4, vocab_size=128, vision_layers=4), LLAVA_IMAGE
        elif family in ("llava_next", "llava_onevision"):
            self.model, self.image = next_model(family, vision_layers=4), NEXT_IMAGE
        elif family.startswith("qwen"):
            self.model, self.image = qwen_model(family), QWEN_IMAGE
        else:
            self.model, self.image = internvl_model(), INTERNVL_IMAGE

    def batch(self, several: bool, text_only: bool = True) -> dict:
        """A left-padded batch: samples with an image (several each for `several`), and one without
        (between them) for `text_only`."""
        f, middle = self.family, [1] if text_only else []
        if f == "llava":
            if several:
                return multi_image_batch([(2, 2, 3), *[(3, 0, 6)] * len(middle), (1, 3, 2)])
            texts = [(2, 3), *[(3, 6)] * len(middle), (1, 2)]
            return make_batch(texts, with_image=[True, *[False] * len(middle), True])
        if f == "llava_onevision" and several:  # each image its base view and one newline (batch_num_images)
            ids = torch.tensor([[1, 5, *[NEXT_IMAGE] * 17, 6, *[NEXT_IMAGE] * 17, 7, 8]])
            pixels = torch.randn(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
            return dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pixels,
                image_sizes=torch.tensor([SQUARE, WIDE]),
                batch_num_images=torch.tensor([2]),
            )
        if f in ("llava_next", "llava_onevision"):
            images = ([WIDE, SQUARE], [TALL, WIDE]) if several else ([WIDE], [TALL])
            make = lambda specs: next_batch(self.model, specs)  # noqa: E731
        elif f.startswith("qwen"):
            images = ([(8, 8), (4, 8)], [(8, 4), (8, 8)]) if several else ([(8, 8)], [(8, 8)])
            make = qwen_batch
        else:
            images = ([1, 2], [1, 1]) if several else ([3], [2])
            make = internvl_batch
        return make([(2, images[0], 3), *[(3, [], 6)] * len(middle), (1, images[1], 2)])

    def content_tokens(self, batch: dict) -> list[int]:
        """Per sample, the image placeholders that are not structural (LLaVA-NeXT's newline tokens)."""
        image = batch["input_ids"] == self.image
        if self.family in ("llava_next", "llava_onevision") and "pixel_values" in batch:
            several = "batch_num_images" in batch
            views = [1] * len(batch["image_sizes"]) if several else None
            reference = stock_reference(self.model, {**batch, "views": views} if several else batch)
            image = image & ~reference["newline"]
        return image.sum(1).tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> Family:
    return Family(request.param)


def test_the_table_covers_every_registered_pruner():
    assert sorted(PRUNERS) == atp.available_pruners()
    assert {name for _, name in REFUSED} <= set(PRUNERS) and {f for f, _ in REFUSED} <= set(FAMILIES)


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_every_pruner_runs_or_refuses_clearly(family, name):
    model = family.model
    # CATP needs several images per prompt; a FitPrune recipe deletes fixed counts, so every sample an image
    batch = family.batch(several=name == "catp", text_only=name != "fitprune")
    content = family.content_tokens(batch)
    with torch.no_grad():
        stock = model(**batch).logits[:, -1]  # no runtime attached: the unpruned model
    pruner = atp.build_pruner(name, **PRUNERS[name]).eval()  # ATP: hard decisions in both modes
    reason = refused(family.family, name)
    try:
        if reason is not None:  # at atp.apply or at the forward
            with pytest.raises(ValueError, match=reason), torch.no_grad():
                atp.apply(model, pruner, mode="drop")
                model(**batch)
            return
        logits, stats = {}, {}
        for mode in ("drop", "mask"):
            atp.apply(model, pruner, mode=mode)
            with torch.no_grad():
                logits[mode] = model(**batch).logits[:, -1]
            stats[mode] = atp.stats(model)
    finally:
        atp.remove(model)
    assert torch.isfinite(logits["drop"]).all() and torch.isfinite(logits["mask"]).all()
    assert stats["drop"].num_visual.tolist() == content
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    final = [expected_final(name, n) for n in content]
    if None not in final:
        assert stats["drop"].visual_tokens[:, -1].tolist() == final
    with_image = stats["drop"].num_visual > 0
    if name not in ALL_CLAUSE:
        assert (stats["drop"].visual_tokens[with_image, -1] < stats["drop"].num_visual[with_image]).all()
    # merging methods (visionzip, aim, holov, vflowopt) write their merged rows in both modes: drop == mask too
    assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-5)
    if name in ALL_CLAUSE:
        assert_close(logits["drop"], stock, rtol=1e-4, atol=1e-5)
    else:  # the pruning reaches the logits, so drop == mask says something
        assert (logits["drop"] - stock).abs().max() > 1e-4
