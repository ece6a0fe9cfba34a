"""Prunable structures of a Llama-style decoder layer, and the parameters a mask implies.

Two kinds of groups per layer:
  * attention groups: one key/value head together with the query heads that share it
    (GQA), i.e. rows of q_proj, k_proj, v_proj and columns of o_proj. Removing whole
    groups keeps the query/key-value ratio, so the stock attention code runs unchanged;
  * MLP channels: one intermediate channel, i.e. a row of gate_proj and up_proj and a
    column of down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FAMILIES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LayerGroups:
    """Group sizes of one decoder layer."""

    attention_groups: int  # key/value heads
    queries_per_group: int
    head_dim: int
    mlp_channels: int


@dataclass
class StructureMask:
    """Which groups stay: attention[l] [G_l] bool and channels[l] [m_l] bool per layer."""

    attention: list[torch.Tensor]
    channels: list[torch.Tensor]


def decoder_config(config):
    """The config of the decoder layers: the config itself for a causal LM, the text config of a
    VLM's config (LLaVA's `text_config`), so that a VLM's language model is pruned like an LLM."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family(config) -> str:
    """The decoder family of a config ("llama", "mistral", "qwen2"); exported models count as theirs.
    A VLM's config counts as its language model's."""
    config = decoder_config(config)
    model_type = str(getattr(config, "model_type", "")).removeprefix("atp_pruned_")
    if model_type not in FAMILIES:
        raise ValueError(
            f"no structural group definitions for model_type {config.model_type!r}; supported families: "
            f"{', '.join(FAMILIES)} (Llama-style decoder layers)."
        )
    return model_type


def layer_groups(config) -> list[LayerGroups]:
    """Per decoder layer, its group sizes (per-layer widths of an exported model included)."""
    family(config)
    config = decoder_config(config)
    layers = int(config.num_hidden_layers)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    per_group = int(config.num_attention_heads) // int(config.num_key_value_heads)
    kv_heads = getattr(config, "kv_heads_per_layer", None) or [int(config.num_key_value_heads)] * layers
    widths = getattr(config, "intermediate_size_per_layer", None) or [int(config.intermediate_size)] * layers
    return [LayerGroups(int(g), per_group, head_dim, int(m)) for g, m in zip(kv_heads, widths)]


def full_mask(config) -> StructureMask:
    """The mask that keeps every group."""
    groups = layer_groups(config)
    return StructureMask(
        attention=[torch.ones(g.attention_groups, dtype=torch.bool) for g in groups],
        channels=[torch.ones(g.mlp_channels, dtype=torch.bool) for g in groups],
    )


@dataclass(frozen=True)
class LayerCosts:
    """Decoder parameters of one layer: per attention group, per MLP channel, and fixed (norms, biases)."""

    per_group: int
    per_channel: int
    fixed: int


def layer_costs(config) -> list[LayerCosts]:
    """Per decoder layer, the parameters one attention group and one MLP channel bring, and the fixed rest."""
    config = decoder_config(config)
    hidden = int(config.hidden_size)
    qkv_bias = family(config) == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    costs = []
    for groups in layer_groups(config):
        q_width = groups.queries_per_group * groups.head_dim  # per attention group
        per_group = hidden * (2 * q_width + 2 * groups.head_dim) + (q_width + 2 * groups.head_dim) * qkv_bias
        per_channel = 3 * hidden + 2 * mlp_bias
        fixed = 2 * hidden + hidden * o_bias + hidden * mlp_bias  # norms, o_proj and down_proj biases
        costs.append(LayerCosts(per_group, per_channel, fixed))
    return costs


def mask_parameters(config, mask: StructureMask) -> torch.Tensor:
    """Decoder-layer parameters (attention, MLP, the two norms) a mask keeps, as a float
    tensor: differentiable in the mask values, so straight-through masks pass gradients."""
    total = torch.zeros((), dtype=torch.float64)
    for cost, heads, channels in zip(layer_costs(config), mask.attention, mask.channels):
        total = total + heads.double().sum() * cost.per_group + channels.double().sum() * cost.per_channel + cost.fixed
    return total


def decoder_parameters(config, mask: StructureMask | None = None) -> int:
    """Parameters of the decoder layers that `mask` keeps (all of them without a mask)."""
    return int(mask_parameters(config, mask or full_mask(config)).round())
