"""Masked decoder layers, and their export as a physically smaller HF checkpoint.

`mask_structures(model, mask)` zeroes the pruned groups' outputs with per-instance hooks
(the reference semantics, see atp/structural/masking.py). `remove_structures(model, mask)` slices the pruned rows and
columns out of the weights and turns the config into a registered `atp_pruned_<family>`
config with per-layer key/value heads and MLP widths, so `save_pretrained` writes a
checkpoint that `AutoModelForCausalLM.from_pretrained` loads after `import atp`, or without
atp through `trust_remote_code=True` (the checkpoint carries `pruned_model.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from atp.structural.groups import StructureMask, decoder_config, family, layer_groups
from atp.structural.masking import StructureMasker, decoder_layers, decoder_stack
from atp.structural.pruned_model import PRUNED


def _check_mask(model: nn.Module, mask: StructureMask) -> None:
    groups = layer_groups(model.config)
    if len(mask.attention) != len(groups) or len(mask.channels) != len(groups):
        raise ValueError(f"the mask covers {len(mask.attention)} layers; the model has {len(groups)}.")
    for index, (g, heads, channels) in enumerate(zip(groups, mask.attention, mask.channels)):
        if heads.shape != (g.attention_groups,) or channels.shape != (g.mlp_channels,):
            raise ValueError(
                f"layer {index}: mask shapes {tuple(heads.shape)} / {tuple(channels.shape)} do not match the "
                f"layer's {g.attention_groups} attention groups / {g.mlp_channels} MLP channels."
            )


def mask_structures(model: nn.Module, mask: StructureMask) -> StructureMasker:
    """The masked model: pruned attention groups and MLP channels output zero (v_proj and
    up_proj outputs masked, LoRA included). `.remove()` on the result restores the model."""
    _check_mask(model, mask)
    masker = StructureMasker(model, model.config)
    masker.set(mask, "full")
    return masker


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias
    smaller = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device
    )
    smaller.weight.data.copy_(weight)
    if bias is not None:
        smaller.bias.data.copy_(bias.data[rows] if rows is not None else bias.data)
    return smaller


def _shrink_layer(layer: nn.Module, groups, heads: torch.Tensor, channels: torch.Tensor) -> None:
    """Keep only the attention groups `heads` [G] and MLP channels `channels` [m] of one layer."""
    attn, mlp = layer.self_attn, layer.mlp
    kv_rows = heads.repeat_interleave(groups.head_dim).nonzero()[:, 0]
    q_rows = heads.repeat_interleave(groups.queries_per_group * groups.head_dim).nonzero()[:, 0]
    attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
    kept = channels.nonzero()[:, 0]
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=kept)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=kept)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=kept)
    mlp.intermediate_size = len(kept)


def remove_structures(model: nn.Module, mask: StructureMask) -> nn.Module:
    """Physically remove the masked groups, in place; returns the model with an
    `atp_pruned_<family>` decoder config (per-layer `kv_heads_per_layer`,
    `intermediate_size_per_layer`). `model` is a causal LM, or a VLM whose language model is
    pruned (LLaVA: the VLM's `text_config` becomes the pruned config, and the VLM loads back
    with `from_pretrained` after `import atp`)."""
    _check_mask(model, mask)
    for index, heads in enumerate(mask.attention):
        if not bool(heads.any()) or not bool(mask.channels[index].any()):
            raise ValueError(f"layer {index} would lose all its attention groups or MLP channels; keep at least one.")
    for layer, groups, heads, channels in zip(
        decoder_layers(model), layer_groups(model.config), mask.attention, mask.channels
    ):
        _shrink_layer(layer, groups, heads, channels)
    text_config = decoder_config(model.config)
    settings = text_config.to_dict()
    for key in (
        "model_type",
        "architectures",
        "transformers_version",
        "kv_heads_per_layer",
        "intermediate_size_per_layer",
    ):
        settings.pop(key, None)
    pruned = PRUNED[family(text_config)]
    config = pruned.config(
        kv_heads_per_layer=[int(h.sum()) for h in mask.attention],
        intermediate_size_per_layer=[int(c.sum()) for c in mask.channels],
        **settings,
    )
    if text_config is model.config:  # a causal LM
        model.config = config
        model.__class__ = pruned.causal_lm
    else:  # a VLM: its language model is a base decoder built from the text config
        decoder = decoder_stack(model)
        model.config.text_config = decoder.config = config
        decoder.__class__ = pruned.decoder
    return model


for _pruned in PRUNED.values():
    AutoConfig.register(_pruned.config.model_type, _pruned.config)
    AutoModelForCausalLM.register(_pruned.config, _pruned.causal_lm)
    AutoModel.register(_pruned.config, _pruned.decoder)  # a VLM builds its language model through AutoModel
    _pruned.config.register_for_auto_class()  # save_pretrained ships pruned_model.py: trust_remote_code works too
    _pruned.causal_lm.register_for_auto_class("AutoModelForCausalLM")
