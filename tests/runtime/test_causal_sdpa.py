"""A plain causal prefill under SDPA runs without an explicit mask (SDPA's is_causal kernel): the
logits equal the explicit-mask path (eager attention, and mask mode), before and after a drop,
and a model switched to eager after atp.apply gets its masks again."""

from __future__ import annotations

import torch
from torch.testing import assert_close

import atp
from tests.conftest import make_batch
from tests.runtime.test_parity import masks_seen

VISUAL = 16  # the tiny model's visual tokens per image


def fastv():
    return atp.build_pruner("fastv", layer=2, keep_ratio=0.25)


def test_plain_prefill_gets_no_mask_before_and_after_a_drop_and_equals_explicit_masks(model_factory):
    batch = make_batch([(3, 4)])
    with torch.no_grad():
        sdpa = model_factory(attn_implementation="sdpa")
        atp.apply(sdpa, fastv(), mode="drop")
        masks = {layer: masks_seen(sdpa, batch, layer)[0] for layer in (0, 2, 3)}
        dropped = sdpa(**batch).logits
        kept = atp.stats(sdpa).kept
        eager = model_factory(attn_implementation="eager")  # same seed: same weights
        atp.apply(eager, fastv(), mode="drop")
        eager_logits = eager(**batch).logits
        eager_kept = atp.stats(eager).kept
        atp.apply(sdpa, fastv(), mode="mask")  # mask mode: explicit masks with hidden keys
        masked = sdpa(**batch).logits
        mask_seen = masks_seen(sdpa, batch, 3)[0]
    assert all(mask is None for mask in masks.values())  # layer 0 before, layers 2-3 after the drop
    assert mask_seen is not None
    assert torch.equal(kept[2][0], eager_kept[2][0]) and len(kept[2][0]) == VISUAL // 4
    assert_close(dropped[:, -1], eager_logits[:, -1], rtol=1e-4, atol=1e-5)
    assert_close(dropped[:, -1], masked[:, -1], rtol=1e-4, atol=1e-5)


def test_model_switched_to_eager_after_apply_gets_explicit_masks(model_factory):
    batch = make_batch([(3, 4)])
    model = model_factory(attn_implementation="sdpa")
    atp.apply(model, fastv(), mode="drop")
    with torch.no_grad():
        sdpa_logits = model(**batch).logits
    model.set_attn_implementation("eager")
    seen = masks_seen(model, batch, 3)
    assert seen[0] is not None and seen[0].shape[-1] == seen[0].shape[-2]
    with torch.no_grad():
        eager_logits = model(**batch).logits
    assert_close(eager_logits[:, -1], sdpa_logits[:, -1], rtol=1e-4, atol=1e-5)
