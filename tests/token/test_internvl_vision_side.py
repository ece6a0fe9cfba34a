"""[CLS]-scored methods on tiny InternVL: every visual token is scored by its own tile's [CLS] attention
summed over the 2x2 tower patches it holds, against brute force from the tower's eager `output_attentions`."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.selection import kept_count
from atp.token.visionzip import split_budget
from tests.internvl_inputs import IMAGE, SIDE, internvl_batch, internvl_model, token_places

RAGGED = [(2, [3], 3), (3, [], 6), (1, [2, 1], 2)]  # 3 tiles; none; two images of 2 and 1 tiles
ONE_IMAGE_EACH = [(2, [3], 3), (1, [2], 2)]


def patches(row: int, col: int) -> list[int]:
    """Tower tokens (after the [CLS] token) of the 2x2 patches of visual token (row, col)."""
    return [1 + (2 * row + i) * SIDE + 2 * col + j for i in (0, 1) for j in (0, 1)]


def tower_outputs(model, batch):
    """The stock tower's eager outputs (attentions and hidden states) for the batch's tiles."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    model.set_attn_implementation("sdpa")
    return out


def brute_force_fastervlm(model, batch, specs, keep_ratio: float) -> list[list[int]]:
    """FasterVLM's rule as loops: vision layer -2's [CLS] row of each tile, averaged over heads, summed
    over a visual token's 4 patches; the sample keeps round(N * ratio), split over its images in
    proportion to their tokens (floors, then the largest remainders, ties to the earlier image); each
    image keeps its top tokens (all its tiles together), ties to the earlier."""
    cls = tower_outputs(model, batch).attentions[-2][:, :, 0].mean(1)  # [tiles, 1 + 64]
    kept = []
    for places in token_places(batch, specs):
        scores = [sum(float(cls[tile, p]) for p in patches(row, col)) for _, tile, row, col in places]
        total = int(kept_count(torch.tensor([len(scores)]), keep_ratio)[0])
        images = sorted({image for image, _, _, _ in places})
        members = [[i for i, place in enumerate(places) if place[0] == image] for image in images]
        shares = [total * len(m) // len(places) for m in members]
        by_remainder = sorted(range(len(members)), key=lambda g: (-(total * len(members[g]) % len(places)), g))
        for g in by_remainder[: total - sum(shares)]:
            shares[g] += 1
        chosen = []
        for group, share in zip(members, shares):
            chosen += sorted(group, key=lambda i: (-scores[i], i))[:share]
        kept.append(sorted(chosen))
    return kept


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_fastervlm_keeps_what_the_tower_attentions_say(qk_norm):
    model = internvl_model(use_qk_norm=qk_norm)
    batch = internvl_batch(RAGGED)
    reference = brute_force_fastervlm(model, batch, RAGGED, 0.25)
    assert [len(k) for k in reference] == [12, 0, 12]
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner("fastervlm", keep_ratio=0.25), mode=mode)
        with torch.no_grad():
            model(**batch)
        assert [k.tolist() for k in atp.stats(model).kept[0]] == reference, mode
        atp.remove(model)


def brute_force_visionzip(model, batch, specs, total: int):
    """(dominant token numbers, LLM input embeddings [1, S', d]) per sample, one image each, as loops.

    Dominant: [CLS] attention of vision layer -2 summed over heads and the token's 4 patches, top
    `dominant` of the image's tokens (all tiles). Contextual: the rest in input order, targets at a
    uniform stride, each other token joins its most cosine-similar target by the head-averaged key of
    layer -2 averaged over its 4 patches; merged = target + mean of the joined (the released rule), on
    the projector input (the 4 patches' last-layer features concatenated, row-major within the block).
    """
    out = tower_outputs(model, batch)
    layer = model.model.vision_tower.encoder.layer[-2]
    with torch.no_grad():
        keys = layer.attention.k_proj(layer.layernorm_before(out.hidden_states[-3]))
        keys = layer.attention.k_norm(keys).unflatten(-1, (2, -1)).mean(2)  # [tiles, 1 + 64, hd]
    cls = out.attentions[-2][:, :, 0].sum(1)  # [tiles, 1 + 64]
    features_of = out.last_hidden_state
    results = []
    for b, places in enumerate(token_places(batch, specs)):
        n = len(places)
        score = [sum(float(cls[t, p]) for p in patches(r, c)) for _, t, r, c in places]
        key = [torch.stack([keys[t, p] for p in patches(r, c)]).mean(0) for _, t, r, c in places]
        feature = [torch.cat([features_of[t, p] for p in patches(r, c)]) for _, t, r, c in places]
        dominant_count, contextual = split_budget(total)
        dominant = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:dominant_count])
        rest = [i for i in range(n) if i not in dominant]
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        groups = {t: [] for t in targets}
        for j in range(len(rest)):
            if j not in targets:
                sims = [float(torch.cosine_similarity(key[rest[j]], key[rest[t]], dim=0)) for t in targets]
                groups[targets[sims.index(max(sims))]].append(rest[j])
        merged = []
        for t in targets:
            joined = torch.stack([feature[i] for i in groups[t]]).mean(0) if groups[t] else 0
            merged.append(feature[rest[t]] + joined)
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        with torch.no_grad():
            visual = model.model.multi_modal_projector(torch.stack([feature[i] for i in dominant] + merged))
            text = model.get_input_embeddings()(ids)
        image = (ids == IMAGE).nonzero()[:, 0]
        results.append((dominant, torch.cat([text[: image[0]], visual, text[image[-1] + 1 :]])[None]))
    return results


def test_visionzip_matches_brute_force_over_all_tiles():
    model = internvl_model()
    batch = internvl_batch(ONE_IMAGE_EACH)
    total = 12  # 10 dominant + 2 contextual
    expected = brute_force_visionzip(model, batch, ONE_IMAGE_EACH, total)
    lm = model.model.language_model
    with torch.no_grad():
        stock = [model.lm_head(lm(inputs_embeds=embeds).last_hidden_state)[0, -1] for _, embeds in expected]
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner("visionzip", keep_tokens=total), mode=mode)
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
        stats = atp.stats(model)
        atp.remove(model)
        for b, (dominant, _) in enumerate(expected):
            assert stats.kept[0][b].tolist() == dominant, (mode, b)
            assert stats.visual_tokens[b].tolist() == [total] * 4
            assert_close(logits[b], stock[b], rtol=1e-4, atol=1e-5)


def test_visionzip_generate_continues_the_merged_prefix():
    """generate (KV cache, compact positions after the reorder) equals greedy decoding of the stock
    LLM on the brute-force merged input, sample by sample."""
    model = internvl_model()
    batch = internvl_batch(ONE_IMAGE_EACH)
    references = [embeds for _, embeds in brute_force_visionzip(model, batch, ONE_IMAGE_EACH, 12)]
    atp.apply(model, atp.build_pruner("visionzip", keep_tokens=12))
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, -4:]
    atp.remove(model)
    lm = model.model.language_model
    for b, embeds in enumerate(references):
        tokens = []
        with torch.no_grad():
            for _ in range(4):
                token = model.lm_head(lm(inputs_embeds=embeds).last_hidden_state)[0, -1].argmax()
                tokens.append(int(token))
                embeds = torch.cat([embeds, model.get_input_embeddings()(token)[None, None]], 1)
        assert generated[b].tolist() == tokens, b
