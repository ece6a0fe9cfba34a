"""The Qwen-VL adapter's reading of the vision tower's attention (fused qkv, the tower's 2-D rotary
embedding, attention within each image and, on Qwen2.5-VL, within each window) against a brute-force
recomputation from the stock tower, and its map from visual tokens to tower patches against the
model's own merger.

The reference captures each block's input with a pre-hook (in the tower's own sequence order), finds
that order itself (Qwen2.5-VL's window order written as loops from the documented rule and checked
against the rows the tower really received), applies the block's norm, qkv and the tower's rotary
module to positions written as loops, and takes a softmax per query over the keys of its image (or
window), one query at a time."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from atp.models import get_adapter
from atp.runtime.probe import TowerCapture
from tests.qwen_inputs import FAMILIES, qwen_batch, qwen_model

# images of different sizes (tower patches h x w); (6, 10) has 3 x 5 merge units: windows of 2 x 2 units
# that the image's edge cuts short
SPECS = [(2, [(8, 8), (6, 10)], 3), (3, [], 4), (1, [(4, 8)], 2)]


def processor_positions(h: int, w: int) -> list[tuple[int, int]]:
    """(row, col) of each tower patch of an h x w image in the processor's order: 2x2 merge units in
    raster order, each unit's 4 patches in raster order."""
    return [(2 * r + dr, 2 * c + dc) for r in range(h // 2) for c in range(w // 2) for dr in (0, 1) for dc in (0, 1)]


def windows_of(h: int, w: int, side: int) -> list[list[int]]:
    """Qwen2.5-VL's windows of one image: lists of merge units (raster numbers), windows of side x side
    units in raster order over the image, the units of a window in raster order."""
    rows, cols = h // 2, w // 2
    out = []
    for wr in range(0, rows, side):
        for wc in range(0, cols, side):
            out.append([r * cols + c for r in range(wr, min(wr + side, rows)) for c in range(wc, min(wc + side, cols))])
    return out


def reference_layout(model, grids: list[list[int]]) -> tuple[list[int], list[int]]:
    """(tower order, group): the processor-order patch at each place of the tower's sequence, and each
    processor-order patch's attention group in windowed blocks (its window; on Qwen2/3: its image)."""
    vision = model.config.vision_config
    order, group, offset, count = [], [], 0, 0
    for _, h, w in grids:
        windowed = hasattr(model.model.visual, "fullatt_block_indexes")
        units = windows_of(h, w, vision.window_size // 2 // vision.patch_size) if windowed else [range(h * w // 4)]
        image_group = [0] * (h * w)
        for window in units:
            for u in window:
                order += [offset + 4 * u + p for p in range(4)]
                for p in range(4):
                    image_group[4 * u + p] = count
            count += 1
        group += image_group
        offset += h * w
    return order, group


def brute_force_attention(model, batch, index: int) -> list[torch.Tensor]:
    """Per image [H, T, T]: block `index`'s attention probabilities between its patches (processor order),
    0 where a query may not attend (other window)."""
    tower = model.model.visual
    inputs, embedded = {}, {}
    handles = [
        tower.blocks[index].register_forward_pre_hook(lambda _m, args: inputs.update(x=args[0])),
        tower.blocks[0].register_forward_pre_hook(lambda _m, args: embedded.update(x=args[0])),
        tower.patch_embed.register_forward_hook(lambda _m, _a, out: embedded.setdefault("patches", out)),
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    grids = batch["image_grid_thw"].tolist()
    order, group = reference_layout(model, grids)
    if not hasattr(tower, "pos_embed"):  # Qwen3-VL adds position embeddings before block 0
        assert torch.equal(embedded["x"], embedded["patches"][order])  # the order is the tower's
    windowed = hasattr(tower, "fullatt_block_indexes") and index not in tower.fullatt_block_indexes
    x = torch.empty_like(inputs["x"])
    x[order] = inputs["x"]  # processor order
    block = tower.blocks[index]
    attention = block.attn
    heads = attention.num_heads
    with torch.no_grad():
        q, k, _ = attention.qkv(block.norm1(x)).view(x.shape[0], 3, heads, -1).unbind(1)  # [N, H, hd]
        positions = torch.tensor([pos for _, h, w in grids for pos in processor_positions(h, w)])  # [N, 2]
        cos, sin = tower.rotary_pos_emb(x, positions)  # [N, hd]

    def rotate(v):
        half = v.shape[-1] // 2
        turned = torch.cat([-v[..., half:], v[..., :half]], -1)
        return v.float() * cos[:, None].float() + turned.float() * sin[:, None].float()

    q, k = rotate(q), rotate(k)
    out, start = [], 0
    for _, h, w in grids:
        size = h * w
        probs = torch.zeros(heads, size, size)
        for head in range(heads):
            for i in range(size):
                allowed = [
                    j for j in range(size) if not windowed or group[start + j] == group[start + i]
                ]  # the image's patches; in a windowed block, the query's window
                logits = torch.stack([q[start + i, head] @ k[start + j, head] for j in allowed]) * attention.scaling
                probs[head, i, allowed] = torch.softmax(logits, 0)
        out.append(probs)
        start += size
    return out


def adapter_attention(model, batch, index: int):
    adapter = get_adapter(model)
    capture = TowerCapture()
    handles = adapter.vision_attention_hooks(index, capture.record)
    capture.armed = True
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
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
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
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
