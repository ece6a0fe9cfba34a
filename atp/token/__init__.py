"""Token pruners: the interface, the registry and one file per method."""

from atp.token import (  # noqa: F401
    atp,
    divprune,
    fastervlm,
    fastv,
    fitprune,
    none,
    pdrop,
    random_tokens,
    sparsevlm,
    spatial,
    visionzip,
)
from atp.token.base import MergeDecision, PruneContext, TokenPruner, available_pruners, build_pruner, register

__all__ = ["MergeDecision", "PruneContext", "TokenPruner", "available_pruners", "build_pruner", "register"]
