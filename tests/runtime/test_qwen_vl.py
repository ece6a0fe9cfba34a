"""The runtime on tiny Qwen2-VL and Qwen2.5-VL models: M-RoPE ids, per-image grids, ragged batches."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.selection import kept_count
from tests.qwen_inputs import FAMILIES, IMAGE, qwen_batch, qwen_model
from tests.runtime.family_checks import (
    check_generate_identical_across_modes_and_cache,
    check_none_equals_stock,
    check_ragged_equals_batch_of_one,
    greedy,
    random_pruner,
)

TWO_SIZES = [(2, [(4, 6)], 3), (4, [(6, 4)], 5)]  # two prompts, images of different sizes
RAGGED = [(2, [(4, 6), (4, 4)], 3), (3, [], 6), (1, [(6, 4)], 2)]  # two images, none, one


@pytest.mark.parametrize("family", FAMILIES)
def test_none_equals_stock_forward_and_generate(family, attn):
    model = qwen_model(family, attn)
    batch = qwen_batch(TWO_SIZES)
    assert check_none_equals_stock(model, batch) == [6, 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_none_runs_through_the_runtime_with_mrope_ids(family):
    """Guard against a parity test that passes because nothing was patched: the layers get the
    runtime's mask and the rotary embeddings of the model's own [3, B, S] M-RoPE ids."""
    model = qwen_model(family)
    batch = qwen_batch(TWO_SIZES)
    seen = []
    atp.apply(model, atp.build_pruner("none"))
    layer = atp.runtime_of(model).adapter.layers[1]
    layer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    given = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: given.append(k["position_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    assert seen[0]["attention_mask"].shape == (2, 1, 18, 18)
    rope = given[0]
    assert rope.shape == (3, 2, 18) and not torch.equal(rope[1], rope[2])  # really 3-axis ids
    cos, _ = model.model.language_model.rotary_emb(seen[0]["position_embeddings"][0], rope)
    assert torch.equal(seen[0]["position_embeddings"][0], cos)


def kept_positions(batch, stats) -> torch.Tensor:
    """[B, S] bool: real positions every layer saw (text + the visual tokens kept to the end)."""
    real = batch["attention_mask"].bool()
    keep = real & (batch["input_ids"] != IMAGE)
    for b in range(real.shape[0]):
        visual = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0]
        keep[b, visual[stats.kept[max(stats.kept)][b]]] = True
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_random_drop_equals_mask_at_every_kept_position(family, attn):
    model = qwen_model(family, attn)
    batch = qwen_batch(RAGGED)
    logits, stats = {}, {}
    with torch.no_grad():
        for mode in ("drop", "mask"):
            atp.apply(model, random_pruner(), mode=mode)
            logits[mode] = model(**batch).logits
            stats[mode] = atp.stats(model)
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    assert stats["drop"].visual_tokens.tolist() == [[10, 5, 5, 3], [0, 0, 0, 0], [6, 3, 3, 2]]
    keep = kept_positions(batch, stats["drop"])
    assert_close(logits["drop"][keep], logits["mask"][keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_greedy_generate_identical_across_modes_and_cache(family, attn):
    check_generate_identical_across_modes_and_cache(qwen_model(family, attn), qwen_batch(RAGGED))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_random_ragged_batch_equals_batch_of_one(family, mode):
    singles = [qwen_batch([spec], seeds=[b]) for b, spec in enumerate(RAGGED)]
    check_ragged_equals_batch_of_one(qwen_model(family), qwen_batch(RAGGED), singles, mode)


def brute_force_fastv(model, batch, layer: int, keep_ratio: float) -> list[torch.Tensor]:
    """FastV's rule from the stock model's eager `output_attentions`, written as loops: layer K-1's
    attention from the last prompt token to each image token, mean over heads; keep the top
    round(N * ratio), ties to the earlier token. Returns the kept image-token numbers per sample."""
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions[layer - 1]  # [B, H, S, S]
    model.set_attn_implementation(implementation)
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        visual = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0].tolist()
        row = attentions[b, :, -1].mean(0)  # the last prompt token is the last slot (left padding)
        scores = [(float(row[position]), number) for number, position in enumerate(visual)]
        chosen = sorted(scores, key=lambda item: (-item[0], item[1]))[
            : int(kept_count(torch.tensor([len(visual)]), keep_ratio)[0])
        ]
        kept.append(torch.tensor(sorted(number for _, number in chosen), dtype=torch.long))
    return kept


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("specs", [RAGGED[:1], RAGGED], ids=["batch1", "batch3"])
def test_fastv_keeps_what_eager_attentions_say(family, specs):
    model = qwen_model(family)
    batch = qwen_batch(specs)
    reference = brute_force_fastv(model, batch, layer=2, keep_ratio=0.25)
    assert sum(len(k) for k in reference) > 0
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            model.set_attn_implementation(attn)
            atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), mode=mode)
            with torch.no_grad():
                model(**batch)
            for b, expected in enumerate(reference):
                assert torch.equal(atp.stats(model).kept[2][b], expected), (attn, mode, b)
            atp.remove(model)


COMPACTING = {
    "pdrop": dict(layers=[1, 2], keep_ratios=[0.5, 0.25]),
    "divprune": dict(keep_ratio=0.3),
}


@pytest.mark.parametrize("name", sorted(COMPACTING))
def test_compacting_methods_keep_original_mrope_ids_by_default(name):
    """pdrop and divprune (compacting positions on LLaVA) run with their default position policy
    on Qwen2.5-VL, keeping each token's original M-RoPE ids [ours]: in mask mode every layer after
    pruning gets the rotary embeddings of the stock [3, B, S] ids; drop = mask at every kept position,
    and greedy generation is identical across modes."""
    model = qwen_model("qwen2_5_vl")
    batch = qwen_batch(RAGGED)
    logits, stats, generated = {}, {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner(name, **COMPACTING[name]), mode=mode)
        assert atp.runtime_of(model).position_policy == "original"
        seen, given = [], []
        last = atp.runtime_of(model).adapter.layers[-1]
        handles = [
            last.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_embeddings"][0]), with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(
                lambda m, a, k: given.append(k["position_ids"]), with_kwargs=True
            ),
        ]
        with torch.no_grad():
            logits[mode] = model(**batch).logits
        for handle in handles:
            handle.remove()
        stats[mode] = atp.stats(model)
        if mode == "mask":  # all slots present: the rotary embeddings are the stock ones of the M-RoPE ids
            stock_cos, _ = model.model.language_model.rotary_emb(seen[0], given[0])
            assert torch.equal(seen[0], stock_cos)
        generated[mode] = greedy(model, batch)
    assert stats["drop"].visual_tokens.tolist() == stats["mask"].visual_tokens.tolist()
    assert stats["drop"].visual_tokens[:, -1].sum() < 16  # really pruned: the batch has 10 + 0 + 6 image tokens
    for layer, kept in stats["drop"].kept.items():
        for b in range(len(RAGGED)):
            assert torch.equal(kept[b], stats["mask"].kept[layer][b])
    keep = kept_positions(batch, stats["drop"])
    assert_close(logits["drop"][keep], logits["mask"][keep], rtol=1e-4, atol=1e-5)
    assert torch.equal(generated["drop"], generated["mask"])
