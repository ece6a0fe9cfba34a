"""DART keeps exactly the tokens a brute-force recomputation from HF's own eager outputs keeps: pivots
by the L1 norm of layer K-1's keys (HF's KV cache: RoPE applied), duplication on the hidden states
entering layer K (HF's `output_hidden_states`) after the final norm, pivots visited in the order of
a Python set of their unpadded positions, as the reference iterates them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import atp
from tests.conftest import IMAGE, make_batch, single
from tests.qwen_inputs import IMAGE as QWEN_IMAGE
from tests.qwen_inputs import qwen_batch, qwen_model
from tests.token.fixed_keep import FixedKeep

RAGGED = [(2, 3), (6, 1), (1, 7)]  # suffixes of 3, 1 and 7 text tokens: fewer text pivots than 4 in two


def with_final_norm_weight(model):
    """The tiny models' final norm has unit weights, to which cosine similarity is blind: give it some."""
    norm = model.model.language_model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(0)) + 0.1)
    return model


def brute_force_dart(model, batch, image_token: int, layer: int, keep_tokens: int, pivots=(4, 4)) -> list:
    """Per sample, the sorted image-token numbers DART keeps, from the stock eager model."""
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    language = model.model.language_model
    entering = []  # what layer K is given (on Qwen3-VL: after the deepstack rows are added, which
    # output_hidden_states does not show); equals output_hidden_states[K] on the other families
    grab = lambda _m, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"])  # noqa: E731
    handle = language.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, use_cache=True)
    handle.remove()
    model.set_attn_implementation(implementation)
    if "qwen3" not in model.config.model_type:
        assert torch.equal(entering[0], out.hidden_states[layer])
    cache = getattr(out, "cache", None) or out.past_key_values
    keys = cache.layers[layer - 1].keys  # [B, H_kv, S, hd] as the layer cached them: RoPE applied
    normed = language.norm(entering[0]).detach()  # entering layer K, final norm
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].nonzero()[:, 0].tolist()
        visual = [p for p in real if batch["input_ids"][b, p] == image_token]
        text = [p for p in real if p > max(visual)]
        l1 = {p: float(keys[b, :, p].abs().sum()) for p in real}
        image_pivots = sorted(visual, key=lambda p: (-l1[p], p))[: pivots[0]]
        text_pivots = sorted(text, key=lambda p: (-l1[p], p))[: pivots[1]]
        per = keep_tokens // sum(pivots)
        free = [p for p in visual if p not in image_pivots]
        chosen = list(image_pivots)
        for unpadded in list(set([p - real[0] for p in image_pivots + text_pivots]).copy()):  # the reference's order
            pivot = unpadded + real[0]
            similarity = [(float(F.cosine_similarity(normed[b, pivot], normed[b, q], dim=0)), q) for q in free]
            picks = [q for _, q in sorted(similarity)[:per]]
            chosen += picks
            free = [q for q in free if q not in picks]
        kept.append(torch.tensor(sorted(visual.index(p) for p in chosen)))
    return kept


def run(model, batch, pruner, mode="drop", attn="sdpa"):
    model.set_attn_implementation(attn)
    atp.apply(model, pruner, mode=mode)
    with torch.no_grad():
        logits = model(**batch).logits
    stats = atp.stats(model)
    atp.remove(model)
    return logits, stats


@pytest.mark.parametrize("samples", [RAGGED, RAGGED[2:]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("layer,keep_tokens", [(1, 8), (2, 9)])
def test_dart_matches_brute_force_under_sdpa_and_eager(model_factory, samples, layer, keep_tokens):
    model = with_final_norm_weight(model_factory(attn_implementation="eager"))
    batch = make_batch(samples, seed=1)
    reference = brute_force_dart(model, batch, IMAGE, layer, keep_tokens)
    text = [suffix for _, suffix in samples]
    assert [len(k) for k in reference] == [4 + (4 + min(4, t)) * (keep_tokens // 8) for t in text]
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            _, stats = run(model, batch, atp.build_pruner("dart", layer=layer, keep_tokens=keep_tokens), mode, attn)
            for b, expected in enumerate(reference):
                assert torch.equal(stats.kept[layer][b], expected), (attn, mode, b)


def test_pivot_order_and_pivot_counts_matter(model_factory):
    """The reference's visiting order and its text pivots change the choice: the brute force with
    other settings keeps other tokens (so the tests above can fail)."""
    model = model_factory(attn_implementation="eager")
    batch = make_batch(RAGGED[2:], seed=1)
    base = brute_force_dart(model, batch, IMAGE, 2, 8)
    assert not torch.equal(base[0], brute_force_dart(model, batch, IMAGE, 2, 8, pivots=(4, 0))[0])
    assert not torch.equal(base[0], brute_force_dart(model, batch, IMAGE, 2, 8, pivots=(2, 2))[0])


def test_keep_ratio_uses_the_reference_arithmetic(model_factory):
    """keep_ratio: int(N * ratio / pivots) per pivot (N = 16: int(16 * 0.5 / 8) = 1)."""
    model = model_factory()
    batch = make_batch(RAGGED[2:], seed=1)
    _, by_ratio = run(model, batch, atp.build_pruner("dart", keep_tokens=None, keep_ratio=0.5))
    _, by_count = run(model, batch, atp.build_pruner("dart", keep_tokens=8))
    assert torch.equal(by_ratio.kept[2][0], by_count.kept[2][0])
    assert by_ratio.visual_tokens[0].tolist() == [16, 16, 12, 12]  # 4 pivots + 8 x 1


def test_drop_equals_mask_at_kept_positions_and_batch_equals_one_by_one(model_factory, attn):
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED, seed=2)
    dropped, stats = run(model, batch, atp.build_pruner("dart", keep_tokens=8), "drop", attn)
    masked, _ = run(model, batch, atp.build_pruner("dart", keep_tokens=8), "mask", attn)
    keep = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    for b in range(3):
        visual = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0]
        keep[b, visual[stats.kept[2][b]]] = True
    assert_close(dropped[keep], masked[keep], rtol=1e-4, atol=1e-5)
    for b in range(3):
        alone, alone_stats = run(model, single(batch, b), atp.build_pruner("dart", keep_tokens=8), "drop", attn)
        assert torch.equal(alone_stats.kept[2][0], stats.kept[2][b])
        assert_close(alone[0, -1], dropped[b, -1], rtol=1e-4, atol=1e-5)


def test_greedy_generate_with_cache_equals_recomputing_every_step(model_factory, attn):
    """Generate with the KV cache (DART prunes once, at the prefill) equals generate without a cache
    where every step re-runs the whole prompt with the prefill's decision; drop equals mask."""
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED, seed=3)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    generated, kept = {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner("dart", keep_tokens=8), mode=mode)
        generated[mode] = model.generate(**batch, **settings, use_cache=True)
        kept[mode] = atp.stats(model).kept[2]  # the prefill's decision
    atp.apply(model, FixedKeep({2: kept["drop"]}), mode="drop")
    from_scratch = model.generate(**batch, **settings, use_cache=False)
    atp.remove(model)
    assert torch.equal(generated["drop"], generated["mask"])
    assert torch.equal(generated["drop"], from_scratch)
    assert not torch.equal(generated["drop"], model.generate(**batch, **settings))  # pruning changed the answer


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_dart_on_qwen_vl_matches_brute_force(family):
    """M-RoPE keys (and Qwen3-VL's k norm) from HF's cache; original M-RoPE ids kept; ragged batch."""
    specs = [(2, [(8, 8)], 3), (1, [(4, 6), (4, 4)], 5), (3, [(6, 6)], 2)]
    for attn in ("sdpa", "eager"):
        model = with_final_norm_weight(qwen_model(family, "eager"))
        batch = qwen_batch(specs)
        reference = brute_force_dart(model, batch, QWEN_IMAGE, 2, 4, pivots=(2, 2))
        for mode in ("drop", "mask"):
            pruner = atp.build_pruner("dart", keep_tokens=4, pivot_image_tokens=2, pivot_text_tokens=2)
            _, stats = run(model, batch, pruner, mode, attn)
            for b, expected in enumerate(reference):
                assert torch.equal(stats.kept[2][b], expected), (attn, mode, b)


def test_bad_settings_give_clear_errors(model_factory):
    with pytest.raises(ValueError, match="layer K must be an integer >= 1"):
        atp.build_pruner("dart", layer=0)
    with pytest.raises(ValueError, match="keep_tokens must be an integer >= the 8 pivots"):
        atp.build_pruner("dart", keep_tokens=7)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        atp.build_pruner("dart", keep_tokens=None, keep_ratio=1.5)
    with pytest.raises(ValueError, match="give a budget"):
        atp.build_pruner("dart", keep_tokens=None)
    with pytest.raises(ValueError, match="at least one pivot"):
        atp.build_pruner("dart", pivot_image_tokens=0, pivot_text_tokens=0)
    model = model_factory()
    atp.apply(model, atp.build_pruner("dart", keep_tokens=16))  # 4 + 8 x 2 = 20 > 16 visual tokens
    with pytest.raises(ValueError, match="20 tokens, more than the 16 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED[2:]))


def test_budget_arithmetic_of_the_reference():
    """The published "128" keeps 4 image pivots + 8 pivots x 16 = 132 tokens; keep_ratio follows the
    reference's Qwen2-VL arithmetic int(N x ratio / pivots); budget_tokens=T sets keep_tokens=T."""
    from atp.budget import budget_kwargs
    from atp.token.dart import DART

    assert [4 + 8 * DART(keep_tokens=t).per_pivot(576) for t in (192, 128, 64)] == [196, 132, 68]
    assert DART(keep_tokens=None, keep_ratio=1 - 0.778).per_pivot(576) == 15  # int(127.87 / 8)
    assert budget_kwargs("dart", 128, 576, 32) == {"keep_tokens": 128}
