"""Attention probes: recompute only the attention rows a pruner asks for.

The model keeps running under SDPA (or FlashAttention); it is never switched to eager.
For a layer the pruner names in `probe_layers`, forward hooks keep references to the
q_proj / k_proj outputs the layer computes anyway; `rows` then applies RoPE and the
layer's own mask to the requested query rows only:

    softmax(q[queries] @ k^T * scale + mask[queries])   ->  [B, H, Q, S]

which equals HF's eager `output_attentions` for those rows. For the layer about to run
(whose q/k are not computed yet), `rows` projects the current hidden states through the
layer's input norm and q/k projections (the extra cost is that pruner's scoring cost).

Pruners that need the attention every key receives from many queries (ATP's S_self and
S_cross, FitPrune's masses) use `attention_received`: the same numbers as reducing the rows
of all those queries, computed in cache-sized blocks of query rows (and of heads) so that the
[B, H, S, S] matrix and its temporaries are never held, and the keys are rotated once. One
ATP module's sums over 576 visual queries on the testbed (batch 50, 600 slots): 0.11 s on
two cores, against 0.19 s in the former 64 MB chunks of all heads (which, on one thread, had
cut ATP's three probes from 2.4 s to 1.0 s against the whole matrix at once).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half


class ProjectionCapture:
    """Holds the q/k (and, for vision-tower cuts, v) projection outputs of one layer during a forward."""

    def __init__(self) -> None:
        self.armed = False
        self.query: torch.Tensor | None = None  # [B, S, H * hd]
        self.key: torch.Tensor | None = None  # [B, S, H_kv * hd]
        self.value: torch.Tensor | None = None  # [B, S, H_kv * hd]

    def clear(self) -> None:
        self.query = self.key = self.value = None

    def hook(self, which: str):
        def store(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            if self.armed and getattr(self, which) is None:
                setattr(self, which, output)

        return store


class TowerCapture:
    """What one vision-tower layer's hooks (`VLMAdapter.vision_attention_hooks`) record during one tower
    forward: named parts (q/k projections, a fused qkv, rotary tables, sequence boundaries), the first
    value of each name while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.parts: dict[str, object] = {}

    def clear(self) -> None:
        self.parts = {}

    def record(self, name: str, value: object) -> None:
        if self.armed and name not in self.parts:
            self.parts[name] = value


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
    temperature: float = 1.0,
) -> torch.Tensor:
    """Post-softmax attention probabilities of the slots `queries` over all keys,
    softmax((q k^T x scale + mask) / temperature) (temperature 1: the layer's own attention).

    attn:    the layer's attention module (gives head_dim, scaling, optional q/k norms)
    query:   [B, S, H * hd] q_proj output (before RoPE); key: [B, S, H_kv * hd]
    rotary:  (cos, sin), each [B, S, hd], the layer's position embeddings
    mask:    [B, 1, S, S] the layer's additive mask
    queries: [B, Q] long slots whose rows are wanted
    returns  [B, H, Q, S] float32
    """
    return attention_rows_of(attn, gather_slots(query, queries), key, rotary, mask, queries, temperature)


def attention_rows_of(
    attn: nn.Module,
    query_rows: torch.Tensor,
    key: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    queries: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`attention_rows` given only the q_proj outputs of the wanted slots (query_rows [B, Q, H * hd],
    the rows of `queries` [B, Q]): a probe of the layer about to run projects just those rows."""
    keys = _grouped_keys(attn, key, rotary)
    return _rows(attn, query_rows, keys, rotary, mask, queries, temperature)


def gather_slots(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[B, S, D] -> [B, Q, D]: the rows of `slots` [B, Q] long."""
    return torch.gather(x, 1, slots[..., None].expand(-1, -1, x.shape[-1]))


def rotated_keys(attn: nn.Module, key: torch.Tensor, rotary: tuple, num_heads: int) -> torch.Tensor:
    """[B, H, S, hd] float32 keys as the layer's attention uses them (k norm, RoPE), repeated to the
    `num_heads` query heads (GQA)."""
    keys = _grouped_keys(attn, key, rotary)
    return repeat_kv(keys, num_heads // keys.shape[1])


def _grouped_keys(attn: nn.Module, key: torch.Tensor, rotary: tuple) -> torch.Tensor:
    """[B, H_kv, S, hd] float32 keys as the layer's attention uses them (k norm, RoPE), not repeated
    over the query heads of a group (GQA): `_rows` multiplies each group's queries with its keys."""
    k = _split_heads(key, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    cos, sin = rotary
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.float()


def _rows(
    attn: nn.Module,
    query_rows: torch.Tensor,
    keys: torch.Tensor,
    rotary: tuple,
    mask,
    queries,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Attention probabilities [B, H, Q, S] float32 of the query slots `queries` [B, Q] whose q_proj
    outputs are `query_rows` [B, Q, H * hd], against `_grouped_keys` [B, H_kv, S, hd];
    softmax(logits / temperature) for another temperature than 1."""
    q = _query_heads(attn, query_rows, rotary, queries)
    return _probabilities(q, keys, _mask_rows(mask, queries, keys.shape[2]), temperature)


def _query_heads(attn: nn.Module, query_rows: torch.Tensor, rotary: tuple, queries: torch.Tensor) -> torch.Tensor:
    """[B, H, Q, hd] float32 queries as the layer's attention uses them (q norm, RoPE), times its
    scaling, from the q_proj outputs `query_rows` [B, Q, H * hd] of the slots `queries` [B, Q]."""
    q = _split_heads(query_rows, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    cos, sin = (gather_slots(part, queries)[:, None] for part in rotary)  # [B, 1, Q, hd]
    q = q * cos + rotate_half(q) * sin
    return q.float() * attn.scaling


def _mask_rows(mask: torch.Tensor, queries: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, Q, length] float32: the additive mask's rows of the slots `queries` [B, Q], first `length` keys."""
    return torch.gather(mask[..., :length], 2, queries[:, None, :, None].expand(-1, 1, -1, length)).float()


def _probabilities(q: torch.Tensor, keys: torch.Tensor, mask_rows: torch.Tensor, temperature: float = 1.0):
    """[B, h, Q, K] float32 softmax((q k^T + mask_rows) / temperature) of scaled queries q [B, h, Q, hd]
    against keys [B, g, K, hd], query heads in group order (h = g x heads per group)."""
    batch, heads, count, head_dim = q.shape
    groups, length = keys.shape[1], keys.shape[2]
    grouped = q.reshape(batch, groups, heads // groups * count, head_dim)
    scores = torch.matmul(grouped, keys.transpose(2, 3)).view(batch, heads, count, length)
    scores += mask_rows
    return torch.softmax(scores if temperature == 1.0 else scores / temperature, dim=-1)


QUERY_CHUNK_ELEMENTS = 2**20  # attention probabilities held at once by `attention_received` (4 MB in fp32)
MIN_CHUNK_ROWS = 64  # below this many query rows per chunk, `attention_received` splits the heads instead
HEAD_REDUCTIONS = ("mean", "max")


def attention_received(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    weights: torch.Tensor,
    heads: str = "mean",
    exclude_self: bool = False,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """[B, n, S] float32: attention each key slot receives from weighted query slots,

        received[b, n, j] = sum_i weights[b, n, i] * A[b, i, j]      (over i != j if exclude_self)

    with A the post-softmax probabilities reduced over heads by `heads` ("mean" or "max").
    weights: [B, n, S] per query slot (0: not a query); the other arguments as `attention_rows`.
    Rows whose weight is 0 in every sample are not computed. The others are computed in blocks of
    about `chunk_elements` probabilities (default QUERY_CHUNK_ELEMENTS, small enough to stay in the
    CPU's cache between the product, the mask, the softmax and the reduction): a block of query rows
    against only the keys they can see (the mask's causal reach: the rest are exactly 0), for all
    heads, or for one key group's heads (GQA) at a time when all heads would leave fewer than
    MIN_CHUNK_ROWS rows per block (many heads, long sequences).
    """
    if heads not in HEAD_REDUCTIONS:
        raise ValueError(f"heads must be one of {HEAD_REDUCTIONS}, got {heads!r}.")
    batch, _, length = weights.shape
    weights = weights.float()
    rows = weights.ne(0).any(1).any(0).nonzero()[:, 0]  # [R] query slots with a weight somewhere
    num_heads = query.shape[-1] // attn.head_dim
    keys = _grouped_keys(attn, key, rotary)  # once for all blocks
    per_group = num_heads // keys.shape[1]
    budget = chunk_elements or QUERY_CHUNK_ELEMENTS
    block_heads = num_heads if budget // (batch * num_heads * length) >= MIN_CHUNK_ROWS else per_group
    step = max(1, budget // (batch * block_heads * length))
    reach = _key_reach(mask)  # [B, S]: a query row sees no key at or past its reach (causal)
    received = weights.new_zeros(weights.shape)
    diagonal = weights.new_zeros(batch, length)  # A[b, j, j] on computed rows
    for start in range(0, rows.numel(), step):
        chunk = rows[start : start + step]  # [C]
        slots = chunk[None].expand(batch, -1)
        end = max(int(reach[:, chunk].max()), int(chunk.max()) + 1)  # keys past `end` get probability 0
        q = _query_heads(attn, gather_slots(query, slots), rotary, slots)  # [B, H, C, hd]
        mask_rows = _mask_rows(mask, slots, end)
        reduced = None  # [B, C, end]: sum (mean) or max over the heads so far
        on_diagonal = None  # [B, C]
        for first in range(0, num_heads, block_heads):
            block = slice(first, first + block_heads)
            groups = slice(first // per_group, (first + block_heads) // per_group)
            probs = _probabilities(q[:, block], keys[:, groups, :end], mask_rows)  # [B, h, C, end]
            diagonal_block = probs.gather(3, chunk[None, None, :, None].expand(batch, probs.shape[1], -1, 1))[..., 0]
            if heads == "mean":  # sum_i w_i sum_h A[h, i, j] / H as one product over (head, query) pairs
                weight = weights[:, :, chunk].repeat(1, 1, probs.shape[1]) / num_heads  # [B, n, h * C]
                received[..., :end] += torch.bmm(weight, probs.view(batch, -1, end))
                total = diagonal_block.sum(1)
                on_diagonal = total if on_diagonal is None else on_diagonal + total
            else:
                block_max = probs.amax(1)
                reduced = block_max if reduced is None else torch.maximum(reduced, block_max)
                top = diagonal_block.amax(1)
                on_diagonal = top if on_diagonal is None else torch.maximum(on_diagonal, top)
        if heads == "mean":
            diagonal[:, chunk] = on_diagonal / num_heads
        else:
            received[..., :end] += torch.bmm(weights[:, :, chunk], reduced)
            diagonal[:, chunk] = on_diagonal
    return received - weights * diagonal[:, None] if exclude_self else received


def _key_reach(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] long: for each query row of the additive mask [B, 1, S, S], one past the last key it
    can see (keys at or past it are masked: the probabilities there are exactly 0)."""
    visible = mask[:, 0] > torch.finfo(mask.dtype).min / 2  # [B, S, S]; -inf and finfo.min are masked
    last_from_end = visible.flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(visible.any(-1), mask.shape[-1] - last_from_end, 0)


def project_qk(
    layer: nn.Module, hidden: torch.Tensor, query_slots: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """q/k projections a decoder layer would compute from `hidden` ([B, S, d]): keys [B, S, H_kv * hd]
    of every slot; queries [B, S, H * hd], or [B, Q, H * hd] of `query_slots` [B, Q] only (a probe
    that wants a few rows does not pay for the query projection of every token); and the wall
    seconds of the key projection (what a layer that reuses these keys saves)."""
    normed = layer.input_layernorm(hidden)
    rows = normed if query_slots is None else gather_slots(normed, query_slots)
    start = time.perf_counter()
    keys = layer.self_attn.k_proj(normed)
    if keys.is_cuda:
        torch.cuda.synchronize(keys.device)
    return layer.self_attn.q_proj(rows), keys, time.perf_counter() - start


def cached_attention_rows(
    attn: nn.Module,
    query_rows: torch.Tensor,
    keys: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
) -> torch.Tensor:
    """[B, H, Q, K] float32 post-softmax attention of Q query rows over K keys as a KV cache holds them.

    query_rows: [B, Q, H * hd] q_proj outputs of the rows; keys: [B, H_kv, K, hd] cached keys (k norm and
    RoPE already applied); rotary: (cos, sin), each [B, Q, hd], of the query rows; mask: [B, 1, Q, K] additive.
    """
    slots = torch.arange(query_rows.shape[1], device=query_rows.device).expand(query_rows.shape[0], -1)
    return _rows(attn, query_rows, keys.float(), rotary, mask, slots)
