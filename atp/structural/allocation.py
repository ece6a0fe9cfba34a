"""Masks that meet a parameter budget: one greedy rule shared by the two-stage baselines'
global allocation and by ATP's frozen mask [ours].

`greedy_allocation(priority, config, budget)`: every layer first keeps its highest-priority
attention group and MLP channel (so it stays a valid layer after export); then all other
structures, in descending priority over the whole decoder, are kept whenever their
parameters still fit under `budget` (a structure that does not fit is skipped and the next,
possibly cheaper one tried). The result never exceeds the budget unless the per-layer
minimum already does, and it ends within one MLP channel's parameters of it whenever enough
channels are left to fill the gap.
"""

from __future__ import annotations

import torch

from atp.structural.groups import StructureMask, layer_costs, mask_parameters


def budget_parameters(config, prune_ratio: float, dense: int) -> float:
    """Decoder parameters a mask may keep at `prune_ratio`: (1 - ratio) x dense."""
    return (1.0 - prune_ratio) * dense


def within_budget(config, mask: StructureMask, budget: float, tolerance: float = 0.01) -> bool:
    """Whether the mask keeps budget x (1 +- tolerance) decoder parameters."""
    return abs(float(mask_parameters(config, mask)) / budget - 1.0) <= tolerance


def greedy_allocation(priority: StructureMask, config, budget: float) -> StructureMask:
    """The boolean mask the rule above keeps; priority: float scores [G_l] / [m_l] per layer
    (higher stays first; ties break by layer, then attention before channels, then index)."""
    costs = layer_costs(config)
    if len(priority.attention) != len(costs):
        raise ValueError(f"the priorities cover {len(priority.attention)} layers; the model has {len(costs)}.")
    attention = [torch.zeros(len(p), dtype=torch.bool) for p in priority.attention]
    channels = [torch.zeros(len(p), dtype=torch.bool) for p in priority.channels]
    used = float(sum(c.fixed for c in costs))
    for index, cost in enumerate(costs):
        attention[index][int(torch.argmax(priority.attention[index]))] = True
        channels[index][int(torch.argmax(priority.channels[index]))] = True
        used += cost.per_group + cost.per_channel
    scores, kinds, layers, positions, sizes = [], [], [], [], []
    for index, cost in enumerate(costs):
        for kind, values, size in (
            (0, priority.attention[index], cost.per_group),
            (1, priority.channels[index], cost.per_channel),
        ):
            count = len(values)
            scores.append(values.detach().double().cpu())
            kinds.append(torch.full((count,), kind))
            layers.append(torch.full((count,), index))
            positions.append(torch.arange(count))
            sizes.append(torch.full((count,), size, dtype=torch.float64))
    scores, kinds, layers, positions, sizes = map(torch.cat, (scores, kinds, layers, positions, sizes))
    order = torch.argsort(-scores, stable=True)
    for entry in order.tolist():
        target = (attention if kinds[entry] == 0 else channels)[int(layers[entry])]
        position = int(positions[entry])
        if target[position]:
            continue
        if used + float(sizes[entry]) <= budget:
            target[position] = True
            used += float(sizes[entry])
    return StructureMask(attention, channels)


def repair_to_budget(mask: StructureMask, logits: list[torch.Tensor], config, budget: float, tolerance: float = 0.01):
    """[ours] ATP's frozen mask: the last sampled hard mask if it keeps budget x (1 +- tolerance)
    parameters; otherwise the greedy allocation with the sample's kept structures first (by the
    generator's logit z) and its removed ones after (again by z). So an over-budget sample loses
    its lowest-logit kept structures, an under-budget one gets back its highest-logit removed
    ones, and the rest of the sample stays. logits: per layer [G_l + m_l], as the generator gives.
    Returns (mask, repaired: bool)."""
    if within_budget(config, mask, budget, tolerance):
        return mask, False
    attention, channels = [], []
    spread = max(float(z.detach().abs().max()) for z in logits) + 1.0  # kept rank above every removed one
    for heads, kept, z in zip(mask.attention, mask.channels, logits):
        z = z.detach().double().cpu()
        groups = len(heads)
        attention.append(z[:groups] + 2 * spread * heads.double().cpu())
        channels.append(z[groups:] + 2 * spread * kept.double().cpu())
    return greedy_allocation(StructureMask(attention, channels), config, budget), True
