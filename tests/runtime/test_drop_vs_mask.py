"""Drop mode (physical removal) and mask mode (key bias) compute the same function."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from tests.conftest import IMAGE, make_batch, single
from tests.runtime.family_checks import random_pruner

RAGGED = [(2, 3), (6, 1), (1, 7)]


def kept_positions(batch, stats, layer_count):
    """[B, S] bool: real positions every layer saw (text + visual tokens kept to the end)."""
    real = batch["attention_mask"].bool()
    last_stage = max(stats.kept)
    keep = real & (batch["input_ids"] != IMAGE)
    for b in range(real.shape[0]):
        visual_positions = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0]
        keep[b, visual_positions[stats.kept[last_stage][b]]] = True
    return keep


@pytest.mark.parametrize("position_ids", ["original", "compact"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_drop_equals_mask_at_every_kept_position(model_factory, attn, position_ids, padding):
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED, padding=padding)
    with torch.no_grad():
        atp.apply(model, random_pruner(position_ids=position_ids), mode="drop")
        dropped = model(**batch).logits
        drop_stats = atp.stats(model)
        atp.apply(model, random_pruner(position_ids=position_ids), mode="mask")
        masked = model(**batch).logits
        mask_stats = atp.stats(model)
    assert torch.equal(drop_stats.visual_tokens, mask_stats.visual_tokens)
    assert drop_stats.visual_tokens[0].tolist() == [16, 8, 8, 4]
    for layer in drop_stats.kept:
        for a, b in zip(drop_stats.kept[layer], mask_stats.kept[layer]):
            assert torch.equal(a, b)
    keep = kept_positions(batch, drop_stats, 4)
    assert_close(dropped[keep], masked[keep], rtol=1e-4, atol=1e-5)
    last = batch["attention_mask"].sum(1) - 1 if padding == "right" else torch.full((3,), -1)
    rows = torch.arange(3)
    assert_close(dropped[rows, last], masked[rows, last], rtol=1e-4, atol=1e-5)


def test_drop_mode_really_shortens_the_sequence(model_factory):
    model = model_factory()
    batch = make_batch(RAGGED)
    lengths = {}
    for index, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_hook(lambda m, a, out, i=index: lengths.__setitem__(i, out.shape[1]))
    atp.apply(model, random_pruner(), mode="drop")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape  # HF layout restored at the output
    real = batch["attention_mask"].sum(1)
    assert lengths == {
        0: int(real.max()),
        1: int((real - 8).max()),
        2: int((real - 8).max()),
        3: int((real - 12).max()),
    }


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_batch_of_ragged_prompts_equals_batch_of_one(model_factory, attn, mode):
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED)
    atp.apply(model, random_pruner(), mode=mode)
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        batched_kept = atp.stats(model).kept
        for b in range(3):
            alone = model(**single(batch, b)).logits[:, -1]
            assert_close(alone[0], batched[b], rtol=1e-4, atol=1e-5)
            for layer, kept in atp.stats(model).kept.items():
                assert torch.equal(kept[0], batched_kept[layer][b])


def test_greedy_generate_identical_across_modes_and_cache(model_factory, attn):
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED)
    outputs = {}
    for mode in ("drop", "mask"):
        atp.apply(model, random_pruner(), mode=mode)
        for use_cache in (True, False):
            outputs[mode, use_cache] = model.generate(
                **batch, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=use_cache
            )
    reference = outputs["drop", True]
    assert reference.shape[1] == batch["input_ids"].shape[1] + 10
    for key, generated in outputs.items():
        assert torch.equal(generated, reference), key
    # and the pruned model really generates differently from the stock one
    atp.remove(model)
    stock = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert not torch.equal(stock, reference)


def test_batched_generate_equals_one_by_one(model_factory):
    model = model_factory()
    batch = make_batch(RAGGED)
    atp.apply(model, random_pruner(), mode="drop")
    together = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, -8:]
    for b in range(3):
        alone = model.generate(**single(batch, b), max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, -8:]
        assert torch.equal(alone[0], together[b])


def test_sample_without_image_passes_unpruned(model_factory):
    model = model_factory()
    batch = make_batch([(2, 3), (4, 4)], with_image=[True, False])
    text_only = single(batch, 1)
    with torch.no_grad():
        stock = model(**text_only).logits[0, -1]
        atp.apply(model, random_pruner(), mode="drop")
        pruned = model(**batch).logits[1, -1]
    assert_close(pruned, stock, rtol=1e-4, atol=1e-5)
    stats = atp.stats(model)
    assert stats.visual_tokens[1].tolist() == [0, 0, 0, 0]
    assert stats.kept[1][1].numel() == 0


def test_decode_positions_continue_from_the_original_length(model_factory):
    """With compact ids dropped before the LLM, decode steps still line up with mask mode."""
    model = model_factory()
    batch = make_batch(RAGGED)
    generated = {}
    for mode in ("drop", "mask"):
        atp.apply(model, random_pruner(layers=[0], keep_ratio=0.25, position_ids="compact"), mode=mode)
        generated[mode] = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(generated["drop"], generated["mask"])
