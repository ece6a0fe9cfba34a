"""The InternVL adapter: tiles as crops, 2x2 patches per visual token, [CLS] offset, clear refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

import atp
from atp.models import InternVLAdapter, get_adapter
from atp.models.tiny_internvl import tiny_internvl_config
from tests.internvl_inputs import IMAGE, PER_TILE, SIDE, internvl_batch, internvl_model, token_places

SPECS = [(2, [3, 1], 3), (3, [], 6), (1, [2], 2)]  # images of 3 and 1 tiles, none, 2 tiles


def test_geometry_is_tiles_of_a_raster_grid():
    model = internvl_model()
    adapter = get_adapter(model)
    assert isinstance(adapter, InternVLAdapter) and adapter.fixed_grid is None and adapter.rope_axes == 1
    batch = internvl_batch(SPECS)
    visual = (batch["input_ids"] == IMAGE) & batch["attention_mask"].bool()
    geometry = adapter.visual_geometry(visual, None)
    tile_of = adapter.tile_of(geometry)
    first_tile = {}
    for b, places in enumerate(token_places(batch, SPECS)):
        positions = visual[b].nonzero()[:, 0].tolist()
        assert len(positions) == len(places)
        for position, (image, tile, row, col) in zip(positions, places):
            first_tile.setdefault(image, tile)
            names = ("image", "crop", "row", "col", "rows", "cols")
            got = [int(getattr(geometry, name)[b, position]) for name in names]
            assert got == [image, tile - first_tile[image], row, col, SIDE // 2, SIDE // 2]
            assert int(tile_of[b, position]) == tile
        assert bool((geometry.image[b][~visual[b]] == -1).all()) and bool((tile_of[b][~visual[b]] == -1).all())


def test_tower_rows_are_the_2x2_patches_after_the_cls_token():
    """Visual token (row, col) holds tower patches (2 row + i, 2 col + j), i, j in {0, 1}: tower tokens
    1 + patch raster index (the [CLS] token is token 0), as the pixel shuffle concatenates them."""
    model = internvl_model()
    adapter = get_adapter(model)
    batch = internvl_batch(SPECS)
    visual = batch["input_ids"] == IMAGE
    geometry = adapter.visual_geometry(visual, None)
    tile, tokens = adapter.tower_rows(geometry)
    assert tokens.shape[-1] == 4
    for b, s in visual.nonzero().tolist():
        row, col = int(geometry.row[b, s]), int(geometry.col[b, s])
        expected = [1 + (2 * row + i) * SIDE + 2 * col + j for i in (0, 1) for j in (0, 1)]
        assert tokens[b, s].tolist() == expected
    projector_tile, number = adapter.projector_rows(geometry, PER_TILE)
    assert torch.equal(projector_tile, tile)
    assert torch.equal(number[visual], geometry.token_in_crop()[visual])  # raster order = the model's order


def test_pixel_shuffle_features_are_the_patches_tower_rows_name():
    """The projector input row of a visual token is the concatenation of the tower outputs of the
    patches `tower_rows` names (checked on the real features, not index tensors)."""
    model = internvl_model()
    adapter = get_adapter(model)
    batch = internvl_batch([(1, [2], 1)])
    captured = []
    model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"]).last_hidden_state  # [tiles, 1 + 64, dv]
        model(**batch)
    visual = batch["input_ids"] == IMAGE
    geometry = adapter.visual_geometry(visual, None)
    tile, tokens = adapter.tower_rows(geometry)
    _, number = adapter.projector_rows(geometry, PER_TILE)
    for b, s in visual.nonzero().tolist():
        expected = torch.cat([tower[tile[b, s], t] for t in tokens[b, s].tolist()])
        torch.testing.assert_close(captured[0][tile[b, s], number[b, s]], expected)


def test_inputs_that_do_not_match_the_tiles_are_refused():
    model = internvl_model()
    batch = internvl_batch([(2, [2], 3)])
    atp.apply(model, atp.build_pruner("none"))
    with pytest.raises(ValueError, match="tiles x tokens per tile"):
        bad = batch["input_ids"].clone()
        bad[0, (bad[0] == IMAGE).nonzero()[0, 0]] = 5  # one image token fewer
        model(input_ids=bad, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="pixel_values holds 1 tiles"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})


def test_full_select_strategy_refused_for_cls_methods():
    model = internvl_model()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        atp.apply(model, atp.build_pruner("fastervlm"))


def test_a_text_backbone_with_attention_sinks_is_refused():
    config = tiny_internvl_config()
    text = {**config.text_config.to_dict(), "model_type": "gpt_oss", "num_local_experts": 2, "num_experts_per_tok": 1}
    config = InternVLConfig(text_config=text, vision_config=config.vision_config.to_dict(), image_token_id=127)
    with pytest.raises(ValueError, match="attention sinks"):
        get_adapter(InternVLForConditionalGeneration(config))


def test_qwen2_text_biases_are_random_in_the_tiny_model():
    """So that the probes' parity tests exercise Qwen2's q/k biases (HF initialises them to zero)."""
    attention = internvl_model("qwen2").model.language_model.layers[0].self_attn
    assert attention.q_proj.bias.abs().sum() > 0 and attention.k_proj.bias.abs().sum() > 0


def test_internvl3_geometry_on_the_real_config():
    """InternVL3's own config (448 px tiles, patch 14, downsample 0.5) on a weightless (meta) model:
    256 visual tokens per tile on a 16 x 16 grid, token (row, col) holding patches (2 row + i, 2 col + j)."""
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(InternVLConfig())
    adapter = get_adapter(model)
    row, col, rows, cols = adapter.tile_grid
    assert adapter.tokens_per_tile == 256 == model.config.image_seq_length and (rows, cols) == (16, 16)
    for t in (0, 1, 17, 255):
        r, c = int(row[t]), int(col[t])
        assert (r, c) == (t // 16, t % 16)
        assert adapter.tile_patches[t].tolist() == [(2 * r + i) * 32 + 2 * c + j for i in (0, 1) for j in (0, 1)]


def test_a_qwen2_sliding_window_shorter_than_the_prompt_is_refused():
    config = tiny_internvl_config()
    config.text_config.use_sliding_window, config.text_config.sliding_window = True, 16
    config.text_config.layer_types = ["sliding_attention"] * config.text_config.num_hidden_layers
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    atp.apply(model, atp.build_pruner("none"))
    with pytest.raises(ValueError, match=r"exceeds the model's sliding window \(16\)"):
        with torch.no_grad():
            model(**internvl_batch([(2, [1], 3)]))
