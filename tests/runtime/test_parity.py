"""The runtime with nothing to prune is the stock HF model; atp.remove restores it."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from tests.conftest import make_batch


@pytest.mark.parametrize("text", ["llama", "mistral", "qwen2"])
def test_none_equals_stock_forward_on_padded_batch(model_factory, attn, text):
    model = model_factory(text=text, attn_implementation=attn)
    batch = make_batch([(2, 3), (5, 6)])  # left-padded batch of 2
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**batch).logits
        atp.apply(model, atp.build_pruner("none"))
        ours = model(**batch).logits
    # padding positions are garbage in both; every real position must match
    assert_close(ours[real], stock[real])
    stats = atp.stats(model)
    assert stats.visual_tokens.tolist() == [[16] * 4, [16] * 4]
    assert stats.tokens[:, 0].tolist() == real.sum(1).tolist()


def masks_seen(model, batch, layer: int = 1) -> list:
    """The attention_mask decoder layer `layer` receives in each call of one forward."""
    seen = []
    handle = (
        atp.runtime_of(model)
        .adapter.layers[layer]
        .register_forward_pre_hook(lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True)
    )
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen


@pytest.mark.parametrize("prompts", [[(2, 3)], [(2, 3), (5, 6)]])
def test_none_runs_through_the_runtime_masks(model_factory, attn, prompts):
    """Guard against a parity test that passes because nothing was patched: the runtime hands every
    layer its own explicit mask, except a plain causal prefill (batch 1, no padding) under SDPA,
    which gets no mask (SDPA's is_causal kernel, as stock HF does)."""
    model = model_factory(attn_implementation=attn)
    atp.apply(model, atp.build_pruner("none"))
    batch = make_batch(prompts)
    seen = masks_seen(model, batch)
    assert len(seen) == 1
    if attn == "sdpa" and len(prompts) == 1:
        assert seen[0] is None
    else:
        length = batch["input_ids"].shape[1]
        assert seen[0] is not None and seen[0].dtype == torch.float32 and seen[0].shape[-2:] == (length, length)


def hook_ids(model):
    return {(name, key) for name, m in model.named_modules() for key in (*m._forward_pre_hooks, *m._forward_hooks)}


def test_remove_restores_stock_model(model_factory, attn):
    model = model_factory(attn_implementation=attn)
    batch = make_batch([(2, 3), (4, 1)])
    with torch.no_grad():
        stock = model(**batch).logits
        stock_hooks = hook_ids(model)  # HF installs output-capturing hooks of its own
        atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25))
        pruned = model(**batch).logits
        atp.remove(model)
        restored = model(**batch).logits
    assert not torch.allclose(pruned[:, -1], stock[:, -1])  # the pruner really acted
    assert torch.equal(restored, stock)
    assert not hasattr(model, "_atp_runtime")
    assert hook_ids(model) == stock_hooks
    with pytest.raises(ValueError, match="atp.apply"):
        atp.stats(model)


def test_apply_twice_replaces_the_pruner(model_factory):
    model = model_factory()
    batch = make_batch([(2, 3)])
    atp.apply(model, atp.build_pruner("random", layers=1, keep_ratio=0.5))
    atp.apply(model, atp.build_pruner("random", layers=2, keep_ratio=0.25))
    with torch.no_grad():
        model(**batch)
    assert atp.stats(model).visual_tokens.tolist() == [[16, 16, 4, 4]]
    runtime = atp.runtime_of(model)
    assert len(runtime._handles) == 3 + 4 + 1  # 3 input hooks, 4 decoder layers, final norm
