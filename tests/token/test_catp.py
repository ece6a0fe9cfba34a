"""CATP on in-context prompts with several images: kept tokens of both stages and the final logits against an
independent loop over HF's eager decoder layers (its own attention probabilities), written from the paper."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.catp import icl_parts
from tests.conftest import IMAGE, NUM_VISUAL
from tests.token.test_baselines import input_embeddings
from tests.token.test_vflowopt import multi_image_batch

K = 1  # the tiny models have 4 layers: stages before layers 0, K + 1 = 2 and K + 2 = 3
RAGGED = [(2, 2, 3), (6, 3, 1), (1, 2, 2)]  # (prefix, images, suffix)


def unpadded(batch: dict, b: int) -> dict:
    keep = batch["attention_mask"][b].bool()
    before = int(sum(int((row == IMAGE).sum()) // NUM_VISUAL for row in batch["input_ids"][:b]))
    images = int((batch["input_ids"][b] == IMAGE).sum()) // NUM_VISUAL
    return dict(
        input_ids=batch["input_ids"][b : b + 1, keep],
        attention_mask=batch["attention_mask"][b : b + 1, keep],
        pixel_values=batch["pixel_values"][before : before + images],
    )


def rescaled(a: torch.Tensor, b: torch.Tensor) -> float:
    return (float(torch.cosine_similarity(a, b, dim=0)) + 1) / 2


def greedy_by_loops(tokens: torch.Tensor, text: torch.Tensor, count: int, weight: float) -> list[int]:
    """Greedy maximisation of sum_x max_{y in Y} s(y, x) + weight sum_{y in Y} s(y, text), token by token."""
    n = len(tokens)
    chosen: list[int] = []
    for _ in range(count):
        best, best_value = None, -math.inf
        for c in range(n):
            if c in chosen:
                continue
            value = sum(max(rescaled(tokens[y], tokens[x]) for y in chosen + [c]) for x in range(n))
            value += weight * sum(rescaled(tokens[y], text) for y in chosen + [c])
            if value > best_value + 1e-9:  # strictly better: ties keep the earlier token
                best, best_value = c, value
        chosen.append(best)
    return chosen


def manual_catp(model, sample: dict, keep_ratio: float, lambda1: float, lambda2: float):
    """(kept image-token numbers after each stage, last-token logits) of one unpadded sample."""
    lm = model.model.language_model
    embeds, _ = input_embeddings(model, sample)
    ids = sample["input_ids"][0]
    image_positions = (ids == IMAGE).nonzero()[:, 0].tolist()
    starts = image_positions[::NUM_VISUAL]
    blocks = [image_positions[i : i + NUM_VISUAL] for i in range(0, len(image_positions), NUM_VISUAL)]
    number = {p: i for i, p in enumerate(image_positions)}
    # stage 1, per image: text paired with image i = the tokens after it, up to the next image
    kept_positions = [p for p in range(len(ids)) if p not in number]
    for i, block in enumerate(blocks):
        end = starts[i + 1] if i + 1 < len(starts) else len(ids)
        text = embeds[0, block[-1] + 1 : end].mean(0)
        count = math.floor(NUM_VISUAL * (1 - (1 - keep_ratio) / 2))
        picked = greedy_by_loops(embeds[0, block], text, count, lambda1)
        kept_positions += [block[j] for j in picked]
    kept_positions.sort()
    stages = [sorted(number[p] for p in kept_positions if p in number)]
    query_start = starts[-1]
    hidden = embeds[:, kept_positions]
    model.set_attn_implementation("eager")
    probs = {}
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            length = hidden.shape[1]
            causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            rotary = lm.rotary_emb(hidden, torch.tensor(kept_positions)[None])
            _, probs[index] = layer.self_attn(
                layer.input_layernorm(hidden), position_embeddings=rotary, attention_mask=causal
            )
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rotary)
            if index not in (K, K + 1):
                continue
            h = hidden[0]
            in_query = [s for s, p in enumerate(kept_positions) if p >= query_start]
            if index == K:  # the ICDs' image tokens, ranked together
                candidates = [s for s, p in enumerate(kept_positions) if p in number and p < query_start]
                total = sum(len(block) for block in blocks[:-1])
                focus = h[in_query].mean(0)
                a_now, a_before = probs[K][0].mean(0)[-1], probs[K - 1][0].mean(0)[-1]
                score = {
                    s: max(0.0, float(a_now[s] - a_before[s]))
                    + lambda2 * float(torch.cosine_similarity(h[s], focus, dim=0))
                    for s in candidates
                }
            else:  # the query image's tokens, by relevance to the remaining context
                candidates = [s for s, p in enumerate(kept_positions) if p in number and p >= query_start]
                total = len(blocks[-1])
                context = h[[s for s, p in enumerate(kept_positions) if starts[0] <= p < query_start]].mean(0)
                score = {s: float(torch.cosine_similarity(h[s], context, dim=0)) for s in candidates}
            count = max(1, math.floor(total * keep_ratio + 0.5))
            top = sorted(candidates, key=lambda s: (-score[s], s))[:count]
            slots = [s for s in range(len(kept_positions)) if s not in candidates or s in top]
            hidden = hidden[:, slots]
            kept_positions = [kept_positions[s] for s in slots]
            stages.append(sorted(number[p] for p in kept_positions if p in number))
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    return stages, logits


@pytest.mark.parametrize("samples", [RAGGED, RAGGED[:1]], ids=["batch3", "batch1"])
@pytest.mark.parametrize(
    "keep_ratio,lambda1,lambda2",
    [(0.5, 0.7, 0.6), (0.25, 0.7, 0.6), (0.5, 0.0, 0.0)],  # the paper's weights; attention growth alone
)
def test_catp_matches_a_loop_over_hf_eager_layers(model_factory, samples, keep_ratio, lambda1, lambda2):
    model = model_factory(attn_implementation="eager")
    batch = multi_image_batch(samples, seed=4)
    references = [manual_catp(model, unpadded(batch, b), keep_ratio, lambda1, lambda2) for b in range(len(samples))]
    for attn in ("sdpa", "eager"):
        logits = {}
        for mode in ("drop", "mask"):
            model.set_attn_implementation(attn)
            pruner = atp.build_pruner("catp", keep_ratio=keep_ratio, layer=K, lambda1=lambda1, lambda2=lambda2)
            atp.apply(model, pruner, mode=mode)
            with torch.no_grad():
                logits[mode] = model(**batch).logits[:, -1]
            stats = atp.stats(model)
            atp.remove(model)
            for b, (stages, _) in enumerate(references):
                for stage, layer in enumerate((0, K + 1, K + 2)):
                    assert stats.kept[layer][b].tolist() == stages[stage], (attn, mode, b, layer)
        assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-4)
        assert_close(logits["drop"], torch.stack([ref for _, ref in references]), rtol=1e-4, atol=1e-4)


def test_catp_budget_per_stage(model_factory):
    """Stage 1 keeps floor(S (1 - R/2)) per image; after both stage-2 steps (1 - R) of the image tokens remain."""
    model = model_factory()
    batch = multi_image_batch(RAGGED, seed=1)
    atp.apply(model, atp.build_pruner("catp", keep_ratio=0.25, layer=K))
    with torch.no_grad():
        model(**batch)
    stats = atp.stats(model)
    assert stats.num_visual.tolist() == [32, 48, 32]
    visual = stats.visual_tokens  # [B, L]: image tokens each decoder layer processes
    assert visual[:, 0].tolist() == visual[:, K].tolist() == [20, 30, 20]  # floor(16 x 0.625) = 10 per image
    assert visual[:, K + 1].tolist() == [14, 18, 14]  # ICDs: round(0.25 x 16 (images - 1)) = 4, 8, 4; query: 10
    assert visual[:, K + 2].tolist() == [8, 12, 8]  # query: round(0.25 x 16) = 4


def test_catp_refuses_what_it_cannot_prune(model_factory):
    model = model_factory()
    atp.apply(model, atp.build_pruner("catp", layer=K))
    with pytest.raises(ValueError, match=r"at least two .*images per sample: \[2, 1\]"):
        with torch.no_grad():
            model(**multi_image_batch([(2, 2, 1), (1, 1, 3)]))
    atp.remove(model)
    split = multi_image_batch([(2, 2, 1)])
    ids = split["input_ids"][0].tolist()
    first = ids.index(IMAGE)
    ids = ids[: first + 8] + [5, 6] + ids[first + 8 :]  # image 0's tokens split by text: not an ICL layout
    atp.apply(model, atp.build_pruner("catp", layer=K))
    with pytest.raises(ValueError, match="not one contiguous block"):
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), pixel_values=split["pixel_values"])
    atp.remove(model)
    with pytest.raises(ValueError, match="K must be at most 1"):
        atp.apply(model, atp.build_pruner("catp", layer=2))
    with pytest.raises(ValueError, match="layer K must be an integer >= 1"):
        atp.build_pruner("catp", layer=0)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        atp.build_pruner("catp", keep_ratio=1.5)


def test_catp_on_qwen_vl_images_of_their_own_grids():
    """Qwen2-VL (M-RoPE, original ids; each image its own grid): drop equals mask, and every stage keeps the
    counts of the rule: floor(S_i (1 - R/2)) per image, then (1 - R) of the ICDs' and of the query's tokens."""
    from tests.qwen_inputs import qwen_batch, qwen_model

    specs = [(2, [(4, 4), (4, 6)], 3), (3, [(4, 6), (4, 4), (2, 4)], 1)]
    model = qwen_model("qwen2_vl")
    batch = qwen_batch(specs)
    logits, stats = {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner("catp", keep_ratio=0.5, layer=K), mode=mode)
        with torch.no_grad():
            logits[mode] = model(**batch).logits[:, -1]
        stats[mode] = atp.stats(model)
        atp.remove(model)
    assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-4)
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    for b, (_, grids, _) in enumerate(specs):
        sizes = [h * w // 4 for h, w in grids]
        stage1 = [math.floor(s * 0.75) for s in sizes]
        icd, query = math.floor(sum(sizes[:-1]) * 0.5 + 0.5), math.floor(sizes[-1] * 0.5 + 0.5)
        assert stats["drop"].visual_tokens[b].tolist() == [
            sum(stage1),
            sum(stage1),
            icd + stage1[-1],
            icd + query,
        ], b


def test_icl_parts_lets_structural_tokens_sit_inside_an_image_block():
    """LLaVA-NeXT's newline tokens close every row inside an image's block: the block is still one run of
    tokens; text inside it is not. Expected parts written out by hand."""
    # bos, image 0 (two content tokens, a newline, one content token), text, image 1 (one token), text
    image = torch.tensor([[-1, 0, 0, -1, 0, -1, 1, -1]])
    newline = torch.tensor([[False, False, False, True, False, False, False, False]])
    parts = icl_parts(image, torch.tensor([7]), newline)
    assert parts.tolist() == [[-1, 0, 0, 0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="image 0 of sample 0 are not one contiguous block"):
        icl_parts(image, torch.tensor([7]))  # without the flag position 3 is text inside the block
