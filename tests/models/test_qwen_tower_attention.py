"""The Qwen-VL adapter's reading of the vision tower's attention (fused qkv, the tower's 2-D rotary
embedding, attention within each image and, on Qwen2.5-VL, within each window) against a brute-force
recomputation from the stock tower, and its map from visual tokens to tower patches against the
model's own merger (`tests.qwen_tower_reference` describes the reference)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from atp.models import get_adapter
from atp.runtime.probe import TowerCapture
from tests.qwen_inputs import FAMILIES, qwen_batch, qwen_model
from tests.qwen_tower_reference import brute_force_attention, forward_with_hooks, reference_layout

# images of different sizes (tower patches h x w); (6, 10) has 3 x 5 merge units: windows of 2 x 2 units
# that the image's edge cuts short
SPECS = [(2, [(8, 8), (6, 10)], 3), (3, [], 4), (1, [(4, 8)], 2)]


def adapter_attention(model, batch, index: int):
    adapter = get_adapter(model)
    capture = TowerCapture()
    handles = adapter.vision_attention_hooks(index, capture.record)
    capture.armed = True
    forward_with_hooks(model, batch, handles)
    return adapter.tower_attention(index, capture.parts)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tower_attention_equals_brute_force(family, attn):
    model = qwen_model(family, attn=attn)
    batch = qwen_batch(SPECS)
    for index in range(len(model.model.visual.blocks)):  # Qwen2.5-VL: block 0 windowed, block 1 full
        towers = adapter_attention(model, batch, index)
        expected = brute_force_attention(model, batch, index)
        assert len(towers) == len(expected) == 3
        for item, reference in enumerate(expected):
            assert_close(towers.probabilities(item), reference, atol=1e-5, rtol=1e-5)
            assert_close(towers.probabilities(item, slice(1, 3)), reference[:, 1:3], atol=1e-5, rtol=1e-5)


def test_qwen2_5_windows_really_window():
    """The tiny Qwen2.5-VL's block 0 attends within windows (several per image), block 1 over the image."""
    model = qwen_model("qwen2_5_vl")
    batch = qwen_batch(SPECS)
    windowed, full = adapter_attention(model, batch, 0), adapter_attention(model, batch, 1)
    assert [len(set(g.tolist())) for g in windowed.group] == [4, 6, 2]  # 8x8: 2x2 windows; 6x10: 2x3; 4x8: 1x2
    assert [len(set(g.tolist())) for g in full.group] == [1, 1, 1]
    assert bool((windowed.probabilities(0) == 0).any()) and not bool((full.probabilities(0) == 0).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_rows_are_the_merge_units_the_merger_reads(family):
    """Each visual token's LLM input embedding is the merger applied to the 4 tower patches `tower_rows`
    names (the last block's outputs in processor order), on images of different sizes."""
    model = qwen_model(family)
    adapter = get_adapter(model)
    batch = qwen_batch(SPECS)
    tower = model.model.visual
    seen = {}
    handles = [
        tower.blocks[-1].register_forward_hook(lambda _m, _a, out: seen.setdefault("x", out)),
        adapter.language_model.register_forward_pre_hook(
            lambda _m, _a, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
        ),
    ]
    forward_with_hooks(model, batch, handles)
    grids = batch["image_grid_thw"].tolist()
    order, _ = reference_layout(model, grids)
    x = torch.empty_like(seen["x"])
    x[order] = seen["x"]
    offsets = torch.tensor([0, *torch.tensor([h * w for _, h, w in grids]).cumsum(0).tolist()])
    rope, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    visual = batch["input_ids"] == model.config.image_token_id
    geometry = adapter.visual_geometry(visual, adapter.split_position_ids(rope)[1])
    image, tokens = adapter.tower_rows(geometry)
    merger = tower.merger
    for b, s in visual.nonzero().tolist():
        patches = x[offsets[image[b, s]] + tokens[b, s]]  # [4, dv]
        with torch.no_grad():
            assert_close(merger(patches)[0], seen["embeds"][b, s], atol=1e-5, rtol=1e-5)
    assert bool((image[~visual] == -1).all())


def test_a_precomputed_window_order_is_refused():
    """The tower can take a precomputed window order; the adapter reads the one it computes, so it refuses."""
    from transformers.vision_utils import get_vision_window_index

    model = qwen_model("qwen2_5_vl")
    batch = qwen_batch(SPECS)
    tower = model.model.visual
    window_index, cu_window_seqlens = get_vision_window_index(
        batch["image_grid_thw"], tower.spatial_merge_size, tower.window_size, tower.patch_size
    )
    adapter = get_adapter(model)
    capture = TowerCapture()
    handles = adapter.vision_attention_hooks(0, capture.record)
    capture.armed = True
    try:
        with torch.no_grad():
            tower(
                batch["pixel_values"],
                grid_thw=batch["image_grid_thw"],
                window_index=window_index,
                cu_window_seqlens=cu_window_seqlens,
            )
    finally:
        for handle in handles:
            handle.remove()
    with pytest.raises(ValueError, match="precomputed window_index"):
        adapter.tower_attention(0, capture.parts)
