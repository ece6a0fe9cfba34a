"""After `generate`, the stats describe the prefill and every layer's KV cache holds exactly
what that layer saw in the prefill plus the generated tokens.

This catches the silent failure of a runtime that takes each decode step for a new prefill
(as happened when transformers 5.24 renamed the cache keyword): the stats then describe the
last one-token step and the pruner runs again at every step.
"""

from __future__ import annotations

import pytest
import torch

import atp
from atp.models.hf_compat import output_cache
from tests.conftest import make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]
NEW_TOKENS = 6


def fastv():
    return atp.build_pruner("fastv", layer=2, keep_ratio=0.25)


def generate_with_cache(model, batch):
    out = model.generate(
        **batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True
    )
    return out.sequences, output_cache(out)


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_stats_after_generate_are_the_prefills(model_factory, attn, mode):
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED)
    atp.apply(model, fastv(), mode=mode)
    with torch.no_grad():
        model(**batch)  # the prefill alone: the reference
        prefill = atp.stats(model)
        generate_with_cache(model, batch)
    after = atp.stats(model)
    assert prefill.visual_tokens[:, 0].tolist() == [16, 16, 16]  # a prefill, not a decode step
    assert torch.equal(after.visual_tokens, prefill.visual_tokens)
    assert torch.equal(after.tokens, prefill.tokens)
    assert after.kept.keys() == prefill.kept.keys() == {2}
    for a, b in zip(after.kept[2], prefill.kept[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("b", range(len(RAGGED)))
def test_each_layers_cache_holds_its_prefill_tokens_plus_the_generated_ones(model_factory, attn, b):
    model = model_factory(attn_implementation=attn)
    sample = single(make_batch(RAGGED), b)
    atp.apply(model, fastv(), mode="drop")
    with torch.no_grad():
        _, cache = generate_with_cache(model, sample)
    stats = atp.stats(model)
    # the last generated token is never fed back, so the cache holds NEW_TOKENS - 1 of them
    expected = [int(n) + NEW_TOKENS - 1 for n in stats.tokens[0]]
    assert [cache.get_seq_length(layer) for layer in range(len(expected))] == expected
    prompt = int(sample["attention_mask"].sum())
    assert expected[0] == expected[1] == prompt + NEW_TOKENS - 1  # layers before the cut see every token
    assert expected[2] == prompt - 16 + 4 + NEW_TOKENS - 1  # 4 of the 16 visual tokens remain from layer 2 on


def test_ragged_batch_cache_is_as_long_as_its_longest_sample(model_factory):
    model = model_factory()
    batch = make_batch(RAGGED)
    atp.apply(model, fastv(), mode="drop")
    with torch.no_grad():
        _, cache = generate_with_cache(model, batch)
    stats = atp.stats(model)
    # drop mode left-fills each layer's layout: its length is the most real tokens any sample kept
    for layer in range(stats.tokens.shape[1]):
        assert cache.get_seq_length(layer) == int(stats.tokens[:, layer].max()) + NEW_TOKENS - 1
