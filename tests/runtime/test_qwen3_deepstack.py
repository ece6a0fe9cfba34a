"""Qwen3-VL's deepstack rows travel with their visual tokens through pruning."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

SAMPLE = [(2, [(4, 6), (4, 4)], 3)]


def language_model_inputs(model, batch) -> dict:
    """The kwargs the stock model hands its language model (inputs_embeds, M-RoPE ids, deepstack)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_drop_before_the_llm_equals_stock_on_kept_tokens_with_their_deepstack_rows(attn):
    model = qwen_model("qwen3_vl", attn)
    batch = qwen_batch(SAMPLE)
    stock_inputs = language_model_inputs(model, batch)
    assert len(stock_inputs["deepstack_visual_embeds"]) == 2  # added after LM layers 0 and 1
    atp.apply(model, atp.build_pruner("random", layers=[0], keep_ratio=0.5, seed=2), mode="drop")
    with torch.no_grad():
        pruned = model(**batch).logits
    kept = atp.stats(model).kept[0][0]
    atp.remove(model)
    # brute force: the stock language model on the kept tokens, each with its own ids and deepstack rows
    image = batch["input_ids"][0] == IMAGE
    keep = ~image
    keep[image.nonzero()[kept, 0]] = True
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=stock_inputs["inputs_embeds"][:, keep],
            position_ids=stock_inputs["position_ids"][:, :, keep],
            visual_pos_masks=image[None, keep],
            deepstack_visual_embeds=[rows[kept] for rows in stock_inputs["deepstack_visual_embeds"]],
        ).last_hidden_state
        reference = model.lm_head(hidden)
    assert 0 < len(kept) < int(image.sum())
    assert_close(pruned[0, keep], reference[0], rtol=1e-5, atol=1e-5)
    assert bool((pruned[0, ~keep] == 0).all())  # dropped positions: zero hidden state, no bias in lm_head


@pytest.mark.parametrize("layers", [[1, 3], [0, 2]])
def test_drop_equals_mask_and_generate_across_deepstack_layers(layers):
    model = qwen_model("qwen3_vl")
    batch = qwen_batch([SAMPLE[0], (3, [], 4), (1, [(6, 4)], 2)])
    logits, generated, stats = {}, {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner("random", layers=layers, keep_ratio=0.5, seed=1), mode=mode)
        with torch.no_grad():
            logits[mode] = model(**batch).logits[:, -1]
        stats[mode] = atp.stats(model)
        generated[mode] = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-5)
    assert torch.equal(generated["drop"], generated["mask"])
