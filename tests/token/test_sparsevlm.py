"""SparseVLM v1.5: kept tokens and recycled (merged) vectors against an independent loop over
HF's eager decoder layers, written from the method's description."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.sparsevlm import SCHEDULES
from tests.conftest import IMAGE, make_batch, single
from tests.token.test_baselines import input_embeddings

RAGGED = [(2, 3), (6, 4), (1, 7)]
LAYERS, KEEP = [0, 2], [7, 3]


def brute_force_dpc_knn(tokens: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Merged tokens, in centre order, by explicit loops over the DPC-kNN definitions."""
    n, width = tokens.shape
    d = [[float((tokens[i] - tokens[j]).norm()) / math.sqrt(width) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(x * x for x in sorted(row)[:k]) / k) for row in d]
    biggest = max(max(row) for row in d)
    parent = [min([d[i][j] for j in range(n) if density[j] > density[i]] or [biggest]) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -parent[i] * density[i])[:k]
    members = {c: [c] for c in centres}
    for i in range(n):
        if i not in centres:
            members[min(centres, key=lambda c: d[c][i])].append(i)
    return [tokens[members[c]].sum(0) / (len(members[c]) + 1e-6) for c in centres]


def manual_sparsevlm(model, sample, recycle: bool):
    """(kept image-token indices per stage, last-token logits) for one unpadded sample."""
    lm = model.model.language_model
    hidden, _ = input_embeddings(model, sample)
    ids = sample["input_ids"][0]
    image = (ids == IMAGE).nonzero()[:, 0]
    first, last = int(image[0]), int(image[-1])
    label = [int(i - first) if first <= i <= last else (-2 if i > last else -1) for i in range(len(ids))]
    # label: image-token number, -1 before the image, -2 instruction (after it), -3 merged
    visual_embeds, text_embeds = hidden[0, first : last + 1], hidden[0, last + 1 :]
    relevance = torch.softmax(visual_embeds @ text_embeds.T, dim=1).mean(0)
    raters = set((last + 1 + torch.nonzero(relevance > relevance.mean())[:, 0]).tolist())
    rater_label = [i for i in range(len(ids)) if i in raters]  # original positions of the raters
    original = list(range(len(ids)))  # original position per current token (-1: merged)
    kept = {}
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            length = hidden.shape[1]
            causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            rotary = lm.rotary_emb(hidden, torch.arange(length)[None])
            _, probs = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=rotary, attention_mask=causal)
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rotary)
            if index not in LAYERS:
                continue
            visual = [i for i in range(length) if label[i] >= 0 or label[i] == -3]
            rows = [original.index(p) for p in rater_label]
            score = probs[0].mean(0)[rows].mean(0)  # heads, then raters
            count = min(KEEP[LAYERS.index(index)], len(visual) - 1)
            top = sorted(sorted(visual, key=lambda i: -float(score[i]))[:count])
            deleted = [i for i in visual if i not in top]
            merged = []
            if recycle and deleted:
                best = sorted(deleted, key=lambda i: -float(score[i]))[: int(len(deleted) * 0.3) + 1]
                merged = brute_force_dpc_knn(hidden[0, best], len(best) // 10 + 1)
            before = [i for i in range(length) if label[i] == -1]
            after = [i for i in range(length) if label[i] == -2]
            parts = [hidden[0, before + top]] + ([torch.stack(merged)] if merged else []) + [hidden[0, after]]
            hidden = torch.cat(parts)[None]
            label = [label[i] for i in before + top] + [-3] * len(merged) + [label[i] for i in after]
            original = [original[i] for i in before + top] + [-1] * len(merged) + [original[i] for i in after]
            kept[index + 1] = sorted(x for x in label if x >= 0)
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    return kept, logits


@pytest.mark.parametrize("recycle", [True, False], ids=["recycle", "no_recycle"])
def test_sparsevlm_matches_a_manual_loop_over_hf_layers(model_factory, recycle):
    model = model_factory().eval()
    batch = make_batch(RAGGED, seed=11)
    expected = [manual_sparsevlm(model, single(batch, b), recycle) for b in range(3)]
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            for rows in ([0, 1, 2], [2]):
                sub = batch if len(rows) == 3 else single(batch, rows[0])
                model.set_attn_implementation(attn)
                pruner = atp.build_pruner("sparsevlm", layers=LAYERS, keep_tokens=KEEP, recycle=recycle)
                atp.apply(model, pruner, mode=mode)
                with torch.no_grad():
                    logits = model(**sub).logits[:, -1]
                stats = atp.stats(model)
                atp.remove(model)
                for row, b in enumerate(rows):
                    for layer, indices in expected[b][0].items():
                        assert stats.kept[layer][row].tolist() == indices, (attn, mode, b, layer)
                    assert_close(logits[row], expected[b][1], rtol=1e-4, atol=1e-5)


def test_sparsevlm_counts_merged_tokens_and_checks_its_schedule(model_factory):
    assert SCHEDULES == {"192": (300, 200, 110), "128": (303, 110, 36), "64": (66, 30, 17)}
    model = model_factory()
    batch = make_batch(RAGGED, seed=11)
    atp.apply(model, atp.build_pruner("sparsevlm", layers=LAYERS, keep_tokens=KEEP))
    with torch.no_grad():
        model(**batch)
    stats = atp.stats(model)
    # stage 1 keeps 7 of 16 and recycles int(9 * 0.3) + 1 = 3 deleted tokens into 1;
    # stage 2 keeps 3 of those 8 and recycles int(5 * 0.3) + 1 = 2 into 1
    assert stats.visual_tokens.tolist() == [[16, 8, 8, 4]] * 3
    assert [len(k) for k in stats.kept[1]] == [7] * 3  # merged tokens are not listed as kept
    with pytest.raises(ValueError, match="schedule must be one of"):
        atp.build_pruner("sparsevlm", schedule=96)
    with pytest.raises(ValueError, match="one positive count per layer"):
        atp.build_pruner("sparsevlm", layers=[1, 2], keep_tokens=[4])
    with pytest.raises(ValueError, match="layers must be at most 2"):
        atp.apply(model, atp.build_pruner("sparsevlm", layers=[1, 3], keep_tokens=[4, 2]))


def test_dpc_knn_merge_matches_the_definition_with_several_clusters():
    from atp.token.sparsevlm import dpc_knn_merge

    tokens = torch.randn(25, 8, generator=torch.Generator().manual_seed(4))
    merged, centres = dpc_knn_merge(tokens, 3)
    assert_close(merged, torch.stack(brute_force_dpc_knn(tokens, 3)))
    assert len(set(centres.tolist())) == 3
