"""Attention probes: recompute only the attention rows a pruner asks for.

The model keeps running under SDPA (or FlashAttention); it is never switched to eager.
For a layer the pruner names in `probe_layers`, forward hooks keep references to the
q_proj / k_proj outputs the layer computes anyway; `rows` then applies RoPE and the
layer's own mask to the requested query rows only:

    softmax(q[queries] @ k^T * scale + mask[queries])   ->  [B, H, Q, S]

which equals HF's eager `output_attentions` for those rows. For the layer about to run
(whose q/k are not computed yet), `rows` projects the current hidden states through the
layer's input norm and q/k projections (the extra cost is that pruner's scoring cost).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


class ProjectionCapture:
    """Holds the q/k projection outputs of one decoder layer during a prefill."""

    def __init__(self) -> None:
        self.armed = False
        self.query: torch.Tensor | None = None  # [B, S, H * hd]
        self.key: torch.Tensor | None = None  # [B, S, H_kv * hd]

    def clear(self) -> None:
        self.query = self.key = None

    def hook(self, which: str):
        def store(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            if self.armed and getattr(self, which) is None:
                setattr(self, which, output)

        return store


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H * hd] -> [B, H, S, hd]."""
    batch, length, _ = x.shape
    return x.view(batch, length, -1, head_dim).transpose(1, 2)


def attention_rows(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    queries: torch.Tensor,
) -> torch.Tensor:
    """Post-softmax attention probabilities of the slots `queries` over all keys.

    attn:    the layer's attention module (gives head_dim, scaling, optional q/k norms)
    query:   [B, S, H * hd] q_proj output (before RoPE); key: [B, S, H_kv * hd]
    rotary:  (cos, sin), each [B, S, hd], the layer's position embeddings
    mask:    [B, 1, S, S] the layer's additive mask
    queries: [B, Q] long slots whose rows are wanted
    returns  [B, H, Q, S] float32
    """
    head_dim = attn.head_dim
    batch, num_queries = queries.shape
    rows = torch.gather(query, 1, queries[..., None].expand(-1, -1, query.shape[-1]))
    q = _split_heads(rows, head_dim)
    k = _split_heads(key, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rotary
    index = queries[..., None].expand(-1, -1, cos.shape[-1])
    q_cos, q_sin = torch.gather(cos, 1, index), torch.gather(sin, 1, index)
    q, _ = apply_rotary_pos_emb(q, q, q_cos, q_sin)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling
    row_mask = torch.gather(mask, 2, queries[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))
    scores = scores + row_mask.float()
    return torch.softmax(scores, dim=-1)


def project_qk(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k projections a decoder layer would compute from `hidden` ([B, S, d])."""
    normed = layer.input_layernorm(hidden)
    return layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)
