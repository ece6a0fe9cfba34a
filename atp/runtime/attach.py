"""Attach a pruner to one model instance and read its token counts (`atp.apply`, `atp.remove`,
`atp.runtime_of`, `atp.stats`)."""

from __future__ import annotations

from torch import nn

from atp.runtime.engine import PruningRuntime
from atp.runtime.pruner import TokenPruner
from atp.runtime.stats import PruningStats

_ATTR = "_atp_runtime"


def apply(model: nn.Module, pruner: TokenPruner, mode: str = "drop") -> nn.Module:
    """Attach `pruner` to this model instance (per-instance hooks; no global patching).

    mode="drop" physically removes pruned visual tokens (the fast path); mode="mask" keeps
    the sequence length and hides them from attention (reference semantics; soft masks for
    training). Applying again replaces the previous pruner. Returns the model.
    """
    runtime = PruningRuntime(model, pruner, mode)
    if getattr(model, _ATTR, None) is not None:
        remove(model)
    param = next(model.parameters(), None)
    if param is not None:
        pruner.to(param.device)
    runtime.install()
    model.__dict__[_ATTR] = runtime
    return model


def remove(model: nn.Module) -> nn.Module:
    """Detach the pruner: the model behaves exactly as the stock HF model again."""
    runtime = model.__dict__.pop(_ATTR, None)
    if runtime is not None:
        runtime.remove()
    return model


def runtime_of(model: nn.Module) -> PruningRuntime:
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        raise ValueError("this model has no pruner attached; call atp.apply(model, pruner) first.")
    return runtime


def stats(model: nn.Module) -> PruningStats:
    """Token counts of the last forward (or generate's prefill) of a pruned model."""
    runtime = runtime_of(model)
    if runtime.last_stats is None:
        raise ValueError("no forward has run since atp.apply; run the model first.")
    return runtime.last_stats
