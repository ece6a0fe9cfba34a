"""FitPrune on tiny Qwen2.5-VL: a recipe fitted on a few Qwen samples (one with two images) meets its
FLOPs budget as the runtime measures it, and pruning with it deletes exactly the tokens a loop over
HF's own eager decoder layers (original M-RoPE ids) deletes, batch 1 and in a ragged batch."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.calibration.fitprune import FitPruneFitter
from atp.metrics.accounting import cost_report
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

CALIBRATION = [(2, [(8, 8)], 3), (1, [(4, 8), (4, 8)], 4), (3, [(8, 8)], 2)]  # 16 image tokens each
BUDGET = 0.7


def loop_fitprune(model, sample: dict, recipe: dict[int, int]) -> dict[int, list[int]]:
    """Kept image-token numbers after each recipe layer l, for one unpadded sample: from layer l's
    eager attention A (head-wise max), cross[j] = mean over instruction queries (after the last image
    token) of A[i, j], self[j] = sum over the visual queries present of A[i, j] / their count; the
    recipe[l] smallest cross * self leave before layer l + 1 (ties: the later token leaves)."""
    language = model.model.language_model
    given = []
    handle = language.register_forward_pre_hook(lambda m, a, k: given.append(k["position_ids"]), with_kwargs=True)
    with torch.no_grad():
        hidden = model(**sample, output_hidden_states=True).hidden_states[0]
    handle.remove()
    ids = given[0][-3:]  # [3, 1, S] M-RoPE ids
    tokens = sample["input_ids"][0]
    image = (tokens == IMAGE).nonzero()[:, 0].tolist()
    instruction = [p for p in range(len(tokens)) if p > max(image)]
    slots = list(range(len(tokens)))  # original position of each current token
    kept = {}
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for index, layer in enumerate(language.layers):
            if index > max(recipe):
                break
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            rope = language.rotary_emb(hidden, ids[:, :, slots])
            _, probs = layer.self_attn(layer.input_layernorm(hidden), attention_mask=mask, position_embeddings=rope)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope)
            if index not in recipe:
                continue
            attention = probs[0].max(0).values  # [n, n]
            visual = [i for i in range(n) if slots[i] in image]
            queries = [slots.index(p) for p in instruction]
            score = {j: float(attention[queries, j].mean() * attention[visual, j].sum() / len(visual)) for j in visual}
            leaving = sorted(visual, key=lambda j: (score[j], -j))[: recipe[index]]
            rows = [i for i in range(n) if i not in leaving]
            hidden, slots = hidden[:, rows], [slots[i] for i in rows]
            kept[index + 1] = [image.index(p) for p in slots if p in image]
    model.set_attn_implementation(implementation)
    return kept


def sharpened_model():
    """Tiny Qwen2.5-VL with q/k projections scaled up: at HF's init std the attention is nearly uniform
    and causality alone would decide (the last image tokens would always leave)."""
    model = qwen_model("qwen2_5_vl", num_layers=6)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def fitted():
    model = sharpened_model()
    batches = [qwen_batch(CALIBRATION, seeds=[10, 11, 12])]
    best, _ = FitPruneFitter(model, batches, BUDGET).fit()
    return model, batches, best


def test_a_recipe_fitted_on_qwen_samples_meets_its_budget(fitted):
    model, batches, best = fitted
    assert best.reached and best.recipe and best.flops_ratio <= BUDGET
    atp.apply(model, atp.build_pruner("fitprune", recipe=best.recipe), mode="drop")
    with torch.no_grad():
        model(**batches[0])
    report = cost_report(model.config.text_config, atp.stats(model))
    atp.remove(model)
    assert float(report.flops.sum() / report.flops_unpruned.sum()) == pytest.approx(best.flops_ratio, rel=1e-9)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_pruning_with_the_fitted_recipe_matches_a_loop_over_hf_layers(fitted, attn, mode):
    model, _, best = fitted
    seeds = [20, 21, 22]
    expected = [loop_fitprune(model, qwen_batch([spec], [seed]), best.recipe) for spec, seed in zip(CALIBRATION, seeds)]
    model.set_attn_implementation(attn)
    for rows in ([1], [0, 1, 2]):
        batch = qwen_batch([CALIBRATION[b] for b in rows], [seeds[b] for b in rows])
        atp.apply(model, atp.build_pruner("fitprune", recipe=best.recipe), mode=mode)
        with torch.no_grad():
            model(**batch)
        stats = atp.stats(model)
        atp.remove(model)
        for row, b in enumerate(rows):
            for layer, numbers in expected[b].items():
                assert stats.kept[layer][row].tolist() == numbers, (rows, b, layer)
    model.set_attn_implementation("sdpa")
    assert expected[1][max(expected[1])] != list(range(len(expected[1][max(expected[1])])))  # not causality alone


def test_a_recipe_deleting_more_than_an_image_has_is_refused(fitted):
    model, _, _ = fitted
    atp.apply(model, atp.build_pruner("fitprune", recipe={0: 7}))  # the 3 x 2 image has 6 tokens
    with pytest.raises(ValueError, match="deletes more tokens than the image has"):
        with torch.no_grad():
            model(**qwen_batch([(1, [(6, 4)], 2)]))
    atp.remove(model)
