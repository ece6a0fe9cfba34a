"""A2SF: KV-cache eviction by accumulative attention scores with a forgetting factor
(Jo & Shin 2024, arXiv 2407.20485; official code Dirac-Notation/A2SF).

The rule, per decoder layer l, per key/value head g, per sample b:

    score_n[k] = sum over queries q <= n of  alpha^(n - q) * sum_{h in group g} A_h[q, k]

with A_h the layer's post-softmax attention of query head h (GQA: the query heads sharing
key/value head g are summed) and alpha the forgetting factor. Incrementally, after a forward
that appends Q entries:  score <- alpha^Q * score + sum_i alpha^(Q-1-i) * A[row i]  (rows of
padding, whose own slot is masked, count 0). Then, if the layer caches more than `budget`
entries, the `recent` newest entries are kept and, of the others, the `budget - recent` with the
highest score (ties: the earlier entry); the rest are evicted from that head's keys and values.
The prompt is compressed at the end of prefill; each decode step adds one entry and evicts one.

How it plugs in (no modeling code is forked or patched):

  * `A2SFCache` is a transformers `Cache` of `A2SFLayer`s (a `DynamicLayer` subclass) that the
    caller passes to `generate`. A layer reports the number of entries ever appended as its
    sequence length (as HF's sliding-window layers do), so positions and masks keep their
    meaning; each cached entry remembers its *slot*, its index among those entries.
  * Per-instance hooks on the decoder's attention modules: a pre-hook that, once a layer has
    evicted, gathers the columns of the mask the model (or atp's token runtime) built for all
    appended slots down to the slots still cached ([B, H, Q, kept + Q], one mask per head); a
    forward hook that recomputes the attention rows from the layer's q projection, RoPE and the
    cached keys (the same arithmetic as HF's eager attention) and updates scores and evicts.

Works under "eager" and "sdpa"; composes with `atp.apply` (a token pruner in prefill, A2SF in
decode): the runtime's per-layer masks are gathered the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from atp.models.hf_compat import cache_of

SUPPORTED_ATTENTION = ("eager", "sdpa")
SCORE_CHUNK_ELEMENTS = 2**24  # attention probabilities held at once while scoring a prefill


def check_settings(budget: int, forgetting_factor: float, recent: int) -> None:
    """Clear errors for settings outside the rule's domain."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"a2sf budget must be an int >= 1 (cache entries per layer and head), got {budget!r}.")
    if not 0.0 <= float(forgetting_factor) <= 1.0:
        raise ValueError(
            f"a2sf forgetting_factor must lie in [0, 1] (1: plain accumulation as H2O, 0: last query only), "
            f"got {forgetting_factor!r}."
        )
    if isinstance(recent, bool) or not isinstance(recent, int) or recent < 0:
        raise ValueError(f"a2sf recent must be an int in [0, budget={budget}], got {recent!r}.")
    if recent > budget:
        raise ValueError(
            f"a2sf budget={budget} is below its protected entries: recent must be an int in [0, budget={budget}], "
            f"got {recent!r} (the newest entries, never evicted). Raise the budget to >= {recent} or lower recent."
        )


def select_kept(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """[..., budget] ascending indices of the entries to keep among [..., L] scores (L > budget):
    the last `recent`, plus the `budget - recent` highest-scoring others (ties: the earlier)."""
    length = scores.shape[-1]
    others = scores[..., : length - recent]
    order = torch.sort(others, dim=-1, descending=True, stable=True).indices[..., : budget - recent]
    newest = torch.arange(length - recent, length, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.sort(torch.cat([order, newest], dim=-1), dim=-1).values


class A2SFLayer(DynamicLayer):
    """One decoder layer's cache: keys/values [B, H_kv, L, hd] with, per entry, its slot and score."""

    def __init__(self, budget: int, forgetting_factor: float, recent: int, record: bool = False) -> None:
        super().__init__()
        self.budget, self.forgetting_factor, self.recent, self.record = budget, float(forgetting_factor), recent, record
        self.cumulative_length = 0  # entries ever appended (the slots 0..cumulative_length-1)
        self.slots: torch.Tensor | None = None  # [B, H_kv, L] long
        self.scores: torch.Tensor | None = None  # [B, H_kv, L] float32
        self.pending = False  # entries appended but not yet scored (the forward hook has not run)
        self.evicted = False  # True once some entry has left: the model's masks no longer match the layout
        self.sizes: list[int] = []  # cached entries after each forward
        self.history: list[torch.Tensor] = []  # slots kept after each forward (record=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, H_kv, Q, hd] keys/values; returns all cached (scoring and eviction follow the attention)."""
        if self.pending:
            raise RuntimeError(
                "this A2SFCache was not scored after its last forward: its hooks are not on the model running it "
                "(or were closed). Create the cache with the model that generates, inside a `with` block."
            )
        self.pending = True
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        batch, heads, queries = key_states.shape[:3]
        new = torch.arange(self.cumulative_length, self.cumulative_length + queries, device=key_states.device)
        new = new.expand(batch, heads, queries)
        zeros = torch.zeros(batch, heads, queries, dtype=torch.float32, device=key_states.device)
        self.slots = new if self.slots is None else torch.cat([self.slots, new], dim=-1)
        self.scores = zeros if self.scores is None else torch.cat([self.scores, zeros], dim=-1)
        self.cumulative_length += queries
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The model builds its mask over every appended slot; the pre-hook gathers the cached ones."""
        return self.cumulative_length + query_length, 0

    def accumulate(self, received: torch.Tensor, queries: int) -> None:
        """score <- alpha^Q * score (entries older than this forward) + received [B, H_kv, L]."""
        decay = self.forgetting_factor**queries
        old = self.scores.shape[-1] - queries
        self.scores = torch.cat([self.scores[..., :old] * decay, self.scores[..., old:]], dim=-1) + received

    def evict(self) -> None:
        """Keep `budget` entries per (sample, head) by the rule of `select_kept`; log the size."""
        if self.slots.shape[-1] > self.budget:
            kept = select_kept(self.scores, self.budget, self.recent)  # [B, H_kv, budget]
            rows = kept[..., None].expand(-1, -1, -1, self.keys.shape[-1])
            self.keys, self.values = self.keys.gather(2, rows), self.values.gather(2, rows)
            self.slots, self.scores = self.slots.gather(2, kept), self.scores.gather(2, kept)
            self.evicted = True
        self.pending = False
        self.sizes.append(self.slots.shape[-1])
        if self.record:
            self.history.append(self.slots.clone())

    def gather_mask(self, mask: torch.Tensor | None, queries: int, num_heads: int) -> torch.Tensor:
        """[B, H, Q, L + Q]: the model's mask over all appended slots (+ this forward's Q), at the cached slots."""
        batch, kv_heads, _ = self.slots.shape
        total = self.cumulative_length + queries
        if mask is None:  # sdpa's causal shortcut: build the causal mask it stands for
            mask = torch.arange(total, device=self.slots.device)[None, :] <= (
                torch.arange(queries, device=self.slots.device)[:, None] + self.cumulative_length
            )
            mask = mask[None, None]
        if mask.shape[-1] != total or mask.shape[-2] != queries:
            raise RuntimeError(
                f"a2sf: the attention mask covers {tuple(mask.shape[-2:])} (queries, keys); expected ({queries}, "
                f"{total}), one column per entry ever appended to this layer. Was the cache edited outside A2SF?"
            )
        new = torch.arange(self.cumulative_length, total, device=self.slots.device).expand(batch, kv_heads, queries)
        columns = torch.cat([self.slots, new], dim=-1).repeat_interleave(num_heads // kv_heads, dim=1)
        mask = mask.expand(batch, num_heads, queries, total)
        return mask.gather(3, columns[:, :, None, :].expand(-1, -1, queries, -1))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an A2SF cache cannot be cropped (assisted decoding is not supported).")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("an A2SF cache does not support beam search or num_return_sequences > 1.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("an A2SF cache does not support contrastive search or beam search.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("an A2SF cache does not support beam search.")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's self-attention modules (those HF gives a `layer_idx` and q/k projections)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not found:
        raise ValueError(f"a2sf found no decoder attention modules (with layer_idx, q_proj, k_proj) in {type(model)}.")
    return found


def _mask_rows(mask: torch.Tensor | None, rows: slice, queries: int, keys: int, device) -> torch.Tensor:
    """Rows `rows` of the layer's mask [B|1, 1|H, Q, K]; None (sdpa's causal shortcut) becomes the causal
    mask it stands for (the Q queries are the last Q of the K slots)."""
    if mask is not None:
        return mask[:, :, rows]
    query = torch.arange(rows.start, rows.stop, device=device)[:, None] + (keys - queries)
    return (torch.arange(keys, device=device)[None, :] <= query)[None, None]


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as the eager attention adds it: float, 0 visible, the dtype's min hidden."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def attention_probs(
    module: nn.Module, hidden: torch.Tensor, rotary: tuple, keys: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """[B, H, Q, K] post-softmax attention of the layer's queries over `keys` [B, H_kv, K, hd] (already
    rotated, as cached), with HF eager attention's arithmetic.

    hidden: [B, Q, d] the attention's input rows; rotary: (cos, sin) [B, Q, hd] of those rows;
    mask:   [B|1, 1|H, Q, K] bool (True visible) or additive float
    """
    batch, queries, _ = hidden.shape
    query = module.q_proj(hidden).view(batch, queries, -1, module.head_dim).transpose(1, 2)
    if getattr(module, "q_norm", None) is not None:
        query = module.q_norm(query)
    cos, sin = rotary
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    keys = repeat_kv(keys, query.shape[1] // keys.shape[1])
    weights = torch.matmul(query, keys.transpose(2, 3)) * module.scaling
    weights = weights + _as_additive(mask, weights.dtype)
    return torch.softmax(weights, dim=-1, dtype=torch.float32)


class EvictingCache(Cache):
    """A KV cache of `A2SFLayer`-like layers (slot bookkeeping) whose hooks gather the model's masks at the cached
    slots once a layer has evicted; subclasses score and evict in `_after_attention`. The hooks live while the
    cache is open (`close()` or leaving the `with` block removes them)."""

    def __init__(self, model: nn.Module, make_layer) -> None:
        modules = _attention_modules(model)
        for module in modules:
            implementation = getattr(module.config, "_attn_implementation", None)
            if implementation not in SUPPORTED_ATTENTION:
                raise ValueError(
                    f"{type(self).__name__} supports attention implementations {SUPPORTED_ATTENTION}, the model uses "
                    f"{implementation!r}: load it with attn_implementation='sdpa' or 'eager'."
                )
        super().__init__(layers=[make_layer() for _ in range(len(modules))])
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))

    def __enter__(self) -> EvictingCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def sizes(self) -> list[list[int]]:
        """[forward][layer] cached entries after each forward (prefill, then one per decode step)."""
        return [list(step) for step in zip(*(layer.sizes for layer in self.layers))]

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _before_attention(self, module: nn.Module, args: tuple, kwargs: dict):
        if cache_of(kwargs) is not self:
            return None
        layer = self.layers[module.layer_idx]
        if not layer.evicted:
            return None  # the cache still holds every slot: the model's own mask is right
        hidden = self._hidden(args, kwargs)
        num_heads = module.q_proj.out_features // module.head_dim
        kwargs["attention_mask"] = layer.gather_mask(kwargs.get("attention_mask"), hidden.shape[1], num_heads)
        return args, kwargs

    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        raise NotImplementedError


def own_slot_visible(mask: torch.Tensor | None, queries: int, keys: int, device) -> torch.Tensor:
    """[B|1, Q] bool: whether each of this forward's Q rows sees its own slot (False: a padding row).

    mask: the layer's [B|1, 1|H, Q, K] mask (bool, True visible, or additive float), or None (sdpa's causal
    shortcut: every row visible); the Q rows are the last Q of the K slots."""
    if mask is None:
        return torch.ones(1, queries, dtype=torch.bool, device=device)
    own = mask[:, 0, torch.arange(queries, device=device), torch.arange(keys - queries, keys, device=device)]
    return own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2


class A2SFCache(EvictingCache):
    """A KV cache that evicts by A2SF; pass it to `generate` (keyword: `atp.models.hf_compat.cache_kwargs`).

        with A2SFCache(model, budget=64, forgetting_factor=0.3, recent=8) as cache:
            out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=32)

    budget:            cached entries per layer, head and sample after every forward (the pending
                       step holds budget + 1 while it attends)
    forgetting_factor: alpha in [0, 1]
    recent:            the newest entries always kept (0 <= recent <= budget)
    record:            keep each forward's cached slots per layer in `layer.history` (tests, analysis)
    The hooks live while the cache is open (`close()` or leaving the `with` block removes them).
    """

    def __init__(
        self, model: nn.Module, budget: int, forgetting_factor: float, recent: int = 0, record: bool = False
    ) -> None:
        check_settings(budget, forgetting_factor, recent)
        super().__init__(model, lambda: A2SFLayer(budget, forgetting_factor, recent, record))
        self.budget, self.forgetting_factor, self.recent = budget, float(forgetting_factor), recent

    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if cache_of(kwargs) is not self:
            return
        layer = self.layers[module.layer_idx]
        hidden = self._hidden(args, kwargs)
        queries, keys = hidden.shape[1], layer.keys.shape[2]
        mask = kwargs.get("attention_mask")
        batch, kv_heads = hidden.shape[0], layer.keys.shape[1]
        num_heads = module.q_proj.out_features // module.head_dim
        cos, sin = kwargs["position_embeddings"]
        step = max(1, SCORE_CHUNK_ELEMENTS // (batch * num_heads * keys))  # query rows scored at once
        received = torch.zeros(batch, num_heads, keys, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, queries, step):
                rows = slice(start, min(start + step, queries))
                row_mask = _mask_rows(mask, rows, queries, keys, hidden.device)  # [B|1, 1|H, r, K]
                probs = attention_probs(module, hidden[:, rows], (cos[:, rows], sin[:, rows]), layer.keys, row_mask)
                own = torch.arange(rows.start, rows.stop, device=hidden.device) + keys - queries
                own_entry = row_mask[:, 0, torch.arange(own.numel()), own]  # [B|1, r] each row's own slot
                # padding rows (their own slot masked) add nothing
                visible = (
                    own_entry if own_entry.dtype == torch.bool else own_entry > torch.finfo(own_entry.dtype).min / 2
                )
                decay = layer.forgetting_factor ** (
                    queries - 1 - torch.arange(rows.start, rows.stop, device=hidden.device)
                )
                weights = (decay * visible).float().expand(batch, -1)  # [B, r]
                received += torch.einsum("bq,bhqk->bhk", weights, probs)
            received = received.view(batch, kv_heads, -1, keys).sum(2)  # [B, H_kv, K]
            layer.accumulate(received, queries)
            layer.evict()
