"""Model-family adapters: where each supported HF model keeps its parts."""

from __future__ import annotations

from torch import nn

from atp.models.adapter import VisualGeometry, VLMAdapter
from atp.models.internvl import InternVLAdapter
from atp.models.llava import LlavaAdapter
from atp.models.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from atp.models.qwen_vl import QwenVLAdapter

ADAPTERS: tuple[type[VLMAdapter], ...] = (
    LlavaAdapter,
    QwenVLAdapter,
    InternVLAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
)


def get_adapter(model: nn.Module) -> VLMAdapter:
    """Return the adapter for `model`, or raise a clear error for unsupported classes."""
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter(model)
    supported = ", ".join(model.__name__ for adapter in ADAPTERS for model in adapter.model_classes)
    raise TypeError(
        f"atp token pruning does not support {type(model).__name__}. Supported model classes: "
        f"{supported} (load with e.g. LlavaForConditionalGeneration.from_pretrained(path)). "
        "A text-only causal LM has no visual tokens to prune; for structural pruning of LLMs "
        "use atp.structural. To support another VLM family, add an adapter in atp/models/."
    )


__all__ = [
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "QwenVLAdapter",
    "VLMAdapter",
    "VisualGeometry",
    "get_adapter",
]
