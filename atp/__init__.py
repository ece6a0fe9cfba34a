"""atp: learned, adaptive pruning of vision-language and language models.

import atp
atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), mode="drop")
out = model(**inputs)            # HF signature and output types, unchanged
ids = model.generate(**inputs)   # HF generate, KV cache, batch > 1
s = atp.stats(model)             # s.visual_tokens [batch, layers]; s.kept {layer: [...]}
atp.remove(model)                # back to the stock model
"""

from __future__ import annotations

# structural: registers the exported model classes with the Auto classes; token: registers every pruner by name
from atp import structural, token  # noqa: F401
from atp.export import load_pruned, save_pruned
from atp.runtime import PruningStats
from atp.runtime.attach import apply, remove, runtime_of, stats
from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, available_pruners, build_pruner, register

__version__ = "0.1.0"

__all__ = [
    "MergeDecision",
    "PruneContext",
    "PruningStats",
    "TokenPruner",
    "apply",
    "available_pruners",
    "build_pruner",
    "load_pruned",
    "register",
    "remove",
    "runtime_of",
    "save_pruned",
    "stats",
]
