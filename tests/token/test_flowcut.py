"""FlowCut: the tokens kept inside the tower against a brute-force recomputation of the documented
rule (plain loops over HF's eager attention weights and value vectors, stock layers run on the
kept sequence), the LLM logits against the stock LLM fed those features; errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.models.tiny import tiny_llava
from tests.conftest import IMAGE, NUM_VISUAL, VOCAB, make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]
DEPTH = 8  # LLaVA reads the output of layer 6: FlowCut scores before layers 1..6, cuts before 2, 4 and 6
SHORT = 2  # the testbed's tower: LLaVA reads the output of layer 0, so the one cut is before layer 1, on those features


def sharpened(model):
    """Peaked tower attention (q, k scaled up), so the entropy-driven cut sizes differ per image."""
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return model


def brute_force_flowcut(model, pixel_values, keep: int, forced_prune: dict | None = None):
    """(kept patch numbers, prune counts per cut, tokens per layer, features [kept, dv]) for one image, from the
    documented rule written as loops over HF's eager CLIP attention (set_attn_implementation('eager'))."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    read = len(layers) - 2  # LLaVA reads the output of this layer (hidden_states[-2])
    last = max(read, 1)  # the last cut: before that layer; before layer 1 when it is layer 0
    prune_counts, tokens = {}, []
    with torch.no_grad():
        sequence = tower.pre_layrnorm(tower.embeddings(pixel_values))
        index = list(range(sequence.shape[1]))  # original tower index per slot ([CLS] = 0)
        flow, seen, attention, values = {}, False, None, None
        for k, layer in enumerate(layers):
            n = len(index) - 1
            if 1 <= k <= last and n > keep:
                heads = attention.shape[1]
                relation = {j: sum(float(attention[0, h, 0, j]) for h in range(heads)) / heads for j in range(1, n + 1)}
                semantic = {j: 0.0 for j in range(1, n + 1)}
                for h in range(heads):
                    logits = [float(values[0, h, 0] @ values[0, h, j]) for j in range(n + 1)]
                    top = max(logits)
                    total = sum(math.exp(x - top) for x in logits)
                    for j in range(1, n + 1):
                        semantic[j] += math.exp(logits[j] - top) / total / heads
                relation_sum, semantic_sum = sum(relation.values()), sum(semantic.values())
                for j in range(1, n + 1):
                    density = sum(abs(float(values[0, :, j, d].double().mean())) for d in range(values.shape[-1]))
                    score = (relation[j] / relation_sum + semantic[j] / semantic_sum) * density
                    flow[index[j]] = score if not seen else 0.5 * flow[index[j]] + 0.5 * score
                seen = True
                remaining = last - k
                if remaining % 2 == 0:
                    if remaining:
                        p = [relation[j] / relation_sum for j in range(1, n + 1)]
                        ratio = -sum(x * math.log(x) for x in p if x > 0) / math.log(n)
                        prune = round((n - keep) / math.sqrt(remaining) * (1 - ratio**2))
                    else:
                        prune = n
                    if forced_prune is not None:
                        prune = forced_prune[k]
                    prune_counts[k] = prune
                    count = max(n - prune, keep)
                    ranked = sorted(range(1, n + 1), key=lambda j: (-flow[index[j]], j))[:count]
                    chosen = [0] + sorted(ranked)
                    sequence, index = sequence[:, chosen], [index[j] for j in chosen]
            if k == read + 1:  # what the projector receives: the output of `read`, less a cut right after it
                features = sequence[0, 1:]
            tokens.append(len(index))
            normed = layer.layer_norm1(sequence)
            _, attention = layer.self_attn(normed)  # eager: post-softmax weights [1, H, T, T]
            values = layer.self_attn.v_proj(normed).unflatten(-1, (layer.self_attn.num_heads, -1)).transpose(1, 2)
            sequence = layer(sequence, None)
    return [i - 1 for i in index[1:]], prune_counts, tokens, features


def run_reference(model, batch, keep, share_count=False):
    model.set_attn_implementation("eager")
    samples = [single(batch, b) for b in range(3)]
    results = [brute_force_flowcut(model, s["pixel_values"], keep) for s in samples]
    if share_count:  # the released code: the batch's largest cut size for every image
        forced = {k: max(r[1][k] for r in results) for k in results[0][1]}
        results = [brute_force_flowcut(model, s["pixel_values"], keep, forced) for s in samples]
    lm, projector = model.model.language_model, model.model.multi_modal_projector
    logits = []
    for sample, (*_, features) in zip(samples, results):
        with torch.no_grad():
            text = model.get_input_embeddings()(sample["input_ids"][0])
            image = (sample["input_ids"][0] == IMAGE).nonzero()[:, 0]
            embeds = torch.cat([text[: image[0]], projector(features), text[image[-1] + 1 :]])[None]
            logits.append(model.lm_head(lm(inputs_embeds=embeds).last_hidden_state)[0, -1])
    return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results], logits


@pytest.mark.parametrize("share_count,depth", [(False, DEPTH), (True, DEPTH), (False, SHORT)])
def test_flowcut_matches_brute_force_and_stock_llm(share_count, depth):
    model = sharpened(tiny_llava(grid=4, vocab_size=VOCAB, vision_layers=depth))
    batch = make_batch(RAGGED, seed=3)
    keep = 3
    kept, prune_counts, tokens, expected_logits = run_reference(model, batch, keep, share_count)
    if depth == SHORT:  # one cut, before layer 1: straight to the target
        assert [counts for counts in prune_counts] == [{1: NUM_VISUAL}] * 3
        assert tokens == [[NUM_VISUAL + 1, keep + 1]] * 3
    elif not share_count:  # the per-image cut sizes differ: the tower ran a ragged batch
        assert len({counts[2] for counts in prune_counts}) > 1, prune_counts
    batches = [[0, 1, 2]] if share_count else [[0, 1, 2], [1]]  # batch 1 shares with itself only
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            for rows in batches:
                sub = batch if len(rows) == 3 else single(batch, rows[0])
                model.set_attn_implementation(attn)
                atp.apply(model, atp.build_pruner("flowcut", keep_tokens=keep, share_count=share_count), mode=mode)
                with torch.no_grad():
                    logits = model(**sub).logits[:, -1]
                stats = atp.stats(model)
                atp.remove(model)
                assert stats.scoring_seconds > 0  # the in-tower cuts count as the pruner's time
                for row, b in enumerate(rows):
                    assert stats.kept[0][row].tolist() == kept[b], (attn, mode, b)
                    assert stats.visual_tokens[row].tolist() == [keep] * 4
                    assert stats.vision_tokens[row].tolist() == tokens[b]
                    assert_close(logits[row], expected_logits[b], rtol=1e-4, atol=1e-5)


def test_flowcut_budgets_and_errors(model_factory):
    from atp.budget import budget_kwargs

    assert budget_kwargs("flowcut", 64, 576, 32) == {"keep_tokens": 64}
    model = model_factory(vision_layers=DEPTH)
    batch = make_batch(RAGGED[:1], seed=3)
    atp.apply(model, atp.build_pruner("flowcut", keep_tokens=NUM_VISUAL + 1))
    with pytest.raises(ValueError, match="keep_tokens=17 is more than the 16"), torch.no_grad():
        model(**batch)
    atp.remove(model)
    with pytest.raises(ValueError, match="last_layer"):
        atp.build_pruner("flowcut", last_layer=0)


def test_flowcut_config_builds_the_pruner():
    from pathlib import Path

    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "conf/pruner/flowcut.yaml"))
    pruner = atp.build_pruner(spec.pop("name"), **spec)
    assert pruner.name == "flowcut" and pruner.prunes_in_tower()
