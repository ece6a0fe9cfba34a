"""Model-family adapters: where each supported HF model keeps its parts."""

from __future__ import annotations

from torch import nn

from atp.models.adapter import VisualGeometry, VLMAdapter
from atp.models.internvl import InternVLAdapter
from atp.models.llava import LlavaAdapter
from atp.models.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from atp.models.qwen_vl import QwenVLAdapter
from atp.models.text_lm import TextLMAdapter

ADAPTERS: tuple[type[VLMAdapter], ...] = (
    LlavaAdapter,
    QwenVLAdapter,
    InternVLAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    TextLMAdapter,
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
        "For structural pruning of LLMs use atp.structural. To support another family, add an adapter in atp/models/."
    )


__all__ = [
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "QwenVLAdapter",
    "TextLMAdapter",
    "VLMAdapter",
    "VisualGeometry",
    "get_adapter",
]
