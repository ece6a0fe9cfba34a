"""ATP's training path against independent recomputations: the soft mask is the documented
formula, a soft mask changes attention as "multiply each key's probability by its weight and
renormalise", and the threshold MLP reads the documented features in their documented places."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import atp
from atp.models import get_adapter
from atp.token.atp import QUANTILES, ATPPruner
from tests.conftest import IMAGE, NUM_VISUAL, make_batch

RAGGED = [(2, 3), (6, 1), (1, 7)]
TAU = 7.0  # not the default (10), so a pruner that ignores or rescales its tau is caught
LAYERS = (1, 3)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mid_range_pruner(**kwargs) -> ATPPruner:
    """A training-mode ATP pruner (modules before layers 1 and 3 of 4, tau TAU) whose thresholds
    sit inside the score ranges, so that the soft masks are fractional."""
    torch.manual_seed(0)
    pruner = ATPPruner(num_layers=4, layers=list(LAYERS), tau=TAU, **kwargs).train()
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.weight.normal_(std=0.05)  # thresholds differ per instance
            module.redundancy_head.bias.fill_(0.0)  # theta_r about 0.5
            module.spatial_head.bias.fill_(0.3)  # theta_s about 0.57: between the SAP levels 0.5 and 1.0
    return pruner


def record_modules(pruner: ATPPruner) -> list[dict]:
    """Wrap this instance's `prune` and `scores`: one dict per module call with the layer, the
    context's weight and visual slots, the hidden states, the scores and the returned mask."""
    calls = []
    prune, scores = pruner.prune, pruner.scores

    def recorded_scores(ctx):
        result = scores(ctx)
        calls[-1]["scores"] = [s.detach().clone() for s in result]
        return result

    def recorded_prune(ctx):
        calls.append(
            {
                "layer": ctx.layer,
                "weight": ctx.weight.detach().clone(),
                "visual": ctx.visual.clone(),
                "hidden": ctx.hidden.detach().clone(),
            }
        )
        decision = prune(ctx)
        calls[-1]["mask"] = decision.detach().clone()
        return decision

    pruner.scores, pruner.prune = recorded_scores, recorded_prune
    return calls


def documented_mask(scores, theta_r: float, theta_s: float, visual, b: int) -> list[float]:
    """m_j = max(sigmoid(tau (S_r - theta_r)), sigmoid(tau (S_s - theta_s))) on visual slots, 1
    elsewhere, with S_r = (S_self + S_cross) / 2, as plain floats (module docstring)."""
    s_self, s_cross, s_spatial = scores
    mask = []
    for j in range(visual.shape[1]):
        if not visual[b, j]:
            mask.append(1.0)
            continue
        s_r = (float(s_self[b, j]) + float(s_cross[b, j])) / 2
        mask.append(max(sigmoid(TAU * (s_r - theta_r)), sigmoid(TAU * (float(s_spatial[b, j]) - theta_s))))
    return mask


def test_soft_mask_is_the_documented_formula_and_composes_as_a_product(model_factory):
    model = model_factory()
    model.requires_grad_(False)
    pruner = mid_range_pruner()
    calls = record_modules(pruner)
    atp.apply(model, pruner, mode="mask")
    model(**make_batch(RAGGED, seed=2))
    assert [call["layer"] for call in calls] == list(LAYERS)
    expected = {}
    for call in calls:
        layer, visual = call["layer"], call["visual"]
        assert visual.sum(1).tolist() == [NUM_VISUAL] * len(RAGGED)  # soft masks remove no slot
        rows = []
        for b in range(len(RAGGED)):
            theta_r, theta_s = pruner.thresholds[layer][b].tolist()
            rows.append(documented_mask(call["scores"], theta_r, theta_s, visual, b))
        expected[layer] = torch.tensor(rows)
        assert_close(call["mask"], expected[layer], rtol=0, atol=1e-6)
        fractional = (expected[layer] > 0.02) & (expected[layer] < 0.98)
        assert fractional.sum(1).min() >= 3, layer  # the test exercises the sigmoids, not 0/1
    visual = calls[0]["visual"]
    # composition: the second module sees the first one's weights, and the counts are products
    assert_close(calls[1]["weight"], torch.where(visual, expected[1], 1.0), rtol=0, atol=1e-6)
    product = expected[1] * expected[3]
    for b in range(len(RAGGED)):
        first = sum(float(expected[1][b, j]) for j in range(visual.shape[1]) if visual[b, j])
        both = sum(float(product[b, j]) for j in range(visual.shape[1]) if visual[b, j])
        assert pruner.soft_counts[1][b].item() == pytest.approx(first, abs=1e-4)
        assert pruner.soft_counts[3][b].item() == pytest.approx(both, abs=1e-4)
        soft = atp.stats(model).soft_visual_tokens[b].tolist()
        assert soft == pytest.approx([NUM_VISUAL, first, first, both], abs=1e-4)


class FixedWeights(atp.TokenPruner):
    """Soft keep weights `weights` [B, S] on the visual slots before `layer` (mask mode only)."""

    name = "fixed_weights"

    def __init__(self, layer: int, weights: torch.Tensor) -> None:
        super().__init__([layer])
        self.weights = weights

    def prune(self, ctx: atp.PruneContext) -> torch.Tensor:
        return torch.where(ctx.visual, self.weights.to(ctx.hidden.device), 1.0)


def reweighted_layer(model, layer: int, hidden: torch.Tensor, valid: torch.Tensor, key_weight: torch.Tensor):
    """Decoder layer `layer` of a Llama LLM written out eagerly, its attention probabilities of
    every key multiplied by `key_weight` [B, S] and renormalised over the keys.

    hidden: [B, S, d] the layer's input; valid: [B, S] real tokens; positions 0..S-1 (the
    runtime's positions for a batch without position ids). Returns [B, S, d].
    """
    adapter = get_adapter(model)
    block = adapter.layers[layer]
    attn = block.self_attn
    batch, length, _ = hidden.shape
    normed = block.input_layernorm(hidden)
    split = lambda x: x.view(batch, length, -1, attn.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q_proj(normed)), split(attn.k_proj(normed)), split(attn.v_proj(normed))
    cos, sin = adapter.rotary_emb(normed, torch.arange(length)[None].expand(batch, length))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    scores = q @ k.transpose(2, 3) * attn.scaling  # [B, H, S, S]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    weighted = probs * key_weight[:, None, None, :]
    probs = weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-30)
    out = attn.o_proj((probs @ v).transpose(1, 2).reshape(batch, length, -1))
    residual = hidden + out
    return residual + block.mlp(block.post_attention_layernorm(residual))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_soft_weights_scale_each_keys_attention_and_renormalise(model_factory, attn):
    """The key bias log m is what a soft mask means: layer 1's output in mask mode equals the
    eager layer whose attention probabilities are multiplied by the keys' weights and renormalised."""
    model = model_factory(attn_implementation=attn)
    batch = make_batch(RAGGED, seed=3)
    valid = batch["attention_mask"].bool()
    visual = (batch["input_ids"] == IMAGE) & valid
    generator = torch.Generator().manual_seed(1)
    weights = 0.05 + 0.95 * torch.rand(visual.shape, generator=generator)  # fractional, none near 0
    atp.apply(model, FixedWeights(1, weights), mode="mask")
    with torch.no_grad():
        hidden_states = model(**batch, output_hidden_states=True).hidden_states
        key_weight = torch.where(visual, weights, 1.0)
        expected = reweighted_layer(model, 1, hidden_states[1], valid, key_weight)
        unweighted = reweighted_layer(model, 1, hidden_states[1], valid, torch.ones_like(key_weight))
    got = hidden_states[2]
    assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-5)
    assert (got[valid] - unweighted[valid]).abs().amax() > 1e-3  # the weights matter (outputs are about 0.05)
    slot = torch.arange(valid.shape[1])
    after_image = valid & (slot > torch.where(visual, slot, -1).amax(1, keepdim=True))
    assert (got[after_image] - unweighted[after_image]).abs().amax() > 1e-3  # text after the image sees them


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (torch.quantile's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def statistics(values: list[float]) -> list[float]:
    """mean, unbiased std, QUANTILES: the documented score statistics, as plain floats."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [mean, std, *(quantile(values, q) for q in QUANTILES)]


def brute_force_content(hidden: torch.Tensor, weight: list[float]) -> list[float]:
    """[ours] content features of one sample by loops: weighted mean and std of cos(h_j, h_bar),
    and sqrt(sum w |h_j - h_bar|^2 / sum w |h_j|^2)."""
    tokens = [(w, h.double()) for w, h in zip(weight, hidden) if w > 0]
    total = sum(w for w, _ in tokens)
    mean_token = sum(w * h for w, h in tokens) / total
    cosines = [float(h @ mean_token / (h.norm() * mean_token.norm())) for _, h in tokens]
    cos_mean = sum(w * c for (w, _), c in zip(tokens, cosines)) / total
    cos_std = math.sqrt(sum(w * (c - cos_mean) ** 2 for (w, _), c in zip(tokens, cosines)) / total)
    spread = sum(w * float((h - mean_token).pow(2).sum()) for w, h in tokens)
    energy = sum(w * float(h.pow(2).sum()) for w, h in tokens)
    return [cos_mean, cos_std, math.sqrt(spread / energy)]


def test_threshold_mlp_reads_the_documented_features(model_factory):
    """The MLP's input [B, 19] is rebuilt from HF eager attentions of the same (mask-mode) forward
    by loops: S_self weighted by the earlier module's soft weights, S_cross, each rescaled to a max
    of 1; their mean, std and quantiles; the remaining fraction; l / L; the content features."""
    model = model_factory(attn_implementation="eager")
    model.requires_grad_(False)
    pruner = mid_range_pruner(content_features=True)
    calls = record_modules(pruner)
    inputs = {}
    for layer in LAYERS:  # the trunk's first call of a forward reads the instance features
        trunk = pruner.modules_by_layer[str(layer)].trunk
        trunk.register_forward_pre_hook(lambda _m, args, layer=layer: inputs.setdefault(layer, args[0].detach()))
    atp.apply(model, pruner, mode="mask")
    batch = make_batch(RAGGED, seed=2)
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    masks = {call["layer"]: call["mask"] for call in calls}
    for layer in LAYERS:
        probs = out.attentions[layer - 1].mean(1)  # [B, S, S], the layer the module reads
        got = inputs[layer]
        assert got.shape == (len(RAGGED), 19)
        for b in range(len(RAGGED)):
            ids, real = batch["input_ids"][b], batch["attention_mask"][b].bool()
            visual = [j for j in range(len(ids)) if real[j] and ids[j] == IMAGE]
            instruction = [i for i in range(len(ids)) if real[i] and i > visual[-1]]
            earlier = masks[1][b] if layer == 3 else torch.ones(len(ids))  # soft weights so far
            weight = {i: float(earlier[i]) for i in visual}
            s_self, s_cross = [], []
            for j in visual:
                later = [i for i in visual if i > j]
                total = sum(weight[i] for i in later)
                s_self.append(sum(weight[i] * float(probs[b, i, j]) for i in later) / total if later else 0.0)
                s_cross.append(sum(float(probs[b, i, j]) for i in instruction) / len(instruction))
            s_self = [s / max(s_self) for s in s_self]
            s_cross = [s / max(s_cross) for s in s_cross]
            remaining = sum(weight.values()) / NUM_VISUAL
            hidden = out.hidden_states[layer][b, visual]  # the hidden states entering the module's layer
            content = brute_force_content(hidden, [weight[i] for i in visual])
            expected = [*statistics(s_self), *statistics(s_cross), remaining, layer / 4, *content]
            assert_close(got[b], torch.tensor(expected), rtol=1e-4, atol=1e-5, msg=f"layer {layer}, sample {b}")
    assert (inputs[3][:, 14] < 0.95).all()  # the first module's soft weights are in the features
