"""The one place that knows how the installed transformers passes the KV cache around.

transformers 5.24 renamed the keyword its modules pass the cache under, from
`past_key_values` to `cache` (the old name is deprecated until 5.40 on the public
forwards; between modules only the new one is passed). Everything in atp that reads or
passes a cache goes through this module, so the supported range (pyproject.toml) is
handled here and nowhere else. Feature detection, not version checks: the decoder's own
signature says which name it takes.
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from transformers.models.llama.modeling_llama import LlamaModel

#: Names a cache may travel under between HF modules, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")


def _cache_keyword() -> str:
    accepted = inspect.signature(LlamaModel.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in accepted:
            return name
    raise ImportError(
        f"this transformers ({transformers.__version__}) passes the KV cache under none of {CACHE_KEYWORDS}; "
        "atp supports the transformers range declared in its pyproject.toml: install a version inside it."
    )


#: The keyword the installed transformers' model forwards take for the cache.
CACHE_KEYWORD = _cache_keyword()


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a module's call kwargs (under either name), or None."""
    for name in CACHE_KEYWORDS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for calling a model of the installed transformers with a cache."""
    return {CACHE_KEYWORD: cache}


def output_cache(output: Any) -> Any:
    """The KV cache returned by a model forward or `generate(return_dict_in_generate=True)`."""
    for name in CACHE_KEYWORDS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None
