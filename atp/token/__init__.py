"""Token pruners, one file per method. They implement the contract of `atp.runtime.pruner`
(`TokenPruner`, `PruneContext`, `MergeDecision`, the registry), re-exported here; importing this
package registers every method by name."""

from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, available_pruners, build_pruner, register
from atp.token import (  # noqa: F401
    aim,
    atp,
    catp,
    cdpruner,
    dart,
    divprune,
    fastervlm,
    fastv,
    fitprune,
    flowcut,
    fopru,
    hiprune,
    holov,
    lazyllm,
    none,
    pdrop,
    random_tokens,
    sparsevlm,
    spatial,
    transprune,
    vflowopt,
    visionzip,
    vispruner,
    vtc_cls,
    zero_tprune,
)

__all__ = ["MergeDecision", "PruneContext", "TokenPruner", "available_pruners", "build_pruner", "register"]
