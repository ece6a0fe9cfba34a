"""Token pruners: the interface, the registry and one file per method."""

from atp.token import atp, fastv, none, random_tokens  # noqa: F401  (registers the pruners)
from atp.token.base import PruneContext, TokenPruner, available_pruners, build_pruner, register

__all__ = ["PruneContext", "TokenPruner", "available_pruners", "build_pruner", "register"]
