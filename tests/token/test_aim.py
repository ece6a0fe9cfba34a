"""AIM: the merge before the LLM and the PageRank stages inside it against a brute force written as
plain loops over HF's own outputs: CLIP's hidden states and last-layer keys for the merge, HF's
decoder layers run by hand with a key mask (as the reference masks) and their eager attention
weights for PageRank (softmax(log w / t) = softmax(logits / t): the row constant cancels)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.aim import bipartite_merge, merged_count, pagerank
from tests.conftest import IMAGE, NUM_VISUAL, make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]
SETTINGS = dict(merge_removals=[4], start_layer=1, step=0.3)  # 16 -> 12; keep 8, 4, 1, 0 before layers 2..5
LAYERS = 6


def brute_force_merge(features, metric, removals):
    """[(feature, metric, members)] in AIM's final order, from plain loops over the documented rule."""
    tokens = [(features[i], metric[i], [i]) for i in range(len(features))]
    for r in removals:
        r = min(r, len(tokens) // 2)
        sources, targets = tokens[0::2], tokens[1::2]
        best = []
        for i, (_, key, _) in enumerate(sources):
            sims = [float(torch.cosine_similarity(key, other, dim=0)) for _, other, _ in targets]
            best.append((max(sims), sims.index(max(sims)), i))
        ranked = sorted(best, key=lambda item: (-item[0], item[2]))
        merged, kept = ranked[:r], ranked[r:]
        new_targets = []
        for j, (feature, key, members) in enumerate(targets):
            joined = [sources[i] for _, d, i in merged if d == j]
            count = 1 + len(joined)
            new_targets.append(
                (
                    (feature + sum(s[0] for s in joined)) / count,
                    (key + sum(s[1] for s in joined)) / count,
                    members + [m for s in joined for m in s[2]],
                )
            )
        tokens = [sources[i] for _, _, i in kept] + new_targets
    return tokens


def brute_force_aim(model, sample, merge_removals, start_layer, step, temperature=0.1, iterations=5):
    """(kept singletons per stage, visual tokens per stage, last-position logits) for one unpadded sample."""
    tower = model.model.vision_tower
    last = getattr(tower, "vision_model", tower).encoder.layers[-1]
    language = model.model.language_model
    with torch.no_grad():
        out = tower(sample["pixel_values"], output_hidden_states=True)
        features = out.hidden_states[-2][0, 1:]  # what LLaVA's projector receives
        metric = last.self_attn.k_proj(last.layer_norm1(out.hidden_states[-2]))[0, 1:]  # last layer's keys
        tokens = brute_force_merge(features, metric, merge_removals)
        visual = model.model.multi_modal_projector(torch.stack([f for f, _, _ in tokens]))
        text = model.get_input_embeddings()(sample["input_ids"][0])
        image = (sample["input_ids"][0] == IMAGE).nonzero()[:, 0]
        hidden = torch.cat([text[: image[0]], visual, text[image[-1] + 1 :]])[None]
        first = int(image[0])
        n = hidden.shape[1]
        groups = {first + k: members for k, (_, _, members) in enumerate(tokens)}  # slot -> original numbers
        alive = [True] * n
        kept = {0: sorted(m[0] for m in groups.values() if len(m) == 1)}
        counts = {0: len(tokens)}
        rope = language.rotary_emb(hidden, torch.arange(n)[None])  # compact after the merge, then fixed
        embeds, alive_at = hidden, []
        for index, layer in enumerate(language.layers):
            alive_at.append(list(alive))
            mask = key_mask(alive, n)
            if index >= start_layer and any(alive[s] for s in groups):
                _, weights = layer.self_attn(
                    layer.input_layernorm(hidden), attention_mask=mask, position_embeddings=rope
                )
                present = [i for i in range(n) if alive[i]]
                heads = weights.shape[1]
                scores = []
                for h in range(heads):
                    rows = {i: torch.softmax(torch.log(weights[0, h, i]) / temperature, dim=0) for i in present}
                    d = {i: 1.0 / len(present) for i in present}
                    for _ in range(iterations):
                        d = {j: sum(d[i] * float(rows[i][j]) for i in present) for j in present}
                    scores.append(d)
                importance = {j: math.sqrt(sum(s[j] ** 2 for s in scores) / heads) for j in present}
                rate = max(0.0, 1.0 - (index - start_layer + 1) * step)
                count = math.floor(len(tokens) * rate)
                candidates = [s for s in groups if alive[s]]
                chosen = sorted(candidates, key=lambda s: (-importance[s], s))[:count]
                for s in candidates:
                    alive[s] = s in chosen
                kept[index + 1] = sorted(groups[s][0] for s in chosen if len(groups[s]) == 1)
                counts[index + 1] = len(chosen)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope)
        logits = model.lm_head(language.norm(hidden))[0, -1]
    return kept, counts, logits, (embeds, alive_at)


def key_mask(alive: list[bool], n: int) -> torch.Tensor:
    """[1, 1, n, n] causal mask hiding the keys of the tokens not alive (the first len(alive) ones)."""
    mask = torch.full((n, n), torch.finfo(torch.float32).min)
    for i in range(n):
        for j in range(i + 1):
            if j >= len(alive) or alive[j]:
                mask[i, j] = 0.0
    return mask[None, None]


def brute_force_greedy(model, embeds, alive_at, steps: int) -> list[int]:
    """Greedy decoding after the prefill's decisions: every step runs HF's layers by hand on the
    prompt (pruned keys hidden per layer, as the reference's cached masks) plus the new tokens."""
    language = model.model.language_model
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            new = model.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long))[None]
            hidden = torch.cat([embeds, new], 1)
            n = hidden.shape[1]
            rope = language.rotary_emb(hidden, torch.arange(n)[None])
            for index, layer in enumerate(language.layers):
                hidden = layer(hidden, attention_mask=key_mask(alive_at[index], n), position_embeddings=rope)
            tokens.append(int(model.lm_head(language.norm(hidden))[0, -1].argmax()))
    return tokens


def peaky(model):
    """Sharper attention than the tiny models' near-uniform one, so PageRank's temperature and
    iterations change the ranking (the tests can fail if either is wrong)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


def run(model, batch, pruner, mode="drop", attn="sdpa"):
    model.set_attn_implementation(attn)
    atp.apply(model, pruner, mode=mode)
    with torch.no_grad():
        logits = model(**batch).logits
    stats = atp.stats(model)
    atp.remove(model)
    return logits, stats


@pytest.mark.parametrize("settings", [SETTINGS, dict(merge_removals=[8, 2], start_layer=2, step=0.5)])
def test_aim_matches_brute_force_merge_pagerank_and_logits(model_factory, settings):
    model = peaky(model_factory(attn_implementation="eager", num_layers=LAYERS).eval())
    batch = make_batch(RAGGED, seed=5)
    expected = [brute_force_aim(model, single(batch, b), **settings) for b in range(3)]
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            for rows in ([0, 1, 2], [1]):  # a ragged batch of 3, and batch 1
                sub = batch if len(rows) == 3 else single(batch, rows[0])
                logits, stats = run(model, sub, atp.build_pruner("aim", **settings), mode, attn)
                for row, b in enumerate(rows):
                    kept, counts, reference, _ = expected[b]
                    for layer in kept:
                        assert stats.kept[layer][row].tolist() == kept[layer], (attn, mode, b, layer)
                        assert int(stats.visual_tokens[row, layer]) == counts[layer], (attn, mode, b, layer)
                    assert_close(logits[row, -1], reference, rtol=1e-4, atol=1e-5)


def test_merge_order_and_counts():
    """Two steps: the second splits the reordered sequence (kept sources first) into even / odd."""
    generator = torch.Generator().manual_seed(0)
    features, metric = torch.randn(16, 5, generator=generator), torch.randn(16, 7, generator=generator)
    merged, groups = bipartite_merge(features, metric, [8, 2])
    reference = brute_force_merge(features, metric, [8, 2])
    assert [g for _, _, g in reference] == groups
    assert_close(merged, torch.stack([f for f, _, _ in reference]))
    assert merged_count(576, [288, 36]) == 252 and merged_count(5, [4]) == 3


def test_schedule_defaults_and_errors(model_factory):
    pruner = atp.build_pruner("aim")
    assert pruner.layers == (0, 14, 15, 16, 17, 18, 19, 20, 21)
    assert [pruner.retain_rate(layer) for layer in (12, 13, 14, 20)] == [1.0, 0.875, 0.75, 0.0]
    assert [math.floor(252 * pruner.retain_rate(layer)) for layer in range(13, 21)] == [
        220,
        189,
        157,
        126,
        94,
        63,
        31,
        0,
    ]
    with pytest.raises(ValueError, match="merge_removals are token counts"):
        atp.build_pruner("aim", merge_removals=[-1])
    with pytest.raises(ValueError, match="step in"):
        atp.build_pruner("aim", step=0)
    model = model_factory()
    with pytest.raises(ValueError, match="at or past the model's 4 decoder layers"):
        atp.apply(model, atp.build_pruner("aim"))


def test_aim_refuses_qwen_vl_clearly():
    from tests.qwen_inputs import qwen_batch, qwen_model

    model = qwen_model("qwen2_5_vl")
    atp.apply(model, atp.build_pruner("aim", merge_removals=[2], start_layer=1, step=0.5))
    try:
        with pytest.raises(ValueError, match=r"aim works on one image's fixed grid"), torch.no_grad():
            model(**qwen_batch([(2, [(8, 8)], 3)]))
    finally:
        atp.remove(model)


def test_aim_generate_equals_brute_force_greedy_decoding(model_factory):
    """generate through the KV cache (drop and mask; AIM decides at the prefill) equals greedy
    decoding by hand with the prefill's decisions, the reference's decode rule."""
    model = peaky(model_factory(attn_implementation="eager", num_layers=LAYERS).eval())
    batch = make_batch(RAGGED, seed=5)
    steps = 4
    expected = []
    for b in range(3):
        *_, (embeds, alive_at) = brute_force_aim(model, single(batch, b), **SETTINGS)
        expected.append(brute_force_greedy(model, embeds, alive_at, steps))
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    for mode in ("drop", "mask"):
        model.set_attn_implementation("sdpa")
        atp.apply(model, atp.build_pruner("aim", **SETTINGS), mode=mode)
        with torch.no_grad():
            generated = model.generate(**batch, **settings)[:, -steps:]
        atp.remove(model)
        for b in range(3):
            assert generated[b].tolist() == expected[b], (mode, b)


def test_pagerank_is_the_documented_iteration():
    """Values (not only the ranking) against plain loops, on random row-stochastic matrices: d_0
    uniform over the tokens present, d_j <- sum over present i of d_i M[i, j], five times."""
    generator = torch.Generator().manual_seed(1)
    probabilities = torch.softmax(torch.randn(2, 3, 6, 6, generator=generator) * 3, dim=-1)
    present = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    got = pagerank(probabilities, present, 5)
    for b in range(2):
        tokens = [i for i in range(6) if present[b, i]]
        per_head = []
        for h in range(3):
            d = [1.0 / len(tokens) if i in tokens else 0.0 for i in range(6)]
            for _ in range(5):
                d = [sum(d[i] * float(probabilities[b, h, i, j]) for i in tokens) for j in range(6)]
            per_head.append(d)
        for j in tokens:
            expected = math.sqrt(sum(d[j] ** 2 for d in per_head) / 3)
            assert float(got[b, j]) == pytest.approx(expected, rel=1e-5)


def test_budget_schedule(model_factory):
    from atp.budget import budget_kwargs

    assert budget_kwargs("aim", 252, 576, 32) == {"merge_removals": [288, 36], "start_layer": 13, "step": 0.125}
    assert budget_kwargs("aim", 72, 576, 32)["merge_removals"] == [288, 144, 72]
    assert budget_kwargs("aim", 128, 576, 8) == {"merge_removals": [288, 144, 16], "start_layer": 3, "step": 0.5}
    kwargs = budget_kwargs("aim", 6, NUM_VISUAL, LAYERS)  # 16 -> 8 -> 6, then start 2, step 2/3
    _, stats = run(model_factory(num_layers=LAYERS).eval(), make_batch(RAGGED[2:]), atp.build_pruner("aim", **kwargs))
    assert stats.visual_tokens[0].tolist()[:3] == [6, 6, 6]
