"""Matching budgets across methods: keep ratios, schedules and FLOPs budgets for a token budget."""

from __future__ import annotations

import torch


def single_cut_keep_ratio(average_tokens: float, num_visual: int, num_layers: int, layer: int) -> float:
    """Keep ratio r of a one-cut pruner (FastV, random) before `layer` such that the average
    visual tokens per decoder layer, (layer * N + (L - layer) * r * N) / L, equals `average_tokens`.
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}.")
    ratio = (num_layers * average_tokens / num_visual - layer) / (num_layers - layer)
    if not 0 < ratio <= 1:
        floor = layer * num_visual / num_layers
        raise ValueError(
            f"an average of {average_tokens:.1f} visual tokens per layer cannot be reached by one cut before "
            f"layer {layer} of {num_layers} (the layers before it alone average {floor:.1f}); cut earlier."
        )
    return ratio


KEEP_RATIO_METHODS = ("fastv", "random", "spatial", "divprune", "fastervlm")


def pdrop_schedule(tokens: int, num_visual: int, num_layers: int) -> dict:
    """PDrop for a retained-token budget: stages at 1/4, 1/2, 3/4 of the depth (PDrop's
    [8, 16, 24] of 32 layers) with its lambda = 0.5 geometric decay centred on the budget:
    cumulative keep ratios 2t/N, t/N, t/2N (capped at 1). Not a published table: PDrop's
    paper tunes its schedule per budget; this is the same shape for every budget."""
    layers = [max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)]
    if len(set(layers)) < 3 or layers[-1] >= num_layers:
        raise ValueError(f"pdrop needs at least 4 decoder layers for three stages, the model has {num_layers}.")
    ratios = [min(1.0, factor * tokens / num_visual) for factor in (2.0, 1.0, 0.5)]
    return {"layers": layers, "keep_ratios": ratios}


def budget_kwargs(name: str, tokens: int, num_visual: int, num_layers: int) -> dict:
    """Budget arguments that make pruner `name` retain `tokens` of `num_visual` visual tokens
    (the papers' convention: "192 tokens" = what the method keeps after its cut; the measured
    average per layer, FLOPs and KV cache are reported next to it)."""
    if not 0 < tokens <= num_visual:
        raise ValueError(f"a budget of {tokens} tokens must be in 1..{num_visual} (the visual tokens per image).")
    if name in KEEP_RATIO_METHODS:
        return {"keep_ratio": tokens / num_visual}
    if name == "pdrop":
        return pdrop_schedule(tokens, num_visual, num_layers)
    if name == "visionzip":
        return {"keep_tokens": tokens}
    if name == "sparsevlm":
        return sparsevlm_schedule(tokens, num_visual, num_layers)
    raise ValueError(
        f"no token-budget rule for pruner {name!r}; budgets apply to "
        f"{sorted((*KEEP_RATIO_METHODS, 'pdrop', 'visionzip', 'sparsevlm'))} "
        "(fitprune takes a FLOPs budget: see budget_flops_ratio)."
    )


def sparsevlm_schedule(tokens: int, num_visual: int, num_layers: int) -> dict:
    """SparseVLM's published schedule for 192 / 128 / 64 tokens (LLaVA-1.5-7B: layers [2, 6, 15]
    of 32, counts of 576), with layers scaled to the model's depth and counts to its visual tokens."""
    from atp.token.sparsevlm import SCHEDULES, SCORE_LAYERS

    if str(tokens) not in SCHEDULES:
        raise ValueError(f"sparsevlm publishes schedules for {sorted(SCHEDULES, key=int)} tokens only, not {tokens}.")
    layers = [int(layer * num_layers / 32 + 0.5) for layer in SCORE_LAYERS]
    if len(set(layers)) < len(layers) or layers[-1] + 1 >= num_layers:
        raise ValueError(f"sparsevlm needs at least 5 decoder layers for its three stages, the model has {num_layers}.")
    counts = [max(1, int(count * num_visual / 576 + 0.5)) for count in SCHEDULES[str(tokens)]]
    return {"layers": layers, "keep_tokens": counts}


def budget_flops_ratio(tokens: int, num_visual: int, text_tokens: float, config, cut: int = 2) -> float:
    """FitPrune's FLOPs budget at a token budget: the prefill FLOPs of FastV's schedule (all
    `num_visual` tokens before layer `cut`, `tokens` from it on) / unpruned. FitPrune deletes
    inside the LLM, so the FLOPs of a method that prunes before the LLM are out of its reach.
    text_tokens: the mean non-visual tokens per prompt."""
    from atp.metrics.accounting import prefill_flops

    layers = int(config.num_hidden_layers)
    schedule = torch.tensor([[num_visual] * cut + [tokens] * (layers - cut)], dtype=torch.float64)
    pruned = prefill_flops(config, text_tokens + schedule)
    return float(pruned / prefill_flops(config, torch.full_like(schedule, text_tokens + num_visual)))


VFLOWOPT_STAGE_FRACTIONS = (0.0, 9 / 28, 18 / 28)  # the official stages, before the LLM and LLM layers 9, 18 of 28


def vflowopt_budget(tokens: int, num_visual: int, num_layers: int) -> dict:
    """VFlowOpt's search settings for a retained-token budget: the official stages scaled to the model's depth,
    the target average share `tokens / num_visual` (VFlowOpt states its budgets as the average share of visual
    tokens over the decoder layers), and the official search box with the first stage's bounds scaled with the
    target (official: [0.25, 0.375] for a target of 0.25, i.e. [target, 1.5 target])."""
    if not 0 < tokens <= num_visual:
        raise ValueError(f"a budget of {tokens} tokens must be in 1..{num_visual} (the visual tokens per image).")
    layers = [round(fraction * num_layers) for fraction in VFLOWOPT_STAGE_FRACTIONS]
    if len(set(layers)) < len(layers) or layers[-1] >= num_layers:
        raise ValueError(f"vflowopt needs at least 3 decoder layers for its three stages, the model has {num_layers}.")
    target = tokens / num_visual
    space = {
        "keep_ratios": [[target, min(1.0, 1.5 * target)], [0.2 / 0.375, 1.0]],
        "t": [0.0, 50.0],
        "merge_grid": [3.0, 24.0],
        "alpha": [-1.0, 1.0],
    }
    return {"layers": layers, "target": target, "space": space}
