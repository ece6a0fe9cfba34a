"""The runtime on tiny LLaVA-NeXT and LLaVA-OneVision models: anyres crops, newline tokens, parity.

References: the stock HF forward and greedy decoding, the mask path, batch-1 runs, and the stock
model's own features (which placeholder holds `image_newline`, which projected tower output each
other placeholder holds), none of them read through the atp adapter.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.models import get_adapter
from tests.next_inputs import FAMILIES, GRID, IMAGE, SQUARE, TALL, WIDE, next_batch, next_model, stock_reference
from tests.runtime.family_checks import (
    check_generate_identical_across_modes_and_cache,
    check_none_equals_stock,
    check_ragged_equals_batch_of_one,
    random_pruner,
)

TWO_ASPECTS = [(2, [WIDE], 3), (4, [SQUARE], 2)]  # 1 x 2 crops (rows unpadded) and 2 x 2 crops
RAGGED = [(2, [WIDE], 3), (3, [], 6), (1, [TALL], 2)]  # an image, none, an image with unpadded columns


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_names_the_tower_output_each_token_holds(family):
    """Every content token's (view, row, col) points at the projected tower output the stock model put
    there, and the structural tokens are exactly the placeholders holding `image_newline`."""
    model = next_model(family)
    batch = next_batch(model, TWO_ASPECTS)
    reference = stock_reference(model, batch)
    runtime_geometry = {}
    atp.apply(model, atp.build_pruner("none"))
    runtime = atp.runtime_of(model)
    adapter = runtime.adapter
    placeholders = batch["input_ids"] == IMAGE
    with torch.no_grad():
        model(**batch)
    assert torch.equal(adapter.structural_tokens(placeholders), reference["newline"])
    geometry = adapter.visual_geometry(placeholders & ~reference["newline"], None)
    runtime_geometry = geometry
    for b, positions in enumerate(reference["content"]):
        for p, (view, patch) in zip(positions, reference["where"][b]):
            assert int(runtime_geometry.view[b, p]) == view
            assert int(geometry.row[b, p]) * GRID + int(geometry.col[b, p]) == patch
            assert (int(geometry.rows[b, p]), int(geometry.cols[b, p])) == (GRID, GRID)
    assert geometry.crop[1].max() == 4 and geometry.crop[0].max() == 2  # 2 x 2 and 1 x 2 crops after the base
    stats = atp.stats(model)
    assert stats.num_visual.tolist() == [len(c) for c in reference["content"]]  # newline tokens are not counted
    atp.remove(model)
    assert get_adapter(model).visual_token_counts(batch).tolist() == stats.num_visual.tolist()  # without the runtime
    assert reference["newline"].sum(1).tolist() == [2, 8]  # one per unpadded row of the anyres grid


def test_onevision_resampled_grid_is_described_as_its_own_grid():
    """anyres_max_1: the 2 x 2 crop grid (8 x 8 tokens) is resampled to 4 x 4; those tokens are crop 1
    of a 4 x 4 grid with no single tower output (view -1), the base view stays exact."""
    model = next_model("llava_onevision", vision_aspect_ratio="anyres_max_1")
    batch = next_batch(model, [(2, [SQUARE], 3)])
    reference = stock_reference(model, batch)
    atp.apply(model, atp.build_pruner("spatial", keep_ratio=0.25))
    with torch.no_grad():
        model(**batch)
    adapter = atp.runtime_of(model).adapter
    geometry = adapter.visual_geometry((batch["input_ids"] == IMAGE) & ~reference["newline"], None)
    positions = reference["content"][0]
    exact = [where for where in reference["where"][0] if where != (-1, -1)]
    assert len(positions) == 32 and len(exact) >= 16 and reference["newline"].sum() == 4
    base, grid = positions[:16], positions[16:]
    assert geometry.view[0, base].tolist() == [0] * 16 and geometry.crop[0, grid].tolist() == [1] * 16
    assert geometry.view[0, grid].tolist() == [-1] * 16
    assert geometry.row[0, grid].tolist() == [r for r in range(4) for _ in range(4)]
    assert geometry.col[0, grid].tolist() == list(range(4)) * 4
    assert atp.stats(model).visual_tokens[0, 0] == 4 + 4  # stride 2 on the base view and on the new grid


@pytest.mark.parametrize("family", FAMILIES)
def test_none_equals_stock_forward_and_generate(family, attn):
    model = next_model(family, attn)
    batch = next_batch(model, TWO_ASPECTS)
    assert check_none_equals_stock(model, batch) == [32, 80]


def kept_positions(batch, reference, stats) -> torch.Tensor:
    """[B, S] bool: real positions every layer saw (text, newlines, the content tokens kept to the end)."""
    real = batch["attention_mask"].bool()
    keep = real & ((batch["input_ids"] != IMAGE) | reference["newline"])
    for b, positions in enumerate(reference["content"]):
        for number in stats.kept[max(stats.kept)][b].tolist():
            keep[b, positions[number]] = True
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_random_drop_equals_mask_and_newlines_stay_in_every_layer(family, attn):
    model = next_model(family, attn)
    batch = next_batch(model, RAGGED)
    reference = stock_reference(model, batch)
    structure = ((batch["input_ids"] != IMAGE) | reference["newline"]) & batch["attention_mask"].bool()
    logits, stats = {}, {}
    with torch.no_grad():
        for mode in ("drop", "mask"):
            atp.apply(model, random_pruner(), mode=mode)
            logits[mode] = model(**batch, use_cache=True).logits
            stats[mode] = atp.stats(model)
            layouts = atp.runtime_of(model)._last_prefill.layouts
            for b in range(len(RAGGED)):
                newlines = set(reference["newline"][b].nonzero()[:, 0].tolist())
                for layout in layouts:  # every newline token is a visible, non-visual slot of every layer
                    visible = layout.index[b][layout.visible()[b]].tolist()
                    assert newlines <= set(visible)
                    assert not (layout.visual[b] & torch.isin(layout.index[b], torch.tensor(sorted(newlines)))).any()
            # text and newline tokens are the non-visual tokens of every layer
            assert (stats[mode].tokens - stats[mode].visual_tokens == structure.sum(1, keepdim=True)).all()
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    assert stats["drop"].visual_tokens.tolist() == [[32, 16, 16, 8], [0, 0, 0, 0], [32, 16, 16, 8]]
    keep = kept_positions(batch, reference, stats["drop"])
    assert_close(logits["drop"][keep], logits["mask"][keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_greedy_generate_identical_across_modes_and_cache(family):
    model = next_model(family)
    check_generate_identical_across_modes_and_cache(model, next_batch(model, RAGGED))


@pytest.mark.parametrize("family", FAMILIES)
def test_random_ragged_batch_equals_batch_of_one(family):
    model = next_model(family)
    singles = [next_batch(model, [spec], seeds=[b]) for b, spec in enumerate(RAGGED)]
    check_ragged_equals_batch_of_one(model, next_batch(model, RAGGED), singles, "drop")


def test_images_without_image_sizes_are_refused_clearly():
    model = next_model("llava_next")
    batch = next_batch(model, TWO_ASPECTS)
    del batch["image_sizes"]
    atp.apply(model, atp.build_pruner("none"))
    with pytest.raises(ValueError, match="without image_sizes; pass the image_sizes its processor returns"):
        model(**batch)


def test_remove_restores_the_model_instance():
    """The get_image_features wrapper is per instance and goes with atp.remove (applying twice included)."""
    model = next_model("llava_next")
    original = model.model.get_image_features
    atp.apply(model, atp.build_pruner("none"))
    atp.apply(model, random_pruner())
    assert "get_image_features" in vars(model.model)
    atp.remove(model)
    assert "get_image_features" not in vars(model.model) and model.model.get_image_features == original


def test_onevision_several_images_per_sample_are_base_views():
    """batch_num_images: a sample of several images gets each image's base view and one newline (as the
    model's get_image_features decides); the geometry names each token's tower output; none = stock."""
    model = next_model("llava_onevision")
    ids = torch.tensor([[1, 5, *[IMAGE] * 17, 6, *[IMAGE] * 17, 7, 8]])
    pixels = torch.randn(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        image_sizes=torch.tensor([SQUARE, WIDE]),
        batch_num_images=torch.tensor([2]),
    )
    with torch.no_grad():
        stock = model(**batch).logits
    reference = stock_reference(model, {**batch, "views": [1, 1]})
    atp.apply(model, atp.build_pruner("spatial", keep_ratio=0.25))
    with torch.no_grad():
        model(**batch)
    assert atp.stats(model).num_visual.tolist() == [32] and atp.stats(model).visual_tokens[0, 0] == 8
    geometry = atp.runtime_of(model).adapter.visual_geometry((ids == IMAGE) & ~reference["newline"], None)
    for p, (view, patch) in zip(reference["content"][0], reference["where"][0]):
        assert int(geometry.view[0, p]) == view and int(geometry.row[0, p]) * GRID + int(geometry.col[0, p]) == patch
    atp.apply(model, atp.build_pruner("none"))
    with torch.no_grad():
        ours_none = model(**batch).logits
    assert_close(ours_none, stock, rtol=0, atol=0)
