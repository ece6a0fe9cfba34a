"""KV-cache policies by name: caches that evict entries during decoding, built for one model.

    from atp.models.hf_compat import cache_kwargs
    from atp.runtime.kv_cache import build_kv_cache
    with build_kv_cache("a2sf", model, budget=64, forgetting_factor=0.3) as cache:
        out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=32)

Not token pruners: a policy is a transformers `Cache` the caller passes to a forward or `generate`
(the TokenPruner contract decides what prefill keeps; these decide what the cache keeps after).
"""

from __future__ import annotations

import inspect

from torch import nn

from atp.runtime.a2sf import A2SFCache, EvictingCache
from atp.runtime.streaming import StreamingCache

KV_CACHES: dict[str, type[EvictingCache]] = {"a2sf": A2SFCache, "streaming": StreamingCache}


def available_kv_caches() -> list[str]:
    """Names accepted by `build_kv_cache`."""
    return sorted(KV_CACHES)


def build_kv_cache(name: str, model: nn.Module, **kwargs) -> EvictingCache:
    """The cache policy `name` with its hooks on `model`, e.g. `build_kv_cache("streaming", model, budget=64)`."""
    if name not in KV_CACHES:
        raise ValueError(f"unknown KV-cache policy {name!r}; available: {', '.join(available_kv_caches())}.")
    cls = KV_CACHES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"KV-cache policy {name!r} has no argument(s) {unknown}; it accepts {accepted}.")
    return cls(model, **kwargs)
