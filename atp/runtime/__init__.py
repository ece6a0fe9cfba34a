"""The decoder-loop runtime that drops or masks visual tokens between HF decoder layers."""

from atp.runtime.engine import MODES, PruningRuntime
from atp.runtime.stats import PruningStats

__all__ = ["MODES", "PruningRuntime", "PruningStats"]
