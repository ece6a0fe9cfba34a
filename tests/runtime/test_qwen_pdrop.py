"""PyramidDrop on tiny Qwen2.5-VL (default position policy: original M-RoPE ids) keeps exactly the
tokens a brute-force recomputation from HF's own eager model keeps, stage by stage."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.token.selection import kept_count
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

SPEC = [(2, [(8, 8), (4, 6)], 3)]  # one prompt, two images: 16 + 6 = 22 image tokens
LAYERS, RATIOS = [1, 3], [0.5, 0.25]


def top_numbers(row: torch.Tensor, candidates: list[int], positions: list[int], count: int) -> list[int]:
    """The `count` candidate image-token numbers with the highest score row[position], ties to the earlier."""
    scores = sorted(((float(row[positions[n]]), n) for n in candidates), key=lambda item: (-item[0], item[1]))
    return sorted(n for _, n in scores[:count])


def brute_force_pdrop(model, batch) -> dict[int, list[int]]:
    """PDrop's rule (before layer l: layer l's attention from the last prompt token, mean over heads,
    keep the top round(N * ratio_l) of the remaining image tokens), recomputed from the stock eager
    model: stage 1 reads HF's `output_attentions` of layer l1; later stages run HF's own decoder
    layers by hand on the kept tokens, with their original M-RoPE ids and a causal mask."""
    language = model.model.language_model
    given = []
    handle = language.register_forward_pre_hook(lambda m, a, k: given.append(k["position_ids"]), with_kwargs=True)
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        handle.remove()
        ids = given[0][-3:]  # [3, 1, S] M-RoPE ids
        positions = (batch["input_ids"][0] == IMAGE).nonzero()[:, 0].tolist()
        total = len(positions)
        budget = [int(kept_count(torch.tensor([total]), ratio)[0]) for ratio in RATIOS]
        first = LAYERS[0]
        remaining = top_numbers(out.attentions[first][0, :, -1].mean(0), range(total), positions, budget[0])
        kept = {first: remaining}
        # the kept tokens entering layer `first` (every token ran through the layers before it)
        slots = list(range(batch["input_ids"].shape[1]))
        hidden = out.hidden_states[first]
        for previous, layer, count in zip(LAYERS, LAYERS[1:], budget[1:]):
            dropped = {positions[n] for n in range(total) if n not in remaining}
            rows = [i for i, slot in enumerate(slots) if slot not in dropped]
            slots, hidden = [slots[i] for i in rows], hidden[:, rows]
            rope = language.rotary_emb(hidden, ids[:, :, slots])  # the tokens' own M-RoPE ids
            mask = torch.full((len(slots), len(slots)), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            for index in range(previous, layer):
                hidden = language.layers[index](hidden, attention_mask=mask, position_embeddings=rope)
            block = language.layers[layer]
            _, weights = block.self_attn(block.input_layernorm(hidden), attention_mask=mask, position_embeddings=rope)
            row = torch.zeros(batch["input_ids"].shape[1])
            row[slots] = weights[0, :, -1].mean(0)
            remaining = top_numbers(row, remaining, positions, count)
            kept[layer] = remaining
    model.set_attn_implementation(implementation)
    return kept


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_pdrop_keeps_what_the_eager_model_says(attn, mode):
    model = qwen_model("qwen2_5_vl", attn)
    batch = qwen_batch(SPEC)
    reference = brute_force_pdrop(model, batch)
    assert [len(reference[layer]) for layer in LAYERS] == [11, 6]
    atp.apply(model, atp.build_pruner("pdrop", layers=LAYERS, keep_ratios=RATIOS), mode=mode)
    with torch.no_grad():
        model(**batch)
    kept = atp.stats(model).kept
    for layer in LAYERS:
        assert kept[layer][0].tolist() == reference[layer], layer
