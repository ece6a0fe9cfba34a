"""LazyLLM against a brute force that recomputes every generation step from scratch with stock HF layers.

The brute force (`brute_force`) follows the rule as docs/methods.md states it, with plain Python loops
over one unpadded sample: at every step it starts from all tokens, and before each pruning layer keeps
the round(r * n) prompt tokens the query (last prompt token, then the newest token) attended most at
the layer before (mean over heads, from HF's eager attention weights). A layer computes each token once
over the whole generation: the token's hidden state entering that layer (kept from whichever earlier step
computed the layer below) runs through the stock decoder layer with exactly the tokens selected in this
step at positions <= its own. Nothing of the runtime (layouts, caches, masks, the Aux Cache) is used.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import atp
from atp.models import get_adapter
from atp.models.causal import tiny_causal_lm
from tests.conftest import make_batch, single, text_batch

STEPS = 6
LAYERS, RATIOS = [1, 3], [0.5, 0.5]


def causal_lm(attn: str):
    torch.manual_seed(0)
    return tiny_causal_lm(attn_implementation=attn, num_layers=4, initializer_range=0.3).eval()  # peaked attention


def greedy(model, inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1] :]


def llm_input(model, inputs) -> torch.Tensor:
    """[n, d] the LLM input embeddings of one unpadded sample, as the stock model builds them (images merged)."""
    adapter = get_adapter(model)
    seen = {}

    def keep(_module, _args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")

    hook = adapter.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    if seen["embeds"] is None:  # a causal LM's decoder stack embeds the ids itself
        return model.get_input_embeddings()(inputs["input_ids"])[0]
    return seen["embeds"][0]


def run_layer(block, rotary, states: list[torch.Tensor], positions: list[int]) -> tuple[torch.Tensor, list[float]]:
    """Stock decoder layer on the tokens `states` (the last one the token computed): its output row and
    its attention over all of them (eager weights, mean over heads)."""
    x = torch.stack(states)[None]
    position = torch.tensor(positions)[None]
    weights = {}

    def keep(_module, _args, out):
        weights["w"] = out[1]

    hook = block.self_attn.register_forward_hook(keep)
    out = block(x, attention_mask=None, position_ids=position, position_embeddings=rotary(x, position))
    hook.remove()
    return out[0, -1], weights["w"][0, :, -1].mean(0).tolist()


@torch.no_grad()
def brute_force(model, embeds: torch.Tensor, layers, ratios, steps: int, revival: bool = True, forced=None):
    """(generated ids, per step {layer: sorted kept prompt positions}) for one unpadded sample; with `forced`
    (a list of ids), step s > 0 feeds forced[s - 1] instead of the previous argmax (teacher forcing)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    adapter = get_adapter(twin)
    blocks, norm, rotary = adapter.layers, adapter.final_norm, adapter.rotary_emb
    n, depth = embeds.shape[0], len(blocks)
    hidden = {(0, i): embeds[i] for i in range(n)}  # (layer, position) -> hidden state entering the layer
    tokens, records = [], []
    for step in range(steps):
        query = n - 1 + step
        if step > 0:
            fed = tokens[-1] if forced is None else forced[step - 1]
            hidden[(0, query)] = twin.get_input_embeddings()(torch.tensor(fed))
        selected = list(range(query + 1))
        record, attention = {}, {}
        for layer in range(depth):
            if layer in layers:
                candidates = [i for i in selected if i < n - 1]
                if revival or step == 0:
                    count = math.floor(len(candidates) * ratios[layers.index(layer)] + 0.5)
                    count = min(len(candidates), max(count, 1)) if candidates else 0
                    kept = sorted(sorted(candidates, key=lambda i: (-attention[i], i))[:count])
                else:  # static: what this layer computed in the prefill
                    kept = [i for i in candidates if (layer + 1, i) in hidden]
                selected = [i for i in selected if i >= n - 1 or i in kept]
                record[layer] = kept
            for i in selected:
                if (layer + 1, i) in hidden:  # this layer computed token i in an earlier step
                    continue
                visible = [j for j in selected if j <= i]
                out, probs = run_layer(blocks[layer], rotary, [hidden[(layer, j)] for j in visible], visible)
                hidden[(layer + 1, i)] = out
                if i == query:
                    attention = dict(zip(visible, probs))
        tokens.append(int(twin.get_output_embeddings()(norm(hidden[(depth, query)])).argmax()))
        records.append(record)
    return tokens, records


def check_against_brute_force(model, batch, revival: bool):
    """Generate with LazyLLM (drop mode) and compare, sample by sample, the generated ids, the prefill's kept
    text tokens and (revival) every decode step's selection with the brute force. Returns (ids, revived)."""
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS, revival=revival))
    tokens = greedy(model, batch)
    revival = atp.runtime_of(model).revival
    stats = atp.stats(model)
    atp.remove(model)
    revived = 0
    for b in range(batch["input_ids"].shape[0]):
        sample = single(batch, b)
        offset = int((batch["attention_mask"][b] == 0).sum())
        expected, records = brute_force(model, llm_input(model, sample), LAYERS, RATIOS, STEPS, revival is not None)
        assert tokens[b].tolist() == expected, f"sample {b}"
        text = ~(sample["input_ids"][0] == model.config.get_text_config().vocab_size - 1)
        for layer in LAYERS:  # prefill: the text tokens kept (stats) are the brute force's
            want = [i + offset for i in records[0][layer] if text[i]]
            assert stats.kept_text[layer][b].tolist() == want, f"sample {b}, prefill, layer {layer}"
        if revival is not None:
            for step in range(1, STEPS):
                for layer in LAYERS:
                    got = revival.steps[step - 1][layer][b].nonzero()[:, 0] - offset
                    assert got.tolist() == records[step][layer], f"sample {b}, step {step}, layer {layer}"
                    revived += int(revival.revived[step - 1][layer][b])
    return tokens, revived


@pytest.mark.parametrize("lengths", [(11,), (11, 8, 5)], ids=["batch1", "ragged3"])
def test_generate_with_revival_equals_brute_force(attn, lengths):
    model = causal_lm(attn)
    _, revived = check_against_brute_force(model, text_batch(lengths), revival=True)
    assert revived > 0  # decode steps did revive pruned tokens: the check covers the Aux Cache path


@pytest.mark.parametrize("lengths", [(11,), (11, 8, 5)], ids=["batch1", "ragged3"])
def test_mistral_with_revival_equals_brute_force(lengths):
    """Mistral's sliding-window cache layers (a window longer than the sequence) hold every entry."""
    torch.manual_seed(0)
    model = tiny_causal_lm("mistral", num_layers=4, initializer_range=0.3).eval()
    _, revived = check_against_brute_force(model, text_batch(lengths), revival=True)
    assert revived > 0


def test_revival_past_a_sliding_window_is_an_error():
    torch.manual_seed(0)
    model = tiny_causal_lm("mistral", num_layers=4, sliding_window=14).eval()
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS))
    with pytest.raises(ValueError, match=r"sliding-window cache keeps 13 entries, and with the revived tokens"):
        greedy(model, text_batch((11,)))


@pytest.mark.parametrize("lengths", [(11,), (11, 8, 5)], ids=["batch1", "ragged3"])
def test_generate_without_revival_equals_static_brute_force_and_mask_mode(attn, lengths):
    model, batch = causal_lm(attn), text_batch(lengths)
    tokens, _ = check_against_brute_force(model, batch, revival=False)
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS, revival=False), mode="mask")
    assert torch.equal(greedy(model, batch), tokens)


def test_revival_changes_generation_and_keep_all_is_stock():
    model, batch = causal_lm("sdpa"), text_batch()
    stock = greedy(model, batch)
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=[1.0, 1.0]))
    assert torch.equal(greedy(model, batch), stock)
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS, revival=True))
    revived = greedy(model, batch)
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS, revival=False))
    assert not torch.equal(revived, greedy(model, batch))


def test_drop_equals_mask_at_kept_positions(attn):
    model, batch = causal_lm(attn), text_batch()
    pruner = atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS, revival=False)
    atp.apply(model, pruner, mode="drop")
    drop, kept = model(**batch).logits, atp.stats(model).kept_text[LAYERS[-1]]
    atp.apply(model, pruner, mode="mask")
    mask = model(**batch).logits
    for b, positions in enumerate(kept):
        rows = torch.cat([positions, torch.tensor([batch["input_ids"].shape[1] - 1])])
        torch.testing.assert_close(drop[b, rows], mask[b, rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lengths", [[(3, 6)], [(3, 6), (1, 4), (5, 2)]], ids=["batch1", "ragged3"])
def test_llava_text_tokens_of_an_image_prompt(model_factory, attn, lengths):
    torch.manual_seed(0)
    model = model_factory(num_layers=4, attn_implementation=attn).eval()
    batch = make_batch(lengths, seed=3)
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS))
    model(**batch)
    stats = atp.stats(model)
    assert (stats.text_tokens[:, -1] < stats.text_tokens[:, 0]).all()  # text tokens of the image prompt pruned
    assert (stats.visual_tokens[:, -1] < stats.visual_tokens[:, 0]).all()
    atp.remove(model)
    check_against_brute_force(model, batch, revival=True)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layers=[0, 2], keep_ratios=[0.5, 0.5]), r"layers must be integers >= 1 .* got \[0, 2\]"),
        (dict(layers=[1, 2], keep_ratios=[0.5]), r"one keep ratio per pruning layer; got 1 ratios for layers \[1, 2\]"),
        (dict(layers=[1], keep_ratios=[1.5]), r"keep_ratio must be in \(0, 1\]"),
        (dict(layers=[1], keep_ratios=[0.5], position_ids="compact"), r"position_ids must be 'original'"),
    ],
)
def test_settings_outside_the_rule_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        atp.build_pruner("lazyllm", **kwargs)


def test_revival_in_mask_mode_is_an_error():
    model, batch = causal_lm("sdpa"), text_batch()
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS), mode="mask")
    model(**batch)  # a forward without decode steps is fine
    with pytest.raises(ValueError, match=r"revival of pruned tokens in decode steps runs in drop mode"):
        greedy(model, batch)


def test_decode_accounting():
    model, batch = causal_lm("sdpa"), text_batch()
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS))
    greedy(model, batch)
    revival, stats = atp.runtime_of(model).revival, atp.stats(model)
    assert len(revival.computed) == STEPS - 1
    for step, computed in enumerate(revival.computed):  # the new token, plus revived tokens from layer 1 on
        assert computed[:, 0].tolist() == [1, 1, 1]
        assert torch.equal(computed[:, 1], 1 + revival.revived[step][1])
    # each layer's cache: what the prefill computed, then every row a decode step ran there (each token once)
    assert torch.equal(revival.cache_tokens(), stats.tokens + torch.stack(revival.computed).sum(0))
    assert (revival.cache_tokens() <= stats.input_tokens[:, None] + STEPS - 1).all()


def test_revival_with_an_evicting_cache_is_an_error():
    from atp.models.hf_compat import cache_kwargs
    from atp.runtime.a2sf import A2SFCache

    model, batch = causal_lm("sdpa"), text_batch()
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=RATIOS))
    with A2SFCache(model, budget=64, forgetting_factor=0.5) as cache:
        with pytest.raises(ValueError, match=r"revival .* needs transformers' default dynamic cache; .* A2SFLayer"):
            model.generate(**batch, **cache_kwargs(cache), max_new_tokens=3, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_revival_on_mrope_families_is_consistent(family):
    """M-RoPE ids of revived tokens: keep-all equals stock generate, and a ragged batch of 3 equals each
    sample alone (no brute force for these families; the Llama and LLaVA tests carry the rule)."""
    from tests.qwen_inputs import qwen_batch, qwen_model

    model = qwen_model(family).eval()
    specs = [(3, [(4, 4)], 5), (1, [(4, 8)], 2), (4, [], 3)]
    batch = qwen_batch(specs)
    layers = [2, 3]  # Qwen3-VL's tiny deepstack adds features after layers 0 and 1: revival from layer 2 on

    def greedy(inputs):  # exactly STEPS tokens, so that a sample alone and in the batch compare
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
        return out[:, inputs["input_ids"].shape[1] :]

    stock = greedy(batch)
    atp.apply(model, atp.build_pruner("lazyllm", layers=layers, keep_ratios=[1.0, 1.0]))
    assert torch.equal(greedy(batch), stock)
    atp.apply(model, atp.build_pruner("lazyllm", layers=layers, keep_ratios=[0.5, 0.5]))
    ragged = greedy(batch)
    assert sum(int(step[layer].sum()) for step in atp.runtime_of(model).revival.revived for layer in step) > 0
    for b, spec in enumerate(specs):
        assert torch.equal(greedy(qwen_batch([spec], seeds=[b]))[0], ragged[b])


def test_revival_before_deepstack_layers_is_an_error():
    from tests.qwen_inputs import qwen_batch, qwen_model

    model = qwen_model("qwen3_vl").eval()
    atp.apply(model, atp.build_pruner("lazyllm", layers=[1, 3], keep_ratios=[0.5, 0.5]))
    with pytest.raises(ValueError, match=r"adds per-visual-token features after its first 2 layers .* from layer 2 on"):
        model(**qwen_batch([(3, [(4, 4)], 5)]))
    atp.apply(model, atp.build_pruner("lazyllm", layers=[1, 3], keep_ratios=[0.5, 0.5], revival=False))
    model(**qwen_batch([(3, [(4, 4)], 5)]))


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_training_forward_never_prunes_answer_tokens(mode):
    model, batch = causal_lm("sdpa"), text_batch((11,))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 7:] = batch["input_ids"][0, 7:]  # answer: positions 7..10; the last prompt token is 6
    atp.apply(model, atp.build_pruner("lazyllm", layers=LAYERS, keep_ratios=[0.2, 0.2], revival=False), mode=mode)
    loss = model(**batch, labels=labels).loss
    stats = atp.stats(model)
    assert torch.isfinite(loss)
    assert all(int(kept.max()) < 6 for layer in LAYERS for kept in stats.kept_text[layer])  # prompt text only
    assert stats.text_tokens[0].tolist() == [11, 1 + 1 + 4, 6, 1 + 1 + 4]  # kept prompt + last prompt + answer
