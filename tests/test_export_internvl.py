"""Export then atp.load_pruned on tiny InternVL: the model read back from disk gives the same logits,
kept tokens and greedy tokens as the model the export was written from (a [CLS]-scored method included)."""

from __future__ import annotations

import pytest
import torch

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


def test_internvl_testbed_export_with_its_processor(tmp_path):
    """The testbed InternVL and its processor: `atp.load_pruned` gives back a processor that makes the same
    inputs from an image and a prompt, and the model read back gives the in-memory pruned model's logits."""
    from PIL import Image

    from atp.data.processor import InternVLImageProcessor, build_internvl_processor
    from atp.export import load_pruned, save_pruned
    from atp.models.build import build_testbed_internvl

    processor = build_internvl_processor(["what", "is", "here"])
    model = build_testbed_internvl(processor, hidden_size=32, intermediate_size=64, num_layers=4, vision_layers=1)
    images = [Image.new("RGB", (336, 168), (200, 30, 30)), Image.new("RGB", (168, 168), (20, 200, 30))]
    text = ["<IMG_CONTEXT> what is here", "<IMG_CONTEXT> what"]
    batch = dict(processor(images=images, text=text, return_tensors="pt", padding=True))
    pruner = pruning_atp()
    atp.apply(model.eval(), pruner, mode="drop")
    with torch.no_grad():
        expected = model(**batch).logits
    assert int(atp.stats(model).visual_tokens[:, -1].sum()) < int(atp.stats(model).num_visual.sum())  # prunes
    atp.remove(model)
    loaded, loaded_processor = load_pruned(save_pruned(tmp_path / "export", model, processor, pruner))
    assert isinstance(loaded_processor, InternVLImageProcessor)
    again = loaded_processor(images=images, text=text, return_tensors="pt", padding=True)
    assert batch.keys() == again.keys() and all(torch.equal(batch[k], again[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
