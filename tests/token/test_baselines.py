"""PDrop, DivPrune and spatial keep exactly what brute-force recomputations keep."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.spatial import grid_stride
from tests.conftest import IMAGE, NUM_VISUAL, make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]


def input_embeddings(model, batch):
    """HF's own LLM input: text embeddings with the projected image features scattered in."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        features = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        mask = (batch["input_ids"] == IMAGE)[..., None]
        return embeds.masked_scatter(mask, features), features.view(-1, NUM_VISUAL, features.shape[-1])


def brute_force_divprune(features: torch.Tensor, count: int) -> list[int]:
    n = len(features)
    d = [[1 - float(torch.cosine_similarity(features[i], features[j], dim=0)) for j in range(n)] for i in range(n)]
    chosen = [max(range(n), key=lambda i: min(d[i][j] for j in range(n) if j != i))]
    while len(chosen) < count:
        chosen.append(max((j for j in range(n) if j not in chosen), key=lambda j: min(d[s][j] for s in chosen)))
    return sorted(chosen)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("samples", [RAGGED, RAGGED[:1]], ids=["batch3", "batch1"])
def test_divprune_matches_brute_force(model_factory, attn, samples):
    model = model_factory(attn_implementation=attn)
    batch = make_batch(samples, seed=3)
    _, features = input_embeddings(model, batch)
    atp.apply(model, atp.build_pruner("divprune", keep_ratio=0.25), mode="drop")
    with torch.no_grad():
        model(**batch)
    kept = atp.stats(model).kept[0]
    for b in range(len(samples)):
        assert kept[b].tolist() == brute_force_divprune(features[b], 4)


def test_divprune_compact_equals_stock_model_on_the_shortened_input(model_factory):
    """Dropping before the LLM with compact positions is the stock LLM on the shorter sequence."""
    model = model_factory()
    batch = make_batch(RAGGED[:1], seed=3)
    embeds, _ = input_embeddings(model, batch)
    atp.apply(model, atp.build_pruner("divprune", keep_ratio=0.25), mode="drop")
    with torch.no_grad():
        pruned = model(**batch).logits[0, -1]
        kept = atp.stats(model).kept[0][0]
        visual = (batch["input_ids"][0] == IMAGE).nonzero()[:, 0]
        drop = set(visual.tolist()) - set(visual[kept].tolist())
        keep_positions = [i for i in range(batch["input_ids"].shape[1]) if i not in drop]
        atp.remove(model)
        short = embeds[:, keep_positions]
        stock = model.lm_head(model.model.language_model(inputs_embeds=short).last_hidden_state)[0, -1]
    assert_close(pruned, stock, rtol=1e-4, atol=1e-5)


def manual_pdrop_kept(model, batch, layers, ratios) -> dict[int, list[int]]:
    """An independent loop over HF's decoder layers (batch 1): score each stage with HF's eager
    attention module of layer l on its input, drop, renumber positions compactly."""
    lm = model.model.language_model
    hidden, _ = input_embeddings(model, batch)
    image_number = torch.cumsum(batch["input_ids"][0] == IMAGE, 0) - 1
    image_number[batch["input_ids"][0] != IMAGE] = -1
    model.set_attn_implementation("eager")
    kept = {}
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            length = hidden.shape[1]
            causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            rotary = lm.rotary_emb(hidden, torch.arange(length)[None])
            if index in layers:
                _, probs = layer.self_attn(
                    layer.input_layernorm(hidden), position_embeddings=rotary, attention_mask=causal
                )
                score = probs[0, :, -1].mean(0)
                visual = (image_number >= 0).nonzero()[:, 0]
                count = math.floor(NUM_VISUAL * ratios[layers.index(index)] + 0.5)
                top = visual[torch.topk(score[visual], count).indices]
                keep = [i for i in range(length) if image_number[i] < 0 or i in top.tolist()]
                hidden, image_number = hidden[:, keep], image_number[keep]
                kept[index] = sorted(image_number[image_number >= 0].tolist())
                length = hidden.shape[1]
                causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
                rotary = lm.rotary_emb(hidden, torch.arange(length)[None])
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rotary)
    return kept


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pdrop_matches_a_manual_loop_over_hf_layers(model_factory, attn):
    layers, ratios = [1, 3], [0.5, 0.25]
    model = model_factory()
    batch = make_batch(RAGGED)
    expected = [manual_pdrop_kept(model, single(batch, b), layers, ratios) for b in range(3)]
    model.set_attn_implementation(attn)
    for samples in ([0, 1, 2], [1]):  # batch of 3 ragged prompts, and batch 1
        sub = batch if len(samples) == 3 else single(batch, samples[0])
        atp.apply(model, atp.build_pruner("pdrop", layers=layers, keep_ratios=ratios), mode="drop")
        with torch.no_grad():
            model(**sub)
        stats = atp.stats(model)
        for row, b in enumerate(samples):
            for layer in layers:
                assert stats.kept[layer][row].tolist() == expected[b][layer], (attn, b, layer)
        assert stats.visual_tokens[0].tolist() == [16, 8, 8, 4]


def test_spatial_keeps_the_grid_that_meets_the_budget(model_factory):
    assert grid_stride(24, 24, 144) == 2 and grid_stride(24, 24, 143) == 3 and grid_stride(24, 24, 64) == 3
    model = model_factory()
    batch = make_batch(RAGGED)
    atp.apply(model, atp.build_pruner("spatial", layer=1, keep_ratio=0.25), mode="drop")
    with torch.no_grad():
        model(**batch)
    expected = [r * 4 + c for r in range(4) for c in range(4) if r % 2 == 0 and c % 2 == 0]
    assert all(k.tolist() == expected for k in atp.stats(model).kept[1])


def test_baseline_errors():
    with pytest.raises(ValueError, match="cumulative keep ratios must not increase"):
        atp.build_pruner("pdrop", layers=[1, 2], keep_ratios=[0.25, 0.5])
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        atp.build_pruner("divprune", keep_ratio=1.5)
    with pytest.raises(ValueError, match="at or past the model's depth"):
        atp.apply(atp.models.tiny.tiny_llava(num_layers=4, grid=4), atp.build_pruner("pdrop"))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("samples", [RAGGED, RAGGED[:1]], ids=["batch3", "batch1"])
def test_fastervlm_matches_hf_clip_attentions(model_factory, attn, samples):
    model = model_factory(attn_implementation="eager")
    batch = make_batch(samples, seed=5)
    with torch.no_grad():
        attentions = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    score = attentions[-2][:, :, 0, 1:].mean(1)  # [images, patches]
    expected = [torch.sort(torch.topk(score[b], 4).indices).values for b in range(len(samples))]
    model.set_attn_implementation(attn)
    atp.apply(model, atp.build_pruner("fastervlm", keep_ratio=0.25), mode="drop")
    with torch.no_grad():
        model(**batch)
    stats = atp.stats(model)
    assert [k.tolist() for k in stats.kept[0]] == [e.tolist() for e in expected]
    assert stats.visual_tokens[0].tolist() == [4, 4, 4, 4]
    with torch.no_grad():  # generate runs the vision tower before the LLM call (mm_encoder_outputs)
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [k.tolist() for k in atp.stats(model).kept[0]] == [e.tolist() for e in expected]


@pytest.mark.parametrize("name", ["fastervlm", "visionzip"])
def test_cls_methods_refuse_a_tower_without_cls(name):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
    )
    text = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=127,
        image_seq_length=16,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    with pytest.raises(ValueError, match=r"SiglipVisionModel has no \[CLS\] token"):
        atp.apply(model, atp.build_pruner(name))
