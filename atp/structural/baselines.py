"""Two-stage baselines: choose the structures to remove by a score and an allocation, then
fine-tune LoRA with the mask fixed (StructuralPruningModule(fixed_mask=...)), at the same
parameter budget and LoRA budget as ATP.

Methods (`METHODS`), each a score plus an allocation:
  * `flap` (An et al., FLAP): fluctuation score, global allocation. Per layer, for every input
    feature j of o_proj and of down_proj: v_j = Var_tokens(X_j) * ||W[:, j]||^2 ("WIFV"); the
    attention metric is squared, v_j^2 [paper code]. Each metric is standardised within its
    layer over the features (mean, unbiased std) [paper code]; an attention group's score is the
    mean over its query-head features [paper code]. Global allocation: one ranking over all
    layers, attention groups weighted by their parameters (a head counted as its channel width:
    per-group / per-channel parameters, 512/3 on Llama-7B) [paper]. Bias compensation (o_proj /
    down_proj biases of W[:, removed] @ mean(X[removed])) is NOT applied [ours]: the exported
    Llama-family checkpoint has no o_proj / down_proj biases, and the LoRA stage that follows
    every baseline here can learn the shift.
  * `llm_pruner` (Ma et al., LLM-Pruner): first-order Taylor importance |w * dL/dw| per weight
    on the domain calibration batches [paper, "param_first"], summed over every weight coupled
    to the group (q/k/v rows and o columns of an attention group; gate/up rows and the down
    column of a channel) [paper]; block-wise: the uniform allocation below [paper]. [ours] all
    layers are pruned (LLM-Pruner's Llama-7B recipe spares the first 4 and last 2 of 32), so
    every method meets the same decoder budget.
  * `wanda_sp` (the reference's Wanda-sp): per input feature j of o_proj / down_proj,
    mean_i |W_ij| * ||X_j||, the attention groups summing their features [paper code];
    uniform allocation.
  * `wanda_sp_global` [ours]: Wanda-sp's per-feature metric through FLAP's standardisation and
    global allocation, so the table separates the score from the allocation.
  * `magnitude` [ours]: sum |W| over all weights of the group; uniform allocation.
  * `random`: seeded uniform scores; uniform allocation.

Allocations (both meet the parameter budget (1 - ratio) x dense within 1 %):
  * uniform: every layer loses floor(ratio x G) attention groups (at most G - 1) [paper code:
    int(ratio * heads)], and the same number of MLP channels per layer is kept, found so the
    decoder meets the budget (round to the nearest channel) [ours: the reference prunes ratio x m
    channels, which misses the budget whenever floor() spares heads]; lowest scores go.
  * global: `atp.structural.allocation.greedy_allocation` on the standardised scores with
    parameter costs (every layer keeps at least one group and channel) [ours: FLAP picks the
    threshold whose cumulative weight is nearest the target and may empty a layer].
"""

from __future__ import annotations

import torch
from torch import nn

from atp.structural.allocation import greedy_allocation
from atp.structural.groups import StructureMask, decoder_parameters, layer_costs, layer_groups, mask_parameters
from atp.structural.masking import decoder_layers

METHODS = ("flap", "llm_pruner", "wanda_sp", "wanda_sp_global", "magnitude", "random")
CALIBRATED = ("flap", "llm_pruner", "wanda_sp", "wanda_sp_global")
GLOBAL = ("flap", "wanda_sp_global")


# -- calibration statistics ----------------------------------------------------------------
def model_inputs(batch: dict) -> dict:
    """The model's forward inputs of a calibration batch: input_ids [B, T], attention_mask, and
    for a VLM its image inputs (pixel_values, ...); labels are the loss's business."""
    return {name: value for name, value in batch.items() if name != "labels"}


@torch.no_grad()
def input_statistics(model: nn.Module, batches: list[dict]) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per layer, for the inputs of o_proj ("o") and down_proj ("down"): token count "n",
    per-feature sum "sum" [d] and sum of squares "squares" [d] (float64) over all calibration tokens."""
    stats: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in decoder_layers(model)]
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):

            def record(_module, args, index=index, name=name):
                x = args[0].detach().double().flatten(0, -2)  # [tokens, d]
                entry = stats[index].setdefault(
                    name, {"n": torch.zeros((), dtype=torch.float64), "sum": 0, "squares": 0}
                )
                entry["n"] += x.shape[0]
                entry["sum"] = entry["sum"] + x.sum(0)
                entry["squares"] = entry["squares"] + x.pow(2).sum(0)

            handles.append(module.register_forward_pre_hook(record))
    try:
        for batch in batches:
            model(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def variance(entry: dict[str, torch.Tensor]) -> torch.Tensor:
    """[d] population variance of each feature over the calibration tokens."""
    mean = entry["sum"] / entry["n"]
    return (entry["squares"] / entry["n"] - mean.pow(2)).clamp_min(0)


def standardise(values: torch.Tensor) -> torch.Tensor:
    """(v - mean) / std over the features of one layer (unbiased std) [FLAP]."""
    return (values - values.mean()) / values.std()


def group_features(values: torch.Tensor, groups, reduce: str) -> torch.Tensor:
    """[G] per attention group, the sum or mean of its o_proj input features [G * q_width]."""
    per_group = values.view(groups.attention_groups, groups.queries_per_group * groups.head_dim)
    return per_group.sum(1) if reduce == "sum" else per_group.mean(1)


# -- scores --------------------------------------------------------------------------------
def flap_scores(model: nn.Module, batches: list[dict]) -> StructureMask:
    """FLAP's standardised scores (float): attention [G_l] and channels [m_l] per layer."""
    stats = input_statistics(model, batches)
    attention, channels = [], []
    for layer, groups, entry in zip(decoder_layers(model), layer_groups(model.config), stats):
        o = layer.self_attn.o_proj.weight.detach().double()
        down = layer.mlp.down_proj.weight.detach().double()
        head_metric = (variance(entry["o"]) * o.pow(2).sum(0)).pow(2)
        channel_metric = variance(entry["down"]) * down.pow(2).sum(0)
        attention.append(group_features(standardise(head_metric), groups, "mean"))
        channels.append(standardise(channel_metric))
    return StructureMask(attention, channels)


def wanda_features(model: nn.Module, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, Wanda's per-feature metric mean_i |W_ij| ||X_j|| of o_proj [G * q_width] and down_proj [m]."""
    stats = input_statistics(model, batches)
    features = []
    for layer, entry in zip(decoder_layers(model), stats):
        o = layer.self_attn.o_proj.weight.detach().double().abs()
        down = layer.mlp.down_proj.weight.detach().double().abs()
        features.append(
            ((o * entry["o"]["squares"].sqrt()[None]).mean(0), (down * entry["down"]["squares"].sqrt()[None]).mean(0))
        )
    return features


def wanda_sp_scores(model: nn.Module, batches: list[dict], standardised: bool = False) -> StructureMask:
    """Wanda-sp's scores: attention groups sum their features [paper code]; with `standardised`,
    FLAP's per-layer standardisation and group mean instead (the global variant)."""
    attention, channels = [], []
    for (head_metric, channel_metric), groups in zip(wanda_features(model, batches), layer_groups(model.config)):
        if standardised:
            attention.append(group_features(standardise(head_metric), groups, "mean"))
            channels.append(standardise(channel_metric))
        else:
            attention.append(group_features(head_metric, groups, "sum"))
            channels.append(channel_metric)
    return StructureMask(attention, channels)


def taylor_scores(model: nn.Module, batches: list[dict]) -> StructureMask:
    """LLM-Pruner's first-order Taylor group importance: sum over the group's coupled weights of
    |w * g|, g the gradient of the calibration loss summed over `batches` (labels: the batch's, else input_ids)."""
    layers = decoder_layers(model)
    weights = [
        (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
         layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        for layer in layers
    ]  # fmt: skip
    targets = {id(linear.weight) for group in weights for linear in group}
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    saved = [p.grad for p in parameters]
    try:
        for p in parameters:  # gradients only for the projection weights scored
            p.requires_grad_(id(p) in targets)
            p.grad = None
        with torch.enable_grad():
            for batch in batches:
                labels = batch.get("labels", batch["input_ids"])
                model(**model_inputs(batch), labels=labels).loss.backward()
        attention, channels = [], []
        for (q, k, v, o, gate, up, down), groups in zip(weights, layer_groups(model.config)):
            named = {"q": q, "k": k, "v": v, "o": o, "gate": gate, "up": up, "down": down}
            importance = {name: (lin.weight.detach() * lin.weight.grad).abs().double() for name, lin in named.items()}
            q_width = groups.queries_per_group * groups.head_dim
            count = groups.attention_groups
            attention.append(
                importance["q"].sum(1).view(count, q_width).sum(1)
                + importance["k"].sum(1).view(count, groups.head_dim).sum(1)
                + importance["v"].sum(1).view(count, groups.head_dim).sum(1)
                + importance["o"].sum(0).view(count, q_width).sum(1)
            )
            channels.append(importance["gate"].sum(1) + importance["up"].sum(1) + importance["down"].sum(0))
        return StructureMask(attention, channels)
    finally:
        for p, flag, grad in zip(parameters, flags, saved):
            p.grad = grad
            p.requires_grad_(flag)


def magnitude_scores(model: nn.Module) -> StructureMask:
    """[ours] sum |W| over every weight of the group."""
    attention, channels = [], []
    for layer, groups in zip(decoder_layers(model), layer_groups(model.config)):
        attn, mlp = layer.self_attn, layer.mlp
        q_width = groups.queries_per_group * groups.head_dim
        count = groups.attention_groups
        rows = lambda linear, size: linear.weight.detach().abs().double().sum(1).view(count, size).sum(1)  # noqa: E731
        attention.append(
            rows(attn.q_proj, q_width)
            + rows(attn.k_proj, groups.head_dim)
            + rows(attn.v_proj, groups.head_dim)
            + attn.o_proj.weight.detach().abs().double().sum(0).view(count, q_width).sum(1)
        )
        channels.append(
            mlp.gate_proj.weight.detach().abs().double().sum(1)
            + mlp.up_proj.weight.detach().abs().double().sum(1)
            + mlp.down_proj.weight.detach().abs().double().sum(0)
        )
    return StructureMask(attention, channels)


def random_scores(config, seed: int) -> StructureMask:
    generator = torch.Generator().manual_seed(seed)
    groups = layer_groups(config)
    attention = [torch.rand(g.attention_groups, generator=generator, dtype=torch.float64) for g in groups]
    channels = [torch.rand(g.mlp_channels, generator=generator, dtype=torch.float64) for g in groups]
    return StructureMask(attention, channels)


# -- allocation ----------------------------------------------------------------------------
def uniform_allocation(scores: StructureMask, config, prune_ratio: float) -> StructureMask:
    """Every layer loses floor(ratio x G) attention groups (at most G - 1) and keeps the same number
    of MLP channels, the number that brings the decoder nearest (1 - ratio) x dense; lowest scores go."""
    groups = layer_groups(config)
    attention = []
    for g, values in zip(groups, scores.attention):
        removed = min(g.attention_groups - 1, int(prune_ratio * g.attention_groups))
        keep = torch.ones(g.attention_groups, dtype=torch.bool)
        keep[torch.argsort(values, stable=True)[:removed]] = False
        attention.append(keep)
    budget = (1 - prune_ratio) * decoder_parameters(config)
    no_channels = float(
        mask_parameters(config, StructureMask(attention, [torch.zeros(g.mlp_channels) for g in groups]))
    )
    per_channel_row = sum(c.per_channel for c in layer_costs(config))  # one more channel in every layer
    kept_per_layer = round((budget - no_channels) / per_channel_row)
    channels = []
    for g, values in zip(groups, scores.channels):
        kept = max(1, min(g.mlp_channels, kept_per_layer))
        keep = torch.zeros(g.mlp_channels, dtype=torch.bool)
        keep[torch.argsort(values, descending=True, stable=True)[:kept]] = True
        channels.append(keep)
    return StructureMask(attention, channels)


def baseline_scores(
    model: nn.Module, method: str, calibration: list[dict] | None = None, seed: int = 0
) -> StructureMask:
    """The float scores of `method` (higher = more important)."""
    if method not in METHODS:
        raise ValueError(f"baseline method must be one of {METHODS}, got {method!r}.")
    if method in CALIBRATED and not calibration:
        raise ValueError(
            f"{method} needs calibration batches (a list of {{'input_ids': [B, T], ...}} dicts; a VLM's with its "
            "image inputs), got none."
        )
    if method == "flap":
        return flap_scores(model, calibration)
    if method == "llm_pruner":
        return taylor_scores(model, calibration)
    if method in ("wanda_sp", "wanda_sp_global"):
        return wanda_sp_scores(model, calibration, standardised=method == "wanda_sp_global")
    if method == "magnitude":
        return magnitude_scores(model)
    return random_scores(model.config, seed)


def baseline_mask(
    model: nn.Module, method: str, prune_ratio: float, calibration: list[dict] | None = None, seed: int = 0
) -> StructureMask:
    """The structures a two-stage baseline keeps at `prune_ratio` of the decoder parameters."""
    return allocate(baseline_scores(model, method, calibration, seed), method, model.config, prune_ratio)


def allocate(scores: StructureMask, method: str, config, prune_ratio: float) -> StructureMask:
    """The mask `method`'s allocation (global or uniform) keeps from its `scores` at `prune_ratio`;
    scores do not depend on the ratio, so one calibration serves every ratio."""
    if method in GLOBAL:
        return greedy_allocation(scores, config, (1 - prune_ratio) * decoder_parameters(config))
    return uniform_allocation(scores, config, prune_ratio)
