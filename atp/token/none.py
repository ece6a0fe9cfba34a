"""`none`: prunes nothing, but runs the whole runtime (the reference for parity tests)."""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register


@register
class NoPruning(TokenPruner):
    name = "none"

    def __init__(self) -> None:
        super().__init__(layers=[])

    def prune(self, ctx: PruneContext) -> torch.Tensor:  # never called: no layers
        return torch.ones_like(ctx.visual)
