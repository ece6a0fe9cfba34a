"""HoloV: kept tokens, their order and the zero padding against a brute-force recomputation, in
plain loops, of the documented rule from HF's own eager CLIP outputs and projected features; the
LLM then equals the stock LLM on exactly that sequence of visual rows."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from atp.token.holov import allocate
from tests.conftest import make_batch, single
from tests.token.vision_reference import (
    NUM_VISUAL,
    RAGGED,
    check_kept_and_logits,
    llava_without_cls,
    projected_features,
    tower_outputs,
)


def brute_force_crop_score(features: list[list[float]], attention: list[float], beta: float) -> float:
    n = len(features)
    if n <= 1:
        return sum(attention) / n
    norms = [math.sqrt(sum(x * x for x in f)) + 1e-6 for f in features]
    similarity = [
        [
            0.0 if i == j else sum(x * y for x, y in zip(features[i], features[j])) / (norms[i] * norms[j])
            for j in range(n)
        ]
        for i in range(n)
    ]
    means = [sum(row) / (n - 1) for row in similarity]
    variances = [sum((s - means[i]) ** 2 for s in similarity[i]) / (n - 1) for i in range(n)]
    scaled = [a * 1000 for a in attention]
    scaling = (sum(abs(a) for a in scaled) / n) / (sum(abs(v) for v in variances) / n + 1e-6)
    return sum(a + beta * v * scaling for a, v in zip(scaled, variances)) / n


def holov_by_loops(features: list[list[float]], attention: list[float], total: int, crops: int, beta: float):
    """(kept tokens in the order the LLM sees them, number of zero pads) for one image's tokens."""
    tokens = len(features)
    size, extra = tokens // crops, tokens % crops
    bounds, start = [], 0
    for crop in range(crops):
        length = size + (1 if crop < extra else 0)
        if length:
            bounds.append((start, start + length))
        start += length
    scores = [brute_force_crop_score(features[s:e], attention[s:e], beta) for s, e in bounds]
    weights = [score / (sum(scores) + 1e-6) for score in scores]
    counts = [math.floor(w * total) for w in weights]
    for crop in sorted(range(len(weights)), key=lambda c: -weights[c])[: total - sum(counts)]:
        counts[crop] += 1
    chosen = []
    for (s, e), count in zip(bounds, counts):
        if count >= e - s:
            chosen += list(range(s, e))
        elif count > 0:
            chosen += sorted(range(s, e), key=lambda i: -attention[i])[:count]
    return chosen, total - len(chosen)


def brute_force_holov(model, sample, total: int, crops: int, beta: float):
    """(kept tokens in the order the LLM sees them, number of zero pads) for one unpadded sample."""
    attention = tower_outputs(model, sample).attentions[-2][0, :, 0, 1:].mean(0).tolist()
    features = projected_features(model, sample).tolist()
    assert len(features) == NUM_VISUAL
    return holov_by_loops(features, attention, total, crops, beta)


@pytest.mark.parametrize(
    "total,crops,beta", [(6, 4, 0.09), (12, 4, 0.09), (15, 8, 0.09), (5, 16, 0.09), (9, 3, 0.09), (7, 4, 20.0)]
)
def test_holov_matches_brute_force(model_factory, total, crops, beta):
    model = model_factory(attn_implementation="eager")
    batch = make_batch(RAGGED, seed=17)
    expected, visual = [], []
    for b in range(3):
        sample = single(batch, b)
        chosen, pads = brute_force_holov(model, sample, total, crops, beta)
        expected.append(sorted(chosen))
        features = projected_features(model, sample)
        visual.append(torch.cat([features[chosen], features.new_zeros(pads, features.shape[1])]))
    build = lambda: atp.build_pruner("holov", keep_tokens=total, num_patches=crops, beta=beta)  # noqa: E731
    check_kept_and_logits(model, batch, build, expected, visual)


def test_holov_pads_when_a_full_crop_leaves_the_budget_short(model_factory):
    """The case of the reference's zero padding happens on this input (2-token crops, 15 of 16)."""
    model = model_factory(attn_implementation="eager")
    batch = make_batch(RAGGED, seed=17)
    pads = [brute_force_holov(model, single(batch, b), 15, 8, 0.09)[1] for b in range(3)]
    assert any(p > 0 for p in pads)


def test_holov_crop_score_is_the_scaled_mean_attention_whatever_beta():
    """As the reference computes it, the variance term is rescaled per crop to the crop's mean scaled
    attention, so a crop's score is (1 + beta) x 1000 x its mean attention (up to the 1e-6 guard)."""
    from atp.token.holov import crop_score

    generator = torch.Generator().manual_seed(0)
    features, attention = torch.randn(9, 8, generator=generator), torch.rand(9, generator=generator)
    for beta in (0.0, 0.09, 20.0):
        expected = (1 + beta) * 1000 * attention.mean()
        torch.testing.assert_close(crop_score(features, attention, beta), expected, rtol=1e-5, atol=0)


def test_holov_allocation_gives_the_remainder_to_the_largest_shares():
    assert allocate(torch.tensor([1.0, 1.0, 2.0]), 5) == [1, 1, 3]  # floors 1, 1, 2; one left for the largest
    assert allocate(torch.tensor([3.0, 1.0]), 3) == [3, 0]


def test_holov_errors(model_factory):
    with pytest.raises(ValueError, match="num_patches must be a positive integer"):
        atp.build_pruner("holov", num_patches=0)
    with pytest.raises(ValueError, match="score must be one of"):
        atp.build_pruner("holov", score="mean")
    siglip = llava_without_cls()  # the LLaVA adapter maps visual tokens to tower tokens after a [CLS] only
    for score in ("auto", "cls"):
        atp.apply(siglip, atp.build_pruner("holov", keep_tokens=4, score=score))
        with pytest.raises(ValueError, match=r"SiglipVisionModel has no \[CLS\] token"), torch.no_grad():
            siglip(**make_batch(RAGGED))
        atp.remove(siglip)
    model = model_factory()
    atp.apply(model, atp.build_pruner("holov", keep_tokens=64))
    with pytest.raises(ValueError, match="keep_tokens=64 is more than the 16 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED))


def test_holov_generate_continues_the_reordered_padded_prefix(model_factory):
    """generate (KV cache after a reorder with zero padding, compact positions) equals greedy
    decoding of the stock LLM on the brute-force sequence of visual rows."""
    from tests.conftest import IMAGE

    model = model_factory(attn_implementation="eager").eval()
    batch = make_batch(RAGGED, seed=17)
    references = []
    for b in range(3):  # HF's eager outputs first: sdpa returns no attentions
        sample = single(batch, b)
        chosen, pads = brute_force_holov(model, sample, 15, 8, 0.09)
        features = projected_features(model, sample)
        references.append((sample, torch.cat([features[chosen], features.new_zeros(pads, features.shape[1])])))
    model.set_attn_implementation("sdpa")
    atp.apply(model, atp.build_pruner("holov", keep_tokens=15, num_patches=8))
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)[:, -3:]
    atp.remove(model)
    for b, (sample, visual) in enumerate(references):
        with torch.no_grad():
            text = model.get_input_embeddings()(sample["input_ids"][0])
            image = (sample["input_ids"][0] == IMAGE).nonzero()[:, 0]
            embeds = torch.cat([text[: image[0]], visual, text[image[-1] + 1 :]])[None]
            tokens = []
            for _ in range(3):
                hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
                token = model.lm_head(hidden)[0, -1].argmax()
                tokens.append(int(token))
                embeds = torch.cat([embeds, model.get_input_embeddings()(token)[None, None]], 1)
        assert generated[b].tolist() == tokens, b
