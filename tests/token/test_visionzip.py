"""VisionZip: kept tokens, merged vectors, token order and positions against a brute-force
recomputation from HF's own eager CLIP outputs, fed to the stock LLM."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.visionzip import split_budget
from tests.conftest import IMAGE, NUM_VISUAL, make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]


def brute_force_visionzip(model, sample, total: int, merge: str):
    """(dominant token indices, LLM input embeddings [1, S', d]) for one unpadded sample."""
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    with torch.no_grad():
        out = tower(sample["pixel_values"], output_attentions=True, output_hidden_states=True)
        cls = out.attentions[-2][0, :, 0, 1:].sum(0)  # [T]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))[0]  # [T + 1, H * hd]
        keys = keys.view(NUM_VISUAL + 1, 2, -1).mean(1)[1:]  # heads averaged, [CLS] dropped
        features = out.hidden_states[-2][0, 1:]  # what LLaVA's projector receives
    dominant_count, contextual = split_budget(total)
    dominant = sorted(torch.topk(cls, dominant_count).indices.tolist())
    rest = [i for i in range(NUM_VISUAL) if i not in dominant]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    groups = {t: [] for t in targets}
    for j in range(len(rest)):
        if j in targets:
            continue
        sims = [float(torch.cosine_similarity(keys[rest[j]], keys[rest[t]], dim=0)) for t in targets]
        groups[targets[sims.index(max(sims))]].append(rest[j])
    merged = []
    for t in targets:
        members = groups[t]
        if merge == "reference":
            joined = torch.stack([features[i] for i in members]).mean(0) if members else torch.zeros_like(features[0])
            merged.append(features[rest[t]] + joined)
        else:
            merged.append(torch.stack([features[rest[t]]] + [features[i] for i in members]).mean(0))
    with torch.no_grad():
        visual = model.model.multi_modal_projector(torch.stack([features[i] for i in dominant] + merged))
        text = model.get_input_embeddings()(sample["input_ids"][0])
    image = (sample["input_ids"][0] == IMAGE).nonzero()[:, 0]
    embeds = torch.cat([text[: image[0]], visual, text[image[-1] + 1 :]])[None]
    return dominant, embeds


@pytest.mark.parametrize("merge", ["reference", "mean"])
def test_visionzip_matches_brute_force_merge_and_order(model_factory, merge):
    model = model_factory(attn_implementation="eager").eval()
    batch = make_batch(RAGGED, seed=7)
    total = 6  # 5 dominant + 1 contextual
    expected = [brute_force_visionzip(model, single(batch, b), total, merge) for b in range(3)]
    lm = model.model.language_model
    with torch.no_grad():
        stock = [model.lm_head(lm(inputs_embeds=embeds).last_hidden_state)[0, -1] for _, embeds in expected]
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            for rows in ([0, 1, 2], [1]):  # a ragged batch of 3, and batch 1
                sub = batch if len(rows) == 3 else single(batch, rows[0])
                model.set_attn_implementation(attn)
                atp.apply(model, atp.build_pruner("visionzip", keep_tokens=total, merge=merge), mode=mode)
                with torch.no_grad():
                    logits = model(**sub).logits[:, -1]
                stats = atp.stats(model)
                atp.remove(model)
                for row, b in enumerate(rows):
                    assert stats.kept[0][row].tolist() == expected[b][0], (attn, mode, b)
                    assert stats.visual_tokens[row].tolist() == [total] * 4
                    assert_close(logits[row], stock[b], rtol=1e-4, atol=1e-5)


def test_visionzip_budget_split_and_errors(model_factory):
    assert [split_budget(t) for t in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    with pytest.raises(ValueError, match="merge must be one of"):
        atp.build_pruner("visionzip", merge="sum")
    model = model_factory()
    atp.apply(model, atp.build_pruner("visionzip", keep_tokens=64))
    with pytest.raises(ValueError, match="keep_tokens=64 is more than the 16 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED))


def test_visionzip_generate_continues_the_merged_prefix(model_factory):
    """generate (KV cache, compact positions after a reorder) equals greedy decoding of the
    stock LLM on the brute-force merged input."""
    model = model_factory(attn_implementation="eager").eval()
    batch = make_batch(RAGGED, seed=7)
    lm = model.model.language_model
    references = [brute_force_visionzip(model, single(batch, b), 6, "reference")[1] for b in range(3)]
    model.set_attn_implementation("sdpa")
    atp.apply(model, atp.build_pruner("visionzip", keep_tokens=6))
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)[:, -3:]
    atp.remove(model)
    for b, embeds in enumerate(references):
        tokens = []
        with torch.no_grad():
            for _ in range(3):
                token = model.lm_head(lm(inputs_embeds=embeds).last_hidden_state)[0, -1].argmax()
                tokens.append(int(token))
                embeds = torch.cat([embeds, model.get_input_embeddings()(token)[None, None]], 1)
        assert generated[b].tolist() == tokens, b
