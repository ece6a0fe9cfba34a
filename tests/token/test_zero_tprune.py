"""Zero-TPrune: the tokens kept inside the tower against a brute-force recomputation of the documented
rule (plain loops over HF's eager attention weights and keys, stock layers run on the kept sequence),
the LLM logits against the stock LLM fed those features; errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.models.tiny import tiny_llava
from tests.conftest import IMAGE, VOCAB, make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]
DEPTH = 8  # LLaVA reads the output of layer 6: default cuts before layers 1, 3, 5 (7 // 4, 14 // 4, 21 // 4)
SHORT = 2  # the testbed's tower: LLaVA reads the output of layer 0; 1 // 4 = 0 etc. -> one cut, before layer 1


def wpr_loops(attention, iterations, head_filter, used_heads):
    """Per-token importance from [H, N, N] attention, as plain loops."""
    heads, n = attention.shape[0], attention.shape[1]
    scores = []
    for h in range(heads):
        s = [1.0 / n] * n
        for _ in range(iterations):
            s = [sum(float(attention[h, i, j]) * s[i] for i in range(n)) for j in range(n)]
        scores.append(s)
    chosen = list(range(heads))
    if head_filter is not None:
        variances = []
        for s in scores:
            scaled = [x * n for x in s]
            mean = sum(scaled) / n
            variances.append(sum((x - mean) ** 2 for x in scaled) / (n - 1))
        chosen = [h for h in range(heads) if head_filter[0] <= variances[h] <= head_filter[1]] or chosen
    used_heads.append(len(chosen))
    return [math.sqrt(sum(scores[h][j] ** 2 for h in chosen) / len(chosen)) for j in range(n)]


def brute_force_zero_tprune(model, pixel_values, keep, share=0.5, head_filter=None, cuts=(1, 3, 5)):
    """(kept patch numbers, tokens per tower layer, features [kept, dv], heads used per cut) for one image."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    depth, patches = len(layers), 16
    used_heads, tokens = [], []
    with torch.no_grad():
        sequence = tower.pre_layrnorm(tower.embeddings(pixel_values))
        index = list(range(sequence.shape[1]))
        attention = keys = None
        for k, layer in enumerate(layers):
            if k in cuts:
                n = len(index) - 1
                step = cuts.index(k) + 1
                goal = min(max(math.floor(patches * (keep / patches) ** (step / len(cuts)) + 0.5), keep), n)
                removed = n - goal
                similar = min(math.floor(removed * share + 0.5), goal)
                iterations = 30 if k - 1 < 3 else (1 if k - 1 >= depth - 3 else 5)
                importance = wpr_loops(attention[0].double(), iterations, head_filter, used_heads)
                by_importance = sorted(range(1, n + 1), key=lambda j: (-importance[j], j))
                survivors = by_importance[: n - (removed - similar)]
                ranked = survivors  # already in descending importance, ties to the earlier slot
                half = (len(ranked) + 1) // 2
                targets, sources = ranked[:half], ranked[half:]
                mean_keys = keys[0].double().mean(0)  # [T, hd]
                unit = [mean_keys[j] / mean_keys[j].norm() for j in range(n + 1)]
                similarity = {j: max(float(unit[j] @ unit[t]) for t in targets) for j in sources}
                dropped = sorted(sources, key=lambda j: (-similarity[j], sources.index(j)))[:similar]
                chosen = [0] + sorted(j for j in survivors if j not in dropped)
                sequence, index = sequence[:, chosen], [index[j] for j in chosen]
            if k == depth - 1:  # what the projector receives: the output of layer depth - 2, less a cut after it
                features = sequence[0, 1:]
            tokens.append(len(index))
            normed = layer.layer_norm1(sequence)
            _, attention = layer.self_attn(normed)  # eager: [1, H, T, T]
            keys = layer.self_attn.k_proj(normed).unflatten(-1, (layer.self_attn.num_heads, -1)).transpose(1, 2)
            sequence = layer(sequence, None)
    return [i - 1 for i in index[1:]], tokens, features, used_heads


@pytest.mark.parametrize(
    "options,depth", [({}, DEPTH), ({"similarity_share": 1.0, "head_filter": [0.5, 2.0]}, DEPTH), ({}, SHORT)]
)
def test_zero_tprune_matches_brute_force_and_stock_llm(options, depth):
    model = tiny_llava(grid=4, vocab_size=VOCAB, vision_layers=depth)
    cuts = (1, 3, 5) if depth == DEPTH else (1,)
    with torch.no_grad():  # peaked attention, so that heads and images differ
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    batch = make_batch(RAGGED, seed=5)
    keep = 4
    model.set_attn_implementation("eager")
    samples = [single(batch, b) for b in range(3)]
    reference = [
        brute_force_zero_tprune(
            model, s["pixel_values"], keep, options.get("similarity_share", 0.5), options.get("head_filter"), cuts
        )
        for s in samples
    ]
    if "head_filter" in options:  # the filter left some head out at some cut
        assert any(min(r[3]) < 2 for r in reference), [r[3] for r in reference]
    expected_logits = []
    for sample, (_, _, features, _) in zip(samples, reference):
        with torch.no_grad():
            text = model.get_input_embeddings()(sample["input_ids"][0])
            image = (sample["input_ids"][0] == IMAGE).nonzero()[:, 0]
            embeds = torch.cat([text[: image[0]], model.model.multi_modal_projector(features), text[image[-1] + 1 :]])
            hidden = model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state
            expected_logits.append(model.lm_head(hidden)[0, -1])
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            for rows in ([0, 1, 2], [2]):
                sub = batch if len(rows) == 3 else single(batch, rows[0])
                model.set_attn_implementation(attn)
                atp.apply(model, atp.build_pruner("zero_tprune", keep_tokens=keep, **options), mode=mode)
                with torch.no_grad():
                    logits = model(**sub).logits[:, -1]
                stats = atp.stats(model)
                atp.remove(model)
                for row, b in enumerate(rows):
                    assert stats.kept[0][row].tolist() == reference[b][0], (attn, mode, b)
                    assert stats.vision_tokens[row].tolist() == reference[b][1]
                    assert_close(logits[row], expected_logits[b], rtol=1e-4, atol=1e-5)


def test_zero_tprune_arguments_and_errors(model_factory):
    from atp.budget import budget_kwargs

    assert budget_kwargs("zero_tprune", 128, 576, 32) == {"keep_tokens": 128}
    model = model_factory(vision_layers=DEPTH)
    with pytest.raises(ValueError, match="past the tower's depth"):
        atp.apply(model, atp.build_pruner("zero_tprune", keep_tokens=4, layers=[2, DEPTH]))
    with pytest.raises(ValueError, match="cut layers must be >= 1"):
        atp.apply(model, atp.build_pruner("zero_tprune", keep_tokens=4, layers=[0, 2]))
    with pytest.raises(ValueError, match="similarity_share"):
        atp.build_pruner("zero_tprune", similarity_share=1.5)
    atp.apply(model, atp.build_pruner("zero_tprune", keep_tokens=40))
    with pytest.raises(ValueError, match="keep_tokens=40 is more than the 16"), torch.no_grad():
        model(**make_batch(RAGGED[:1]))
    atp.remove(model)


def test_zero_tprune_config_builds_the_pruner():
    from pathlib import Path

    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "conf/pruner/zero_tprune.yaml"))
    pruner = atp.build_pruner(spec.pop("name"), **spec)
    assert pruner.name == "zero_tprune" and pruner.prunes_in_tower()
