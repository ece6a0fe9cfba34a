"""A2SF KV-cache eviction against stock HF generate and a brute-force decode.

The brute force recomputes every step from scratch: a full eager forward of prompt + generated
tokens in which each row attends to exactly the entries the rule had kept when that row was the
newest query (per layer and key/value head, through a per-layer mask), reads HF's eager attentions
(`output_attentions`), and updates scores and kept sets with plain Python loops over the rule as
docs/methods.md states it.
"""

from __future__ import annotations

import pytest
import torch

from atp.models.causal import tiny_causal_lm
from atp.models.hf_compat import cache_kwargs
from atp.runtime.a2sf import A2SFCache
from tests.conftest import IMAGE, make_batch, single, text_batch

STEPS = 8


def causal_lm(attn: str):
    torch.manual_seed(0)
    return tiny_causal_lm(attn_implementation=attn, num_layers=2, initializer_range=0.3).eval()  # peaked attention


def attention_modules(model):
    return sorted(
        (m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")), key=lambda m: m.layer_idx
    )


def greedy(model, inputs, **kwargs):
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def a2sf_generate(model, inputs, budget, alpha, recent):
    with A2SFCache(model, budget=budget, forgetting_factor=alpha, recent=recent, record=True) as cache:
        tokens = greedy(model, inputs, **cache_kwargs(cache))
    return tokens, cache


def brute_force(model, inputs, budget, alpha, recent, hidden=lambda layer, b: ()):
    """(tokens [B, STEPS], kept[forward][layer][b][g] sorted slot lists) by the documented rule.

    hidden(layer, b): positions no row may attend to in that layer (a token pruner's mask mode)."""
    modules = attention_modules(model)
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    group = heads // kv_heads
    ids, pad = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    batch, prompt = ids.shape
    allowed = {}  # (layer, b, g, row) -> the slots that row may attend to besides itself
    score = [[[{} for _ in range(kv_heads)] for _ in range(batch)] for _ in modules]
    kept_log, tokens = [], []
    for step in range(STEPS):
        n = ids.shape[1]
        minimum = torch.finfo(torch.float32).min
        masks = []
        for layer in range(len(modules)):
            mask = torch.full((batch, heads, n, n), minimum)
            for b in range(batch):
                for h in range(heads):
                    for i in range(n):
                        for k in range(i + 1):
                            if not pad[b, k] or k in hidden(layer, b):
                                continue
                            if i < prompt or k == i or k in allowed[layer, b, h // group, i]:
                                mask[b, h, i, k] = 0.0
            masks.append(mask)
        handles = [
            m.register_forward_pre_hook(
                lambda mod, args, kwargs, mask=mask: (args, {**kwargs, "attention_mask": mask}), with_kwargs=True
            )
            for m, mask in zip(modules, masks)
        ]
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=pad, output_attentions=True, **extra)
        finally:
            for handle in handles:
                handle.remove()
        forward_kept = []
        for layer, attn in enumerate(out.attentions):  # [B, H, n, n]
            layer_kept = []
            for b in range(batch):
                sample_kept = []
                for g in range(kv_heads):
                    s = score[layer][b][g]
                    rows = range(prompt) if step == 0 else [n - 1]
                    for k in list(s):
                        s[k] *= alpha ** len(rows)
                    for i in rows:
                        if not pad[b, i] or i in hidden(layer, b):
                            continue
                        weight = alpha ** (rows[-1] - i)
                        for k in range(i + 1):
                            received = sum(float(attn[b, g * group + r, i, k]) for r in range(group))
                            s[k] = s.get(k, 0.0) + weight * received
                    for i in rows:  # padding rows still append their (masked) entry
                        s.setdefault(i, 0.0)
                    slots = sorted(s)
                    if len(slots) > budget:
                        newest = slots[len(slots) - recent :] if recent else []
                        others = sorted(slots[: len(slots) - recent], key=lambda k: (-s[k], k))[: budget - recent]
                        keep = sorted(others + newest)
                        for k in slots:
                            if k not in keep:
                                del s[k]
                    keep = sorted(s)
                    allowed[layer, b, g, n] = set(keep)
                    sample_kept.append(keep)
                layer_kept.append(sample_kept)
            forward_kept.append(layer_kept)
        kept_log.append(forward_kept)
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        pad = torch.cat([pad, torch.ones(batch, 1, dtype=pad.dtype)], dim=1)
    return torch.stack(tokens, 1), kept_log


def cache_kept(cache):
    """kept[forward][layer][b][g] as sorted lists, from the cache's record."""
    steps = len(cache.layers[0].history)
    return [[layer.history[s].tolist() for layer in cache.layers] for s in range(steps)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_large_budget_equals_stock_generate_causal_lm(attn):
    model = causal_lm(attn)
    batch = text_batch()
    for inputs in (single_text(batch, 0), batch):
        tokens, cache = a2sf_generate(model, inputs, budget=64, alpha=0.5, recent=2)
        assert torch.equal(tokens, greedy(model, inputs))
        length = inputs["input_ids"].shape[1]
        assert [step[0] for step in cache.sizes()] == list(range(length, length + STEPS))


def single_text(batch, b):
    keep = batch["attention_mask"][b].bool()
    return dict(input_ids=batch["input_ids"][b : b + 1, keep], attention_mask=batch["attention_mask"][b : b + 1, keep])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("alpha, recent", [(0.3, 1), (1.0, 0), (0.0, 1)])
def test_small_budget_matches_brute_force_causal_lm(attn, alpha, recent):
    model = causal_lm(attn)
    reference_model = causal_lm("eager")
    batch = text_batch()
    for inputs in (single_text(batch, 0), batch):
        budget = 6
        tokens, cache = a2sf_generate(model, inputs, budget=budget, alpha=alpha, recent=recent)
        ref_tokens, ref_kept = brute_force(reference_model, inputs, budget, alpha, recent)
        assert cache_kept(cache) == ref_kept
        assert torch.equal(tokens, ref_tokens)
        assert all(size <= budget for step in cache.sizes() for size in step)
        assert not torch.equal(tokens, greedy(model, inputs)) or alpha == 0.0  # eviction changes something


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava_large_budget_equals_stock_and_small_budget_matches_brute_force(model_factory, attn):
    torch.manual_seed(0)
    model = model_factory(attn_implementation=attn).eval()
    torch.manual_seed(0)
    reference_model = model_factory(attn_implementation="eager").eval()
    batch = make_batch([(2, 3), (1, 1), (3, 0)])
    for inputs in (single(batch, 0), batch):
        tokens, _ = a2sf_generate(model, inputs, budget=256, alpha=0.7, recent=2)
        assert torch.equal(tokens, greedy(model, inputs))
        tokens, cache = a2sf_generate(model, inputs, budget=9, alpha=0.7, recent=2)
        ref_tokens, ref_kept = brute_force(reference_model, inputs, 9, 0.7, 2)
        assert cache_kept(cache) == ref_kept
        assert torch.equal(tokens, ref_tokens)


def test_hooks_are_removed_and_other_caches_untouched():
    model = causal_lm("eager")
    inputs = text_batch()
    stock = greedy(model, inputs)
    with A2SFCache(model, budget=4, forgetting_factor=0.5) as cache:
        assert torch.equal(greedy(model, inputs), stock)  # a generate without this cache is not affected
    assert torch.equal(greedy(model, inputs), stock)
    assert cache._handles == []


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(budget=0, forgetting_factor=0.5), "budget must be an int >= 1"),
        (dict(budget=2.5, forgetting_factor=0.5), "budget must be an int >= 1"),
        (dict(budget=8, forgetting_factor=1.5), r"forgetting_factor must lie in \[0, 1\]"),
        (dict(budget=8, forgetting_factor=-0.1), r"forgetting_factor must lie in \[0, 1\]"),
        (dict(budget=8, forgetting_factor=0.5, recent=9), r"recent must be an int in \[0, budget=8\]"),
    ],
)
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        A2SFCache(causal_lm("eager"), **settings)


def test_unsupported_attention_and_beam_search_raise():
    model = causal_lm("eager")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attention implementations"):
        A2SFCache(model, budget=8, forgetting_factor=0.5)
    model = causal_lm("eager")
    with A2SFCache(model, budget=8, forgetting_factor=0.5) as cache, pytest.raises(NotImplementedError, match="beam"):
        model.generate(**text_batch(), num_beams=2, max_new_tokens=2, pad_token_id=0, **cache_kwargs(cache))


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_composes_with_a_token_pruner_in_prefill(model_factory, attn, mode):
    """FastV prunes visual tokens in prefill, A2SF evicts during decode: with a budget above every
    layer's length the tokens equal the pruner alone; with a small one every layer stays within it."""
    import atp

    torch.manual_seed(0)
    model = model_factory(attn_implementation=attn).eval()
    batch = make_batch([(2, 3), (6, 1), (1, 7)])
    atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), mode=mode)
    pruned_only = greedy(model, batch)
    tokens, cache = a2sf_generate(model, batch, budget=256, alpha=0.5, recent=1)
    assert torch.equal(tokens, pruned_only)
    prompt_tokens = [int(n) for n in atp.stats(model).tokens.max(0).values]  # per layer, drop mode's layout
    if mode == "drop":
        assert cache.sizes()[0] == prompt_tokens  # each layer cached what it saw
    tokens, cache = a2sf_generate(model, batch, budget=8, alpha=0.5, recent=1)
    assert all(size == 8 for step in cache.sizes() for size in step)
    assert tokens.shape == pruned_only.shape and not torch.equal(tokens, pruned_only)
    atp.remove(model)


def test_a_cache_without_its_hooks_raises_instead_of_growing():
    model, other = causal_lm("eager"), causal_lm("eager")
    with A2SFCache(model, budget=4, forgetting_factor=0.5) as cache, pytest.raises(RuntimeError, match="not scored"):
        greedy(other, text_batch(), **cache_kwargs(cache))
    cache = A2SFCache(model, budget=4, forgetting_factor=0.5)
    cache.close()
    with pytest.raises(RuntimeError, match="hooks are not on the model"):
        greedy(model, text_batch(), **cache_kwargs(cache))


def test_prefill_scored_in_row_chunks_matches_brute_force(monkeypatch):
    import atp.runtime.a2sf as a2sf

    monkeypatch.setattr(a2sf, "SCORE_CHUNK_ELEMENTS", 200)  # a few query rows at a time
    model, batch = causal_lm("sdpa"), text_batch()
    tokens, cache = a2sf_generate(model, batch, budget=6, alpha=0.3, recent=1)
    ref_tokens, ref_kept = brute_force(causal_lm("eager"), batch, 6, 0.3, 1)
    assert cache_kept(cache) == ref_kept
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_with_a_mask_mode_pruner_matches_brute_force(model_factory, attn):
    """FastV (mask mode) hides the visual tokens it prunes from layer 2 on; A2SF then evicts by the
    same rule: the brute force hides exactly those tokens in layers >= 2 and otherwise runs as above."""
    import atp

    torch.manual_seed(0)
    model = model_factory(attn_implementation=attn).eval()
    torch.manual_seed(0)
    reference_model = model_factory(attn_implementation="eager").eval()
    batch = make_batch([(2, 3), (1, 1), (3, 0)])
    for inputs in (single(batch, 0), batch):
        atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), mode="mask")
        tokens, cache = a2sf_generate(model, inputs, budget=9, alpha=0.7, recent=2)
        kept = atp.stats(model).kept[2]
        atp.remove(model)
        pruned = []
        for b in range(inputs["input_ids"].shape[0]):
            image = (inputs["input_ids"][b] == IMAGE).nonzero()[:, 0].tolist()
            pruned.append({image[j] for j in range(len(image)) if j not in set(kept[b].tolist())})
        ref_tokens, ref_kept = brute_force(
            reference_model, inputs, 9, 0.7, 2, hidden=lambda layer, b: pruned[b] if layer >= 2 else ()
        )
        assert cache_kept(cache) == ref_kept
        assert torch.equal(tokens, ref_tokens)
