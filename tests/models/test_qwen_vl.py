"""The Qwen2(.5)-VL adapter: per-image grids from the model's own M-RoPE ids, and clear refusals."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.models import QwenVLAdapter, get_adapter
from tests.qwen_inputs import FAMILIES, IMAGE, qwen_batch, qwen_model

SPECS = [(2, [(4, 6), (6, 4)], 3), (3, [], 6), (1, [(4, 4)], 2)]


def brute_force_geometry(batch) -> dict[str, list[list[int]]]:
    """Image, row, column, rows, cols of every image token, from image_grid_thw, written as loops:
    images in order, sample by sample, each (h/2) x (w/2) tokens in raster order."""
    grids = batch["image_grid_thw"].tolist()
    ids = batch["input_ids"]
    out = {name: [[-1] * ids.shape[1] for _ in range(ids.shape[0])] for name in ("image", "row", "col", "rows", "cols")}
    image, within = 0, 0
    for b in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            if ids[b, s] != IMAGE:
                continue
            _, h, w = grids[image]
            rows, cols = h // 2, w // 2
            values = dict(image=image, row=within // cols, col=within % cols, rows=rows, cols=cols)
            for name, value in values.items():
                out[name][b][s] = value
            within += 1
            if within == rows * cols:
                image, within = image + 1, 0
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_matches_image_grid_thw(family):
    model = qwen_model(family)
    adapter = get_adapter(model)
    assert isinstance(adapter, QwenVLAdapter) and adapter.rope_axes == 3 and adapter.fixed_grid is None
    batch = qwen_batch(SPECS)
    rope, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    _, rope = adapter.split_position_ids(rope)
    visual = (batch["input_ids"] == IMAGE) & batch["attention_mask"].bool()
    geometry = adapter.visual_geometry(visual, rope)
    for name, values in brute_force_geometry(batch).items():
        assert getattr(geometry, name).tolist() == values, name
    assert torch.equal(geometry.crop == 0, visual)


def test_position_ids_split_into_text_and_rotary_rows():
    adapter = get_adapter(qwen_model("qwen2_vl"))
    ids = torch.arange(4 * 2 * 5).view(4, 2, 5)
    text, rope = adapter.split_position_ids(ids)
    assert torch.equal(text, ids[0]) and torch.equal(rope, ids[1:].permute(1, 2, 0))
    text, rope = adapter.split_position_ids(ids[1:])
    assert text is None and torch.equal(rope, ids[1:].permute(1, 2, 0))
    with pytest.raises(ValueError, match=r"\[3, B, S\] or \[4, B, S\]"):
        adapter.split_position_ids(ids[:2])


@pytest.mark.parametrize("name", ["visionzip", "fastervlm"])
def test_cls_methods_refuse_a_tower_without_cls(name):
    model = qwen_model("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        atp.apply(model, atp.build_pruner(name, position_ids="original"))


def test_compact_positions_refused_on_mrope():
    model = qwen_model("qwen2_vl")
    with pytest.raises(ValueError, match="position_ids='compact' has no defined rule"):
        atp.apply(model, atp.build_pruner("pdrop", layers=[1, 2], keep_ratios=[0.5, 0.5], position_ids="compact"))
    atp.apply(model, atp.build_pruner("pdrop", layers=[1, 2], keep_ratios=[0.5, 0.5], position_ids="original"))


@pytest.mark.parametrize("name", ["pdrop", "sparsevlm", "divprune", "fastervlm", "visionzip"])
def test_reference_policy_resolves_per_family(name, model_factory):
    """Methods whose reference compacts positions: compact on LLaVA (RoPE), original on Qwen (M-RoPE)."""
    small = {"pdrop": dict(layers=[1, 2], keep_ratios=[0.5, 0.25]), "sparsevlm": dict(layers=[1], keep_tokens=[4])}
    pruner = atp.build_pruner(name, **small.get(name, {}))
    assert pruner.position_ids == "reference" and pruner.reference_position_ids == "compact"
    assert pruner.position_policy(compact_defined=True) == "compact"
    assert pruner.position_policy(compact_defined=False) == "original"
    llava = model_factory()
    atp.apply(llava, pruner)
    assert atp.runtime_of(llava).position_policy == "compact"


def test_reference_policy_of_non_compacting_methods_is_original():
    for name in ("fastv", "random", "spatial"):
        assert atp.build_pruner(name).position_policy(compact_defined=True) == "original"


def test_image_tokens_not_matching_image_grid_thw():
    model = qwen_model("qwen2_vl")
    batch = qwen_batch(SPECS)
    batch["image_grid_thw"] = torch.tensor([[1, 4, 6], [1, 4, 4], [1, 4, 4]])  # the second image has 6 tokens
    batch["pixel_values"] = batch["pixel_values"][: 24 + 16 + 16]
    atp.apply(model, atp.build_pruner("random", layers=[1], keep_ratio=0.5))
    with pytest.raises(ValueError, match=r"image tokens do not match image_grid_thw.*runs of \[6, 6, 4\]"):
        model(**batch)


def test_video_inputs_refused():
    model = qwen_model("qwen2_vl")
    batch = qwen_batch(SPECS[:1])
    atp.apply(model, atp.build_pruner("random", layers=[1], keep_ratio=0.5))
    with pytest.raises(ValueError, match="holds a video"):
        model(**batch, pixel_values_videos=batch["pixel_values"], video_grid_thw=batch["image_grid_thw"])
