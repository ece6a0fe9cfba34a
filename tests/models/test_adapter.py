"""The adapter contract on LLaVA: per-visual-token geometry, position ids and rotary lookup."""

from __future__ import annotations

import pytest
import torch

from atp.models import get_adapter
from atp.runtime.layout import Layout


def brute_force_llava_geometry(visual: torch.Tensor, rows: int, cols: int) -> dict[str, list[list[int]]]:
    """Each sample's image tokens are whole images one after another, raster order, written as loops."""
    out = {name: [[-1] * visual.shape[1] for _ in range(visual.shape[0])] for name in ("image", "row", "col")}
    image_before = 0
    for b in range(visual.shape[0]):
        count = 0
        for s in range(visual.shape[1]):
            if visual[b, s]:
                out["image"][b][s] = image_before + count // (rows * cols)
                out["row"][b][s] = (count % (rows * cols)) // cols
                out["col"][b][s] = count % cols
                count += 1
        image_before += count // (rows * cols)
    return out


def test_llava_geometry_matches_loops(model_factory):
    adapter = get_adapter(model_factory())
    rows, cols = adapter.fixed_grid
    visual = torch.zeros(3, 40, dtype=torch.bool)
    visual[0, 3:35] = True  # two images
    visual[2, 10:26] = True  # one image; sample 1 has none
    geometry = adapter.visual_geometry(visual, None)
    expected = brute_force_llava_geometry(visual, rows, cols)
    for name, values in expected.items():
        assert getattr(geometry, name).tolist() == values, name
    assert torch.equal(geometry.rows == rows, visual) and torch.equal(geometry.cols == cols, visual)
    assert torch.equal(geometry.crop == 0, visual)
    assert int(geometry.image.max()) == 2


def test_geometry_gathers_with_slots(model_factory):
    adapter = get_adapter(model_factory())
    visual = torch.zeros(1, 20, dtype=torch.bool)
    visual[0, 2:18] = True
    geometry = adapter.visual_geometry(visual, None)
    index = torch.tensor([[0, 5, 17, 19]])
    slots = geometry.gather(index, visual[:, [0, 5, 17, 19]])
    assert slots.row.tolist() == [[-1, 0, 3, -1]] and slots.col.tolist() == [[-1, 3, 3, -1]]
    assert slots.token_in_crop().tolist() == [[-1, 3, 15, -1]]


def test_llava_positions_are_one_axis(model_factory):
    adapter = get_adapter(model_factory())
    assert adapter.rope_axes == 1
    position = torch.arange(6)[None]
    assert adapter.split_position_ids(position) == (position, None)
    with pytest.raises(ValueError, match="2D position_ids"):
        adapter.split_position_ids(position[None].expand(3, 1, 6))
    hidden = torch.zeros(1, 6, 64)
    cos, sin = adapter.rotary(hidden, position, None)
    stock_cos, stock_sin = adapter.rotary_emb(hidden, position)
    assert torch.equal(cos, stock_cos) and torch.equal(sin, stock_sin)


def test_layout_carries_rotary_ids_with_the_tokens():
    valid = torch.ones(1, 5, dtype=torch.bool)
    rope = torch.arange(15).view(1, 5, 3)
    layout = Layout.initial(valid, torch.arange(5)[None], valid, rope)
    kept = layout.gather(torch.tensor([[1, 4]]), torch.ones(1, 2, dtype=torch.bool))
    assert kept.rope.tolist() == [[[3, 4, 5], [12, 13, 14]]]
    assert Layout.initial(valid, torch.arange(5)[None], valid).gather(torch.tensor([[1]]), valid[:, :1]).rope is None
