"""TransPrune keeps exactly the tokens a brute-force recomputation keeps: HF's own decoder layers run
by hand, block by block, on each sample's kept tokens (compact positions, as the reference), with the
transitions and the instruction-guided attention written as plain loops from the documented rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import atp
from atp.token.transprune import transition
from tests.conftest import IMAGE, make_batch, single
from tests.token.fixed_keep import FixedKeep

RAGGED = [(2, 3), (6, 1), (1, 7)]
SETTINGS = dict(layers=[1, 2, 3], transition_layers=[0, 1, 2], keep_ratios=[0.75, 0.5, 0.25])


def causal(n: int) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]


def brute_force_transprune(
    model, sample, layers, transition_layers, counts, image_token=IMAGE, rotary_ids=None
) -> dict[int, list[int]]:
    """Kept image-token numbers per stage for one unpadded sample (batch 1). rotary_ids: None for
    compact positions (LLaVA's reference policy), else the model's own ids [R, 1, S] (kept per token)."""
    language = model.model.language_model

    def position_embeddings(hidden, tokens):
        ids = torch.arange(len(tokens))[None] if rotary_ids is None else rotary_ids[:, :, tokens]
        return language.rotary_emb(hidden, ids)

    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        hidden = model(**sample, output_hidden_states=True).hidden_states[0]  # the LLM input embeddings
        ids = sample["input_ids"][0].tolist()
        tokens = list(range(len(ids)))  # original positions still present, in order
        image = [p for p in tokens if ids[p] == image_token]
        transitions = {p: 0.0 for p in tokens}  # accumulated over the transition layers run so far
        kept = {}
        for index, layer in enumerate(language.layers):
            rope = position_embeddings(hidden, tokens)
            mask = causal(len(tokens))
            if index in layers:
                visual = [i for i, p in enumerate(tokens) if ids[p] == image_token]
                queries = [i for i, p in enumerate(tokens) if p > max(image)]
                _, weights = layer.self_attn(
                    layer.input_layernorm(hidden), attention_mask=mask, position_embeddings=rope
                )
                attention = [sum(float(weights[0, :, q, v].mean()) for q in queries) / len(queries) for v in visual]
                moved = [transitions[tokens[v]] for v in visual]
                score = [m / (sum(moved) + 1e-8) + a / (sum(attention) + 1e-8) for m, a in zip(moved, attention)]
                order = sorted(range(len(visual)), key=lambda i: (-score[i], i))[: counts[layers.index(index)]]
                dropped = {tokens[visual[i]] for i in range(len(visual)) if i not in order}
                rows = [i for i, p in enumerate(tokens) if p not in dropped]
                tokens, hidden = [tokens[i] for i in rows], hidden[:, rows]
                kept[index] = sorted(image.index(p) for p in tokens if ids[p] == image_token)
                rope = position_embeddings(hidden, tokens)
                mask = causal(len(tokens))
            x = layer.input_layernorm(hidden)
            attended, _ = layer.self_attn(x, attention_mask=mask, position_embeddings=rope)
            middle = hidden + attended
            y = layer.post_attention_layernorm(middle)
            out = middle + layer.mlp(y)
            assert_close(out, layer(hidden, attention_mask=mask, position_embeddings=rope))  # the layer itself
            if index in transition_layers:
                for before, after in ((x[0], attended[0]), (y[0], layer.mlp(y)[0])):
                    turn = [
                        math.exp(1 - float(F.cosine_similarity(before[i], after[i], dim=0))) for i in range(len(tokens))
                    ]
                    for i, p in enumerate(tokens):
                        transitions[p] += float(after[i].norm() / before[i].norm()) * turn[i] / sum(turn)
            hidden = out
    model.set_attn_implementation(implementation)
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
def test_transprune_matches_brute_force_under_sdpa_and_eager(model_factory, samples):
    model = model_factory(attn_implementation="eager")
    batch = make_batch(samples, seed=1)
    counts = [12, 8, 4]  # int(16 x 0.75), int(16 x 0.5), int(16 x 0.25)
    reference = [
        brute_force_transprune(model, single(batch, b), SETTINGS["layers"], SETTINGS["transition_layers"], counts)
        for b in range(len(samples))
    ]
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            _, stats = run(model, batch, atp.build_pruner("transprune", **SETTINGS), mode, attn)
            for b, expected in enumerate(reference):
                for layer in SETTINGS["layers"]:
                    assert stats.kept[layer][b].tolist() == expected[layer], (attn, mode, b, layer)


def test_keep_tokens_sets_the_last_stage_and_transitions_matter(model_factory):
    model = model_factory(attn_implementation="eager")
    batch = make_batch(RAGGED[2:], seed=1)
    _, stats = run(model, batch, atp.build_pruner("transprune", **SETTINGS, keep_tokens=3))
    assert stats.visual_tokens[0].tolist() == [16, 12, 8, 3]
    reference = brute_force_transprune(model, single(batch, 0), [1, 2, 3], [0, 1, 2], [12, 8, 3])
    assert stats.kept[3][0].tolist() == reference[3]
    # other transition layers give other choices, so the test above can fail
    other = brute_force_transprune(model, single(batch, 0), [1, 2, 3], [0], [12, 8, 3])
    assert any(other[layer] != reference[layer] for layer in (2, 3))


def test_transition_is_the_documented_formula():
    before, after = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    present = torch.tensor([[True] * 5, [False, True, True, False, True]])
    got = transition(before, after, present)
    for b in range(2):
        turn = {i: math.exp(1 - float(F.cosine_similarity(before[b, i], after[b, i], dim=0))) for i in range(5)}
        total = sum(turn[i] for i in range(5) if present[b, i])
        for i in range(5):
            expected = float(after[b, i].norm() / before[b, i].norm()) * turn[i] / total if present[b, i] else 0.0
            assert float(got[b, i]) == pytest.approx(expected, rel=1e-5)


def test_drop_equals_mask_and_generate_with_cache_equals_recomputing_every_step(model_factory, attn):
    """Drop and mask give the same logits and the same greedy generate; generate through the KV cache
    (TransPrune decides once, at the prefill; compact positions continue after the dropped tokens)
    equals generate without a cache where every step re-runs the prompt with the prefill's decisions."""
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED, seed=2)
    dropped, _ = run(model, batch, atp.build_pruner("transprune", **SETTINGS), "drop", attn)
    masked, _ = run(model, batch, atp.build_pruner("transprune", **SETTINGS), "mask", attn)
    assert_close(dropped[:, -1], masked[:, -1], rtol=1e-4, atol=1e-5)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    generated, kept = {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner("transprune", **SETTINGS), mode=mode)
        generated[mode] = model.generate(**batch, **settings, use_cache=True)
        kept[mode] = atp.stats(model).kept  # the prefill's decisions
        atp.remove(model)
    assert torch.equal(generated["drop"], generated["mask"])
    atp.apply(model, FixedKeep(kept["drop"], position_ids="compact"), mode="drop")
    from_scratch = model.generate(**batch, **settings, use_cache=False)
    atp.remove(model)
    assert torch.equal(generated["drop"], from_scratch)
    assert not torch.equal(generated["drop"], model.generate(**batch, **settings))  # pruning changed the answer


def test_default_is_the_reference_schedule_and_bad_settings_are_refused(model_factory):
    pruner = atp.build_pruner("transprune")
    assert pruner.layers == (7, 9, 12) and pruner.transition_layers == (6, 7, 8, 9, 10, 11)
    assert pruner.stage_counts(torch.tensor([576]), torch.tensor([576]), 7).tolist() == [504]
    assert pruner.stage_counts(torch.tensor([576]), torch.tensor([504]), 9).tolist() == [360]
    assert pruner.stage_counts(torch.tensor([576]), torch.tensor([360]), 12).tolist() == [72]
    with pytest.raises(ValueError, match="layers must be >= 1"):
        atp.build_pruner("transprune", layers=[0, 2, 3])
    with pytest.raises(ValueError, match="one non-increasing fraction per layer"):
        atp.build_pruner("transprune", keep_ratios=[0.5, 0.6, 0.1])
    with pytest.raises(ValueError, match="must include a layer before the first stage"):
        atp.build_pruner("transprune", transition_layers=[8, 9])
    with pytest.raises(ValueError, match="runs after the last stage"):
        atp.build_pruner("transprune", transition_layers=[6, 12])
    model = model_factory()
    atp.apply(model, atp.build_pruner("transprune", **SETTINGS, keep_tokens=9))
    with pytest.raises(ValueError, match="keep_tokens=9 is more than the 8 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED[2:]))
    atp.remove(model)
    with pytest.raises(ValueError, match="layer 7 is at or past the model's depth"):
        atp.apply(model, atp.build_pruner("transprune"))


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_transprune_on_qwen2_5_vl_keeps_original_mrope_ids(mode):
    """On M-RoPE the reference policy keeps each token's original ids; ragged batch of 3, SDPA."""
    from tests.qwen_inputs import IMAGE as QWEN_IMAGE
    from tests.qwen_inputs import qwen_batch, qwen_model

    specs = [(2, [(8, 8)], 3), (1, [(4, 6), (4, 4)], 5), (3, [(8, 6)], 2)]
    model = qwen_model("qwen2_5_vl", "eager")
    batch = qwen_batch(specs)
    settings = dict(SETTINGS, keep_ratios=[0.75, 0.5, 0.4])
    language = model.model.language_model
    given = []
    handle = language.register_forward_pre_hook(lambda m, a, k: given.append(k["position_ids"]), with_kwargs=True)
    references = []
    for b in range(len(specs)):
        one = qwen_batch(specs[b : b + 1], seeds=[b])
        given.clear()
        with torch.no_grad():
            model(**one)
        ids = given[0][-3:]  # [3, 1, S] M-RoPE ids
        count = int((one["input_ids"] == QWEN_IMAGE).sum())
        counts = [int(count * r) for r in settings["keep_ratios"]]
        references.append(brute_force_transprune(model, one, [1, 2, 3], [0, 1, 2], counts, QWEN_IMAGE, ids))
    handle.remove()
    _, stats = run(model, batch, atp.build_pruner("transprune", **settings), mode, "sdpa")
    for b, expected in enumerate(references):
        for layer in (1, 2, 3):
            assert stats.kept[layer][b].tolist() == expected[layer], (b, layer)


def test_budget_schedule_scales_the_reference_to_the_depth(model_factory):
    from atp.budget import budget_kwargs

    assert budget_kwargs("transprune", 128, 576, 32) == {
        "layers": [7, 9, 12],
        "transition_layers": [6, 7, 8, 9, 10, 11],
        "keep_ratios": [0.875, 0.625, 0.125],
        "keep_tokens": 128,
    }
    assert budget_kwargs("transprune", 64, 576, 8)["layers"] == [2, 3, 4]  # 1.75, 2.25, 3 -> distinct
    model = model_factory()  # 4 layers: stages [1, 2, 3], the last one keeping the budget
    kwargs = budget_kwargs("transprune", 2, 16, 4)
    assert kwargs["layers"] == [1, 2, 3] and kwargs["transition_layers"] == [0, 1, 2]
    _, stats = run(model, make_batch(RAGGED[2:]), atp.build_pruner("transprune", **kwargs))
    assert stats.visual_tokens[0].tolist() == [16, 14, 10, 2]
    with pytest.raises(ValueError, match="more than that"):
        budget_kwargs("transprune", 400, 576, 32)
