"""The StreamingLLM-style cache and the KV-cache registry, against stock HF generate and a brute force.

The brute force recomputes every step from scratch: a full eager forward of prompt + generated tokens
in which each decode row attends to exactly the entries the rule had kept when that row was the newest
query, with the kept sets computed by plain loops over the rule as docs/methods.md states it.
"""

from __future__ import annotations

import pytest
import torch

from atp.models.hf_compat import cache_kwargs
from atp.runtime.a2sf import A2SFCache
from atp.runtime.kv_cache import available_kv_caches, build_kv_cache
from atp.runtime.streaming import StreamingCache
from tests.runtime.test_a2sf import STEPS, attention_modules, cache_kept, causal_lm, greedy, single_text, text_batch


def streaming_kept(slots: list[int], visible: list[bool], budget: int, sinks: int) -> list[int]:
    """The rule: at most `budget`; else the first `sinks` visible of the older ones (then the earliest
    padding if too few are visible) and the `budget - sinks` newest."""
    if len(slots) <= budget:
        return list(slots)
    window = budget - sinks
    older, newest = slots[: len(slots) - window], slots[len(slots) - window :]
    chosen = [k for k in older if visible[k]][:sinks]
    for k in older:
        if len(chosen) == sinks:
            break
        if k not in chosen:
            chosen.append(k)
    return sorted(chosen + newest)


def brute_force(model, inputs, budget, sinks):
    """(tokens [B, STEPS], kept[forward][layer][b][g]) with per-row masks from the rule."""
    layers = len(attention_modules(model))
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    ids, pad = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    batch, prompt = ids.shape
    cached = [[] for _ in range(batch)]  # slots each sample's cache holds (the same in every layer and head)
    allowed = {}  # (b, row) -> slots that row may attend to besides itself
    kept_log, tokens = [], []
    for step in range(STEPS):
        n = ids.shape[1]
        mask = torch.full((batch, heads, n, n), torch.finfo(torch.float32).min)
        for b in range(batch):
            for i in range(n):
                for k in range(i + 1):
                    if pad[b, k] and (i < prompt or k == i or k in allowed[b, i]):
                        mask[b, :, i, k] = 0.0
        handles = [
            m.register_forward_pre_hook(
                lambda mod, args, kwargs: (args, {**kwargs, "attention_mask": mask}), with_kwargs=True
            )
            for m in attention_modules(model)
        ]
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=pad)
        finally:
            for handle in handles:
                handle.remove()
        rows = range(prompt) if step == 0 else [n - 1]
        for b in range(batch):
            cached[b] = streaming_kept(cached[b] + list(rows), [bool(v) for v in pad[b]], budget, sinks)
            allowed[b, n] = set(cached[b])
        kept_log.append([[[list(cached[b]) for _ in range(kv_heads)] for b in range(batch)] for _ in range(layers)])
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        pad = torch.cat([pad, torch.ones(batch, 1, dtype=pad.dtype)], dim=1)
    return torch.stack(tokens, 1), kept_log


def streaming_generate(model, inputs, budget, sinks):
    with StreamingCache(model, budget=budget, sinks=sinks, record=True) as cache:
        tokens = greedy(model, inputs, **cache_kwargs(cache))
    return tokens, cache


def test_streaming_kept_reference_itself():
    visible = [False, False, True, True, True, True, True, True]
    assert streaming_kept(list(range(8)), visible, budget=5, sinks=2) == [2, 3, 5, 6, 7]
    assert streaming_kept(list(range(8)), [False] * 7 + [True], budget=5, sinks=2) == [0, 1, 5, 6, 7]
    assert streaming_kept([0, 1, 5, 6, 7, 8], [True] * 9, budget=5, sinks=0) == [1, 5, 6, 7, 8]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("budget, sinks", [(6, 2), (5, 0), (7, 6)])
def test_small_budget_matches_brute_force(attn, budget, sinks):
    model, reference_model = causal_lm(attn), causal_lm("eager")
    batch = text_batch()
    for inputs in (single_text(batch, 0), batch):
        tokens, cache = streaming_generate(model, inputs, budget, sinks)
        ref_tokens, ref_kept = brute_force(reference_model, inputs, budget, sinks)
        assert cache_kept(cache) == ref_kept
        assert torch.equal(tokens, ref_tokens)
        length = inputs["input_ids"].shape[1]
        assert [step[0] for step in cache.sizes()] == [min(budget, length + t) for t in range(STEPS)]
    assert not torch.equal(tokens, greedy(model, batch))  # eviction changes something


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_large_budget_equals_stock_generate(attn):
    model = causal_lm(attn)
    batch = text_batch()
    tokens, cache = streaming_generate(model, batch, budget=64, sinks=4)
    assert torch.equal(tokens, greedy(model, batch))
    assert max(max(step) for step in cache.sizes()) == batch["input_ids"].shape[1] + STEPS - 1


def test_registry_builds_each_policy_by_name():
    assert available_kv_caches() == ["a2sf", "streaming"]
    model, batch = causal_lm("sdpa"), text_batch()
    with A2SFCache(model, budget=6, forgetting_factor=0.3, recent=1) as cache:
        direct = greedy(model, batch, **cache_kwargs(cache))
    with build_kv_cache("a2sf", model, budget=6, forgetting_factor=0.3, recent=1) as cache:
        assert isinstance(cache, A2SFCache)
        assert torch.equal(greedy(model, batch, **cache_kwargs(cache)), direct)
    with build_kv_cache("streaming", model, budget=6, sinks=2) as cache:
        assert isinstance(cache, StreamingCache) and cache.sinks == 2
        assert torch.equal(greedy(model, batch, **cache_kwargs(cache)), brute_force(causal_lm("eager"), batch, 6, 2)[0])
    with pytest.raises(ValueError, match="unknown KV-cache policy 'h2o'; available: a2sf, streaming"):
        build_kv_cache("h2o", model, budget=6)
    with pytest.raises(ValueError, match=r"has no argument\(s\) \['sinks'\]"):
        build_kv_cache("a2sf", model, budget=6, forgetting_factor=0.3, sinks=2)


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("a2sf", dict(budget=8, forgetting_factor=0.5, recent=9), r"budget=8 is below its protected entries.*>= 9"),
        ("streaming", dict(budget=4, sinks=4), r"budget=4 does not exceed its protected entries.*>= 5"),
        ("streaming", dict(budget=0), "budget must be an int >= 1"),
        ("streaming", dict(budget=8, sinks=-1), "sinks must be an int >= 0"),
    ],
)
def test_budget_below_the_protected_entries_raises(name, settings, message):
    with pytest.raises(ValueError, match=message):
        build_kv_cache(name, causal_lm("eager"), **settings)
