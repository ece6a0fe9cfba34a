"""Token pruners: the interface, the registry and one file per method."""

from atp.token import atp, divprune, fastervlm, fastv, fitprune, none, pdrop, random_tokens, spatial  # noqa: F401
from atp.token.base import PruneContext, TokenPruner, available_pruners, build_pruner, register

__all__ = ["PruneContext", "TokenPruner", "available_pruners", "build_pruner", "register"]
