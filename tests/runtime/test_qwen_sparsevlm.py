"""SparseVLM v1.5 on tiny Qwen2.5-VL (default position policy: original M-RoPE ids, [ours]): kept
tokens at every stage and the last-token logits equal a loop over HF's own eager decoder layers
written from the method's description, for a prompt with two images and in a ragged batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

RAGGED = [(2, [(8, 8), (4, 6)], 3), (3, [], 6), (1, [(6, 4)], 2)]  # 22, 0 and 6 image tokens
SCORE_LAYERS, KEEP = [0, 1], [10, 4]


def loop_dpc_knn(tokens: torch.Tensor, k: int) -> tuple[list[int], list[torch.Tensor]]:
    """(centres, merged tokens in centre order) by explicit loops over the DPC-kNN definitions."""
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
    return centres, [tokens[members[c]].sum(0) / (len(members[c]) + 1e-6) for c in centres]


def loop_sparsevlm(model, sample: dict, recycle: bool = True) -> tuple[dict[int, list[int]], torch.Tensor]:
    """(kept image-token numbers after each stage, last-token logits [V]) of one unpadded sample.

    Raters: the instruction tokens (after the last image token) whose mean softmax relevance to
    the image tokens (LLM input embeddings) exceeds the mean. After score layer l: score = layer l's
    attention from the raters, mean over heads then raters; keep the top min(k, V - 1) visual tokens;
    recycle the top int(0.3 D) + 1 deleted ones into int(m / 10) + 1 DPC-kNN clusters, each carried
    by its centre's M-RoPE ids and placed after the kept visual tokens (in the visual slots)."""
    language = model.model.language_model
    given = []
    handle = language.register_forward_pre_hook(lambda m, a, k: given.append(k["position_ids"]), with_kwargs=True)
    with torch.no_grad():
        out = model(**sample, output_hidden_states=True)
    handle.remove()
    ids0 = sample["input_ids"][0]
    length = len(ids0)
    ids = given[0][-3:] if given[0] is not None else torch.arange(length).expand(3, 1, length)  # [3, 1, S] M-RoPE
    image = (ids0 == IMAGE).nonzero()[:, 0].tolist()
    number = {p: n for n, p in enumerate(image)}  # original position -> image-token number
    hidden = out.hidden_states[0]  # [1, S, d] LLM input
    last_image = max(image, default=-1)
    instruction = [p for p in range(length) if p > last_image]
    if image:
        relevance = torch.softmax(hidden[0, image] @ hidden[0, instruction].T, dim=1).mean(0)
        raters = [instruction[i] for i in range(len(instruction)) if relevance[i] > relevance.mean()] or instruction
    else:
        raters = instruction
    slots = list(range(length))  # the original position each current token carries its ids from
    kind = ["image" if p in number else "text" for p in range(length)]  # "merged" for recycled tokens
    kept = {}
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for index, layer in enumerate(language.layers):
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            rope = language.rotary_emb(hidden, ids[:, :, slots])
            _, probs = layer.self_attn(layer.input_layernorm(hidden), attention_mask=mask, position_embeddings=rope)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope)
            if index not in SCORE_LAYERS:
                continue
            visual = [i for i in range(n) if kind[i] != "text"]
            rows = [slots.index(p) for p in raters]
            score = probs[0].mean(0)[rows].mean(0)  # heads, then raters
            count = max(0, min(KEEP[SCORE_LAYERS.index(index)], len(visual) - 1))
            top = sorted(sorted(visual, key=lambda i: (-float(score[i]), i))[:count])
            deleted = [i for i in visual if i not in top]
            merged, hosts = [], []
            if recycle and deleted:
                best = sorted(deleted, key=lambda i: (-float(score[i]), i))[: int(len(deleted) * 0.3) + 1]
                centres, merged = loop_dpc_knn(hidden[0, best], len(best) // 10 + 1)
                hosts = [best[c] for c in centres]
            visual_slots = sorted(top + hosts)  # the slots the kept and merged visual tokens occupy
            contents = top + hosts  # kept tokens in order, then the merged ones (in their hosts' ids)
            new_hidden = hidden.clone()
            new_slots, new_kind = list(slots), list(kind)
            for slot, source in zip(visual_slots, contents):
                new_slots[slot], new_kind[slot] = slots[source], "merged" if source in hosts else kind[source]
                new_hidden[0, slot] = merged[hosts.index(source)] if source in hosts else hidden[0, source]
            survivors = [i for i in range(n) if kind[i] == "text" or i in visual_slots]
            hidden = new_hidden[:, survivors]
            slots = [new_slots[i] for i in survivors]
            kind = [new_kind[i] for i in survivors]
            kept[index + 1] = sorted(number[slots[i]] for i in range(len(slots)) if kind[i] == "image")
        logits = model.lm_head(language.norm(hidden))[0, -1]
    model.set_attn_implementation(implementation)
    return kept, logits


def test_the_loop_recycles_and_prunes_the_two_image_prompt():
    model = qwen_model("qwen2_5_vl")
    kept, _ = loop_sparsevlm(model, qwen_batch(RAGGED[:1]))
    assert [len(kept[layer]) for layer in (1, 2)] == [10, 4]  # 22 -> 10 kept (+ 4 merged); 14 -> 4 (+ 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_sparsevlm_matches_a_loop_over_hf_layers(attn, mode):
    model = qwen_model("qwen2_5_vl", attn)
    expected = [loop_sparsevlm(model, qwen_batch([spec], [b])) for b, spec in enumerate(RAGGED)]
    for rows in ([0], [0, 1, 2]):
        batch = qwen_batch([RAGGED[b] for b in rows], rows)
        atp.apply(model, atp.build_pruner("sparsevlm", layers=SCORE_LAYERS, keep_tokens=KEEP), mode=mode)
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
        stats = atp.stats(model)
        atp.remove(model)
        for row, b in enumerate(rows):
            for layer, numbers in expected[b][0].items():
                assert stats.kept[layer][row].tolist() == numbers, (rows, b, layer)
            assert_close(logits[row], expected[b][1], rtol=1e-4, atol=1e-5)
        assert stats.visual_tokens[:, -1].tolist() == [[5, 0, 5][b] for b in rows]  # 4 kept + 1 merged
