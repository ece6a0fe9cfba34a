"""Adapter for HF `LlavaForConditionalGeneration` (LLaVA-1.5 layout).

Everything the runtime needs to know about where a model family keeps its parts lives
in one adapter class, so that LLaVA-NeXT or Qwen2-VL become one new file each.
The text backbone can be any decoder transformers builds for LLaVA with the standard
Llama-style layer (Llama, Mistral, Qwen2): `layers[i].self_attn.{q,k,v,o}_proj`,
`layers[i].input_layernorm`, `norm`, `rotary_emb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration


@dataclass(frozen=True)
class LlavaAdapter:
    """Locates the parts of one LLaVA model instance."""

    model: LlavaForConditionalGeneration

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, LlavaForConditionalGeneration)

    # -- modules -------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module that receives `input_ids` and scatters image features (LlavaModel)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (e.g. LlamaModel): embed_tokens, layers, norm, rotary_emb."""
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        """The multimodal projector: image features [..., dv] -> LLM embeddings [..., d]."""
        return self.model.model.multi_modal_projector

    @property
    def vision_transformer(self) -> nn.Module:
        """The module holding `embeddings` and `encoder` (transformers 5: the tower itself)."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's encoder layers (CLIP, SigLIP)."""
        return self.vision_transformer.encoder.layers

    def vision_cls_offset(self) -> int:
        """Index of visual token 0 among the vision tower's tokens: 1 when a [CLS] token precedes
        the patches and is dropped ("default"), 0 otherwise. Raises if there is no [CLS] token."""
        embeddings = self.vision_transformer.embeddings
        if getattr(embeddings, "class_embedding", None) is None:
            raise ValueError(
                f"this method scores tokens by [CLS] attention, but the vision tower "
                f"{type(self.vision_tower).__name__} has no [CLS] token. Use a method that does not need "
                "one (e.g. divprune, spatial, fastv) with this model."
            )
        return 1 if self.model.config.vision_feature_select_strategy == "default" else 0

    # -- facts ---------------------------------------------------------------------
    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of visual tokens per image: 24x24 for LLaVA-1.5 at 336 px."""
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side, side

    @property
    def attn_implementation(self) -> str:
        return str(self.text_config._attn_implementation)

    def sliding_window(self) -> int | None:
        """The smallest sliding window any layer uses, or None when all layers attend fully."""
        config = self.text_config
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if getattr(config, "use_sliding_window", True) is False:
            return None
        return int(window) if window else None

    def image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B, S] bool: which input positions are image placeholder tokens."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        if inputs_embeds is None:
            raise ValueError("LLaVA forward needs input_ids or inputs_embeds.")
        embedding = self.model.get_input_embeddings()
        image_embed = embedding(torch.tensor(self.image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embed).all(-1)
