"""A test pruner that replays given decisions: the same image-token numbers kept before each of
its layers on every forward, so generate without a cache (every step a new prefill) can be
compared with generate through the KV cache of a method that decided once, at the prefill."""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner


class FixedKeep(TokenPruner):
    name = "fixed_keep_test"

    def __init__(self, kept: dict[int, list[torch.Tensor]], position_ids: str = "original") -> None:
        super().__init__(sorted(kept), position_ids)
        self.kept = kept  # layer -> per sample, the image-token numbers kept before that layer

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        keep = torch.zeros_like(ctx.visual)
        for b, numbers in enumerate(self.kept[ctx.layer]):
            keep[b] = ctx.visual[b] & torch.isin(ctx.visual_index[b], numbers.to(ctx.visual.device))
        return keep
