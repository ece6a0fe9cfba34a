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
# budgets given as a count of kept tokens per image
KEEP_TOKENS_METHODS = ("visionzip", "vispruner", "vtc_cls", "hiprune", "holov", "cdpruner", "fopru")
IN_TOWER_METHODS = ("flowcut", "zero_tprune")  # keep_tokens = the image tokens that leave the tower
SCHEDULED_METHODS = ("pdrop", "sparsevlm", "dart", "transprune", "aim")  # their own rules below


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


def budget_kwargs(name: str, tokens: int, num_visual: int, num_layers: int, vision_layers: int | None = None) -> dict:
    """Budget arguments that make pruner `name` retain `tokens` of `num_visual` visual tokens
    (the papers' convention: "192 tokens" = what the method keeps after its cut; the measured
    average per layer, FLOPs and KV cache are reported next to it). `vision_layers`: the vision
    tower's depth, if known; the vision layers of vtc_cls and hiprune are scaled to it from
    CLIP-L's 24 (`vision_layer_settings`)."""
    if not 0 < tokens <= num_visual:
        raise ValueError(f"a budget of {tokens} tokens must be in 1..{num_visual} (the visual tokens per image).")
    if name in KEEP_RATIO_METHODS:
        return {"keep_ratio": tokens / num_visual}
    if name == "pdrop":
        return pdrop_schedule(tokens, num_visual, num_layers)
    if name in KEEP_TOKENS_METHODS:
        return {"keep_tokens": tokens, **vision_layer_settings(name, vision_layers)}
    if name in (*IN_TOWER_METHODS, "dart"):  # dart: the reference's arithmetic keeps 4 + 8 x (T // 8), 132 for 128
        return {"keep_tokens": tokens}
    if name == "sparsevlm":
        return sparsevlm_schedule(tokens, num_visual, num_layers)
    if name == "transprune":
        return transprune_schedule(tokens, num_visual, num_layers)
    if name == "aim":
        return aim_schedule(tokens, num_visual, num_layers)
    raise ValueError(
        f"no token-budget rule for pruner {name!r}; budgets apply to "
        f"{sorted((*KEEP_RATIO_METHODS, *KEEP_TOKENS_METHODS, *IN_TOWER_METHODS, *SCHEDULED_METHODS))} "
        "(fitprune takes a FLOPs budget: see budget_flops_ratio)."
    )


CLIP_L_LAYERS = 24  # the depth of LLaVA-1.5's tower, for which the reference vision layers are given


def vision_layer_settings(name: str, vision_layers: int | None) -> dict:
    """The reference vision layers of vtc_cls (start_layer 16) and hiprune (object_layer 9, from 1)
    scaled from CLIP-L's 24 layers to a tower of `vision_layers` (`int(l x D / 24 + 0.5)`, kept
    inside the tower); nothing for other methods, an unknown depth or a 24-layer tower."""
    if vision_layers is None or vision_layers == CLIP_L_LAYERS:
        return {}
    scale = lambda layer: int(layer * vision_layers / CLIP_L_LAYERS + 0.5)  # noqa: E731
    if name == "vtc_cls":
        return {"start_layer": max(0, min(scale(16), vision_layers - 2))}
    if name == "hiprune":
        return {"object_layer": max(1, min(scale(9), vision_layers))}
    return {}


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


def transprune_schedule(tokens: int, num_visual: int, num_layers: int) -> dict:
    """TransPrune at T tokens: its stages [7, 9, 12] of 32 layers scaled to the depth (`int(l x L / 32
    + 0.5)`, each at least one past the previous [ours]), transitions from the layer before the first
    stage up to the last stage, the reference's 0.875 and 0.625 of N before the first two stages and
    T tokens from the last one on."""
    from atp.token.transprune import RATIOS, STAGES

    layers: list[int] = []
    for layer in STAGES:
        layers.append(max(int(layer * num_layers / 32 + 0.5), layers[-1] + 1 if layers else 1))
    if layers[-1] >= num_layers:
        raise ValueError(
            f"transprune needs at least 4 decoder layers for its three stages, the model has {num_layers}."
        )
    if tokens > int(num_visual * RATIOS[1]):
        raise ValueError(
            f"transprune keeps int({num_visual} x {RATIOS[1]}) tokens before its last stage; a budget of {tokens} "
            "is more than that."
        )
    return {
        "layers": layers,
        "transition_layers": list(range(layers[0] - 1, layers[-1])),
        "keep_ratios": list(RATIOS),
        "keep_tokens": tokens,
    }


def aim_schedule(tokens: int, num_visual: int, num_layers: int) -> dict:
    """AIM at T tokens: the merge keeps T (steps that each remove at most half, as the reference's
    (288, 36) for 252 and (288, 144, 72) for 72), and the in-LLM schedule of LLaVA-1.5 (start 13,
    step 0.125 of 32 layers) scaled to the depth [ours]."""
    from atp.token.aim import START_LAYER, STEP

    removals, left = [], num_visual
    while left > tokens:
        removals.append(min(left // 2, left - tokens))
        left -= removals[-1]
    start = int(START_LAYER * num_layers / 32 + 0.5)
    step = min(1.0, STEP * 32 / num_layers)
    if start + round(1 / step) >= num_layers:
        raise ValueError(f"aim's in-LLM schedule does not fit a model with {num_layers} decoder layers.")
    return {"merge_removals": removals, "start_layer": start, "step": step}


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
