"""Token pruners: the interface, the registry and one file per method."""

from atp.token import atp, divprune, fastv, none, pdrop, random_tokens, spatial  # noqa: F401  (registers them)
from atp.token.base import PruneContext, TokenPruner, available_pruners, build_pruner, register

__all__ = ["PruneContext", "TokenPruner", "available_pruners", "build_pruner", "register"]
