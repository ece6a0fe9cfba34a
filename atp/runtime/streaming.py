"""A StreamingLLM-style KV cache (Xiao et al. 2023, arXiv 2309.17453): a baseline for A2SF.

The rule, per decoder layer and sample: once a layer caches more than `budget` entries, it keeps
the `sinks` oldest *visible* entries (the "attention sinks": the first tokens of the text; padding
is never a sink) and the `budget - sinks` newest entries; the rest are evicted. No attention is
read, so the cache adds no scoring cost. Positions are not re-assigned (each key keeps the RoPE of
its original position, as in `A2SFCache`); the paper re-assigns them within the cache to run past
the pretrained context, which sequences within that context do not need.
"""

from __future__ import annotations

import torch
from torch import nn

from atp.models.hf_compat import cache_of
from atp.runtime.a2sf import A2SFLayer, EvictingCache, own_slot_visible


def check_streaming(budget: int, sinks: int) -> None:
    """Clear errors for settings outside the rule's domain."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"streaming budget must be an int >= 1 (cache entries per layer and head), got {budget!r}.")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"streaming sinks must be an int >= 0, got {sinks!r}.")
    if sinks >= budget:
        raise ValueError(
            f"streaming budget={budget} does not exceed its protected entries: sinks={sinks} first tokens plus at "
            f"least the newest one. Raise the budget to >= {sinks + 1} or lower sinks."
        )


class StreamingLayer(A2SFLayer):
    """One decoder layer's cache; `scores` holds 1.0 for a visible entry and 0.0 for padding."""

    def __init__(self, budget: int, sinks: int, record: bool = False) -> None:
        super().__init__(budget, forgetting_factor=1.0, recent=budget - sinks, record=record)
        self.sinks = sinks

    def mark_visible(self, visible: torch.Tensor) -> None:
        """visible [B|1, Q] bool for this forward's Q entries (the newest)."""
        queries = visible.shape[-1]
        self.scores[..., -queries:] = visible[:, None, :].float()

    def evict(self) -> None:
        """Keep the first `sinks` visible entries and the newest `budget - sinks` (A2SFLayer's bookkeeping)."""
        length = self.scores.shape[-1]
        order = torch.arange(length, device=self.scores.device, dtype=torch.float32)
        self.scores = self.scores * 2 * length - order  # priority: visible (> 0) first, then the earliest
        super().evict()
        self.scores = (self.scores > 0).float()  # back to the visibility flags


class StreamingCache(EvictingCache):
    """The StreamingLLM rule as a transformers `Cache` (keyword: `atp.models.hf_compat.cache_kwargs`).

        with StreamingCache(model, budget=64, sinks=4) as cache:
            out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=32)

    budget: cached entries per layer, head and sample after every forward (> sinks)
    sinks:  the oldest visible entries always kept (StreamingLLM's default: 4)
    record: keep each forward's cached slots per layer in `layer.history`
    """

    def __init__(self, model: nn.Module, budget: int, sinks: int = 4, record: bool = False) -> None:
        check_streaming(budget, sinks)
        super().__init__(model, lambda: StreamingLayer(budget, sinks, record))
        self.budget, self.sinks = budget, sinks

    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if cache_of(kwargs) is not self:
            return
        layer = self.layers[module.layer_idx]
        queries, keys = self._hidden(args, kwargs).shape[1], layer.keys.shape[2]
        layer.mark_visible(own_slot_visible(kwargs.get("attention_mask"), queries, keys, layer.keys.device))
        layer.evict()
