"""Analytic prefill cost and KV-cache size, one convention for every method.

Prefill MACs of decoder layer l with n tokens (hidden d, head dim hd, h_q query and h_kv
key/value heads, SwiGLU MLP width m):

    n*d*hd*(2*h_q + 2*h_kv)   q, k, v, o projections
  + 2*n^2*h_q*hd              QK^T and AV (full square, as the kernels compute it)
  + 3*n*d*m                   gate, up, down

FLOPs = 2 x MACs. KV cache bytes = sum_l 2 * n_l * h_kv * hd * bytes_per_element.
A structurally pruned language model (atp_pruned_* config) has its own widths per layer.
Norms, RoPE, softmax and activations are not counted (they are not matmuls), nor are the
projection biases (Qwen2's q/k/v) or the LM head. Every family reads its own text config
(`DecoderShape.from_config`): LLaVA's Llama/Vicuna, Qwen2-VL, Qwen2.5-VL, Qwen3-VL. The vision
encoder and the pruner's own scoring are reported separately, never folded in.

Vision tower (reported only when a pruner cuts inside it, `PruningStats.vision_tokens`), MACs of
one encoder layer (CLIP-style: width d, MLP width m) with n tokens:

    4*n*d^2         q, k, v, out projections
  + 2*n^2*d         QK^T and AV
  + 2*n*d*m         fc1, fc2

per image, every layer the tower runs (LLaVA-1.5 runs all 24 although it reads layer 22's output).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from atp.runtime.stats import PruningStats


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of one decoder layer that its cost depends on."""

    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    mlp: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """From the language model's config: a text config (LlamaConfig, Qwen2_5_VLTextConfig, ...)
        or a multimodal config holding one (its `get_text_config()`). GQA from `num_key_value_heads`,
        the MLP width from `intermediate_size`, the head dim from `head_dim` where the family sets it
        (Qwen3-VL), else hidden / heads."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden=int(config.hidden_size),
            head_dim=int(head_dim),
            heads=int(config.num_attention_heads),
            kv_heads=int(config.num_key_value_heads or config.num_attention_heads),
            mlp=int(config.intermediate_size),
        )


def decoder_layer_macs(tokens: torch.Tensor | int, shape: DecoderShape) -> torch.Tensor:
    """Prefill MACs of one decoder layer for `tokens` tokens (any shape, elementwise)."""
    n = torch.as_tensor(tokens, dtype=torch.float64)
    projections = n * shape.hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    attention = 2 * n * n * shape.heads * shape.head_dim
    mlp = 3 * n * shape.hidden * shape.mlp
    return projections + attention + mlp


def layer_shapes(config, num_layers: int) -> list[DecoderShape]:
    """The shape of each of the `num_layers` decoder layers: all alike, or per layer where the
    language model was structurally pruned (an `atp_pruned_*` config's `kv_heads_per_layer`,
    each key/value head with its query heads, and `intermediate_size_per_layer`)."""
    dense = DecoderShape.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv_heads = getattr(text, "kv_heads_per_layer", None) or [dense.kv_heads] * num_layers
    widths = getattr(text, "intermediate_size_per_layer", None) or [dense.mlp] * num_layers
    if len(kv_heads) != num_layers or len(widths) != num_layers:
        raise ValueError(
            f"the config gives widths for {len(kv_heads)} / {len(widths)} layers, the statistics count {num_layers}."
        )
    queries_per_group = dense.heads // dense.kv_heads
    return [
        replace(dense, heads=int(g) * queries_per_group, kv_heads=int(g), mlp=int(m)) for g, m in zip(kv_heads, widths)
    ]


@dataclass(frozen=True)
class EncoderShape:
    """The sizes of one vision-tower encoder layer (CLIP / SigLIP style) that its cost depends on."""

    hidden: int
    mlp: int

    @classmethod
    def from_config(cls, config) -> EncoderShape:
        """From a vision config, or a multimodal config holding one (`vision_config`)."""
        config = getattr(config, "vision_config", config)
        return cls(hidden=int(config.hidden_size), mlp=int(config.intermediate_size))


def encoder_layer_macs(tokens: torch.Tensor | int, shape: EncoderShape) -> torch.Tensor:
    """MACs of one vision encoder layer for `tokens` tokens (any shape, elementwise)."""
    n = torch.as_tensor(tokens, dtype=torch.float64)
    return 4 * n * shape.hidden**2 + 2 * n * n * shape.hidden + 2 * n * shape.hidden * shape.mlp


def vision_flops(config, tokens_per_layer: torch.Tensor) -> torch.Tensor:
    """[I] FLOPs of the vision tower per image; tokens_per_layer: [I, Lv] tokens each tower layer ran on."""
    tokens = torch.as_tensor(tokens_per_layer)
    shape = EncoderShape.from_config(config)
    return 2 * encoder_layer_macs(tokens, shape).sum(-1)


def _layer_shapes(config, num_layers: int) -> list[DecoderShape]:
    return [DecoderShape.from_config(config)] * num_layers


def prefill_flops(config, tokens_per_layer: torch.Tensor) -> torch.Tensor:
    """[B] prefill FLOPs of the decoder stack; tokens_per_layer: [B, L] tokens each layer processed."""
    tokens = torch.as_tensor(tokens_per_layer)
    shapes = layer_shapes(config, tokens.shape[-1])
    macs = sum(decoder_layer_macs(tokens[..., layer], shape) for layer, shape in enumerate(shapes))
    return 2 * macs


def kv_cache_bytes(config, tokens_per_layer: torch.Tensor, bytes_per_element: int = 2) -> torch.Tensor:
    """[B] bytes of K and V cached after prefill; tokens_per_layer: [B, L]."""
    tokens = torch.as_tensor(tokens_per_layer, dtype=torch.float64)
    shapes = layer_shapes(config, tokens.shape[-1])
    per_token = torch.tensor([2 * s.kv_heads * s.head_dim * bytes_per_element for s in shapes], dtype=torch.float64)
    return (tokens * per_token).sum(-1)


@dataclass(frozen=True)
class CostReport:
    """Per-sample analytic cost of a pruned prefill next to the unpruned one ([B] tensors)."""

    flops: torch.Tensor
    flops_unpruned: torch.Tensor
    kv_bytes: torch.Tensor
    kv_bytes_unpruned: torch.Tensor
    vision_flops: torch.Tensor | None = None  # [I] per image, when the pruner cut inside the tower
    vision_flops_unpruned: torch.Tensor | None = None

    @property
    def vision_flops_ratio(self) -> float | None:
        """Total pruned / unpruned vision-tower FLOPs over the batch's images (None: tower not pruned)."""
        if self.vision_flops is None:
            return None
        return float(self.vision_flops.sum() / self.vision_flops_unpruned.sum())

    @property
    def flops_ratio(self) -> float:
        """Total pruned FLOPs / total unpruned FLOPs over the batch."""
        return float(self.flops.sum() / self.flops_unpruned.sum())

    @property
    def kv_ratio(self) -> float:
        return float(self.kv_bytes.sum() / self.kv_bytes_unpruned.sum())


def cost_report(config, stats: PruningStats, bytes_per_element: int = 2) -> CostReport:
    """Analytic FLOPs and KV bytes of the prefill `stats` describe, and of the unpruned model.
    config: the text config, or the model's config (then the vision tower's FLOPs are reported too,
    separately, where the pruner cut inside the tower)."""
    unpruned = stats.input_tokens[:, None].expand_as(stats.tokens)
    vision = {}
    if stats.vision_tokens is not None and getattr(config, "vision_config", None) is not None:
        full = torch.full_like(stats.vision_tokens, int(stats.vision_input_tokens))
        vision = dict(
            vision_flops=vision_flops(config, stats.vision_tokens), vision_flops_unpruned=vision_flops(config, full)
        )
    return CostReport(
        flops=prefill_flops(config, stats.tokens),
        flops_unpruned=prefill_flops(config, unpruned),
        kv_bytes=kv_cache_bytes(config, stats.tokens, bytes_per_element),
        kv_bytes_unpruned=kv_cache_bytes(config, unpruned, bytes_per_element),
        **vision,
    )
