"""Adapter for text-only HF causal LMs (Llama, Mistral, Qwen2, Qwen3 `*ForCausalLM`: SmolLM2 is a Llama).

A causal LM has no image: the runtime sees no visual token, and only pruners that prune prompt
text tokens (`TokenPruner.prunes_text`, e.g. LazyLLM) change anything. The decoder stack
(`model.model`) receives `input_ids`; the runtime's language-model hook needs `inputs_embeds`,
so an instance pre-hook on the decoder stack embeds the ids first (what the stack would do itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from atp.models.adapter import VisualGeometry, VLMAdapter, empty_geometry


class TextLMAdapter(VLMAdapter):
    """Locates the parts of one text-only causal LM instance."""

    model_classes = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)
    has_images = False

    @property
    def multimodal_model(self) -> nn.Module:
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.model

    @property
    def projector(self):
        """No projector: a callable that says so (the runtime hands it to pruners as `ctx.project`)."""

        def missing(_features: torch.Tensor) -> torch.Tensor:
            raise ValueError(f"{type(self.model).__name__} is a text-only model: it has no multimodal projector.")

        return missing

    @property
    def text_config(self):
        return self.model.config

    def vision_cls_offset(self) -> int:
        raise ValueError(f"{type(self.model).__name__} is a text-only model: no vision tower, no [CLS] token.")

    @property
    def image_token_id(self) -> int:
        raise ValueError(f"{type(self.model).__name__} is a text-only model: it has no image token.")

    def image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B, S] all False: a text-only model has no image placeholder."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError(f"{type(self.model).__name__} forward needs input_ids or inputs_embeds.")
        return torch.zeros(reference.shape[:2], dtype=torch.bool, device=reference.device)

    def instance_hooks(self) -> list[Any]:
        """A pre-hook on the decoder stack that turns `input_ids` into `inputs_embeds` (installed before
        the runtime's own hooks, which read the embeddings)."""

        def embed(_module, args, kwargs):
            input_ids = kwargs.pop("input_ids", None)
            if input_ids is None and args:
                input_ids, args = args[0], args[1:]
            if input_ids is not None:
                if kwargs.get("inputs_embeds") is not None:
                    raise ValueError("give input_ids or inputs_embeds, not both (the model embeds input_ids itself).")
                kwargs["inputs_embeds"] = self.model.get_input_embeddings()(input_ids)
            return args, kwargs

        return [self.language_model.register_forward_pre_hook(embed, with_kwargs=True)]

    def visual_geometry(self, visual: torch.Tensor, rope: torch.Tensor | None) -> VisualGeometry:
        """No visual token: every field -1."""
        return VisualGeometry(**empty_geometry(tuple(visual.shape), visual.device))
