"""Two-stage baselines: choose the structures to remove by a score, then fine-tune LoRA with
the mask fixed (StructuralPruningModule(fixed_mask=...)), at the same parameter ratio and
LoRA budget as ATP.

Allocation [ours], the same for every score: every layer loses round(ratio * G) attention
groups (at most G - 1) and the share of MLP channels that brings the decoder to the target
parameter ratio; within a layer the lowest-scoring groups go.
Scores of a group (a sum over all of its weights):
  * magnitude: sum |W|;
  * wanda_sp:  sum |W_ij| * ||X_j||, X_j the input feature j of that weight's projection
               over calibration tokens (Wanda's |W| x activation norm, summed per group);
  * random:    seeded uniform scores.
"""

from __future__ import annotations

import torch
from torch import nn

from atp.structural.groups import StructureMask, decoder_parameters, layer_groups, mask_parameters
from atp.structural.masking import decoder_layers

SCORES = ("magnitude", "wanda_sp", "random")


def _group_scores(layer: nn.Module, groups, norms: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention-group scores [G], channel scores [m]) of one layer; norms: input norms per projection."""
    attn, mlp = layer.self_attn, layer.mlp

    def weighted(name: str, linear: nn.Linear) -> torch.Tensor:
        weight = linear.weight.detach().abs().float()
        return weight * norms[name][None] if norms is not None else weight

    rows = lambda w, size: w.sum(1).view(-1, size).sum(1)  # noqa: E731  (row groups of `size`)
    cols = lambda w, size: w.sum(0).view(-1, size).sum(1)  # noqa: E731
    q_size = groups.queries_per_group * groups.head_dim
    attention = (
        rows(weighted("q", attn.q_proj), q_size)
        + rows(weighted("k", attn.k_proj), groups.head_dim)
        + rows(weighted("v", attn.v_proj), groups.head_dim)
        + cols(weighted("o", attn.o_proj), q_size)
    )
    channels = (
        rows(weighted("gate", mlp.gate_proj), 1)
        + rows(weighted("up", mlp.up_proj), 1)
        + cols(weighted("down", mlp.down_proj), 1)
    )
    return attention, channels


@torch.no_grad()
def input_norms(model: nn.Module, batches: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Per layer, the L2 norm of every input feature of each projection over the calibration tokens."""
    sums: list[dict[str, torch.Tensor]] = [{} for _ in decoder_layers(model)]
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        named = {
            "q": layer.self_attn.q_proj,
            "k": layer.self_attn.k_proj,
            "v": layer.self_attn.v_proj,
            "o": layer.self_attn.o_proj,
            "gate": layer.mlp.gate_proj,
            "up": layer.mlp.up_proj,
            "down": layer.mlp.down_proj,
        }
        for name, module in named.items():

            def record(_module, args, index=index, name=name):
                squares = args[0].detach().float().pow(2).flatten(0, -2).sum(0)
                sums[index][name] = sums[index].get(name, 0) + squares

            handles.append(module.register_forward_pre_hook(record))
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()
    return [{name: total.sqrt() for name, total in layer.items()} for layer in sums]


def baseline_mask(
    model: nn.Module, score: str, prune_ratio: float, calibration: list[dict] | None = None, seed: int = 0
) -> StructureMask:
    """The structures a two-stage baseline keeps at `prune_ratio` of the decoder parameters."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    if score == "wanda_sp" and not calibration:
        raise ValueError("wanda_sp needs calibration batches (input activations).")
    config = model.config
    groups = layer_groups(config)
    norms = input_norms(model, calibration) if score == "wanda_sp" else [None] * len(groups)
    generator = torch.Generator().manual_seed(seed)
    attention, channels = [], []
    for layer, g, layer_norms in zip(decoder_layers(model), groups, norms):
        if score == "random":
            head_scores, channel_scores = (
                torch.rand(g.attention_groups, generator=generator),
                torch.rand(g.mlp_channels, generator=generator),
            )
        else:
            head_scores, channel_scores = _group_scores(layer, g, layer_norms)
        removed = min(g.attention_groups - 1, round(prune_ratio * g.attention_groups))
        keep = torch.ones(g.attention_groups, dtype=torch.bool)
        keep[torch.argsort(head_scores, stable=True)[:removed]] = False
        attention.append(keep)
        channels.append(channel_scores)
    # channels: the same share per layer, found so the decoder meets the target ratio
    target = (1 - prune_ratio) * decoder_parameters(config)
    no_channels = StructureMask(attention, [torch.zeros(g.mlp_channels) for g in groups])
    per_channel = float(mask_parameters(config, StructureMask(attention, [torch.ones(1)] * len(groups)))) - float(
        mask_parameters(config, no_channels)
    )
    kept_per_layer = (target - float(mask_parameters(config, no_channels))) / per_channel
    channel_masks = []
    for g, scores in zip(groups, channels):
        kept = max(1, min(g.mlp_channels, round(kept_per_layer)))
        keep = torch.zeros(g.mlp_channels, dtype=torch.bool)
        keep[torch.argsort(scores, descending=True, stable=True)[:kept]] = True
        channel_masks.append(keep)
    return StructureMask(attention, channel_masks)
