"""Adapter for HF `LlavaForConditionalGeneration` (LLaVA-1.5 layout).

The text backbone can be any decoder transformers builds for LLaVA with the standard
Llama-style layer (Llama, Mistral, Qwen2): `layers[i].self_attn.{q,k,v,o}_proj`,
`layers[i].input_layernorm`, `norm`, `rotary_emb`. Every image is one fixed grid of
visual tokens (24x24 for LLaVA-1.5 at 336 px), after a [CLS] token in the tower.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from atp.models.adapter import TowerLayout, VisualGeometry, VLMAdapter


class LlavaAdapter(VLMAdapter):
    """Locates the parts of one LLaVA model instance."""

    model_classes = (LlavaForConditionalGeneration,)

    # -- modules -------------------------------------------------------------------
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

    def tower_layout(self) -> TowerLayout:
        """CLIP-style towers: one sequence per image, [CLS] (if any) first, then the patches in raster
        order; LLaVA reads `hidden_states[vision_feature_layer]` (entry j = output of layer j - 1)."""
        config = self.model.config
        depth = len(self.vision_layers)
        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError(
                f"pruning inside the vision tower needs one vision_feature_layer; this model concatenates the "
                f"hidden states of layers {list(feature_layer)}, which would each need their own cut."
            )
        if not -(depth + 1) <= feature_layer <= depth:
            raise ValueError(f"vision_feature_layer {feature_layer} is outside the tower's {depth + 1} hidden states.")
        if getattr(self.vision_transformer.embeddings, "class_embedding", None) is None:
            raise ValueError(
                f"pruning inside the vision tower needs a [CLS] token, and the vision tower "
                f"{type(self.vision_tower).__name__} has none (SigLIP-style towers also pool over every token, "
                "which a cut would change). Use a method that prunes at the LLM input or inside the LLM."
            )
        rows, cols = self.image_grid
        return TowerLayout(
            depth=depth,
            prefix=1,
            image_offset=int(config.vision_feature_select_strategy == "default"),
            patches=rows * cols,
            feature_layers=feature_layer % (depth + 1),
        )

    # -- facts ---------------------------------------------------------------------
    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of visual tokens per image: 24x24 for LLaVA-1.5 at 336 px."""
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side, side

    @property
    def fixed_grid(self) -> tuple[int, int]:
        return self.image_grid

    def visual_geometry(self, visual: torch.Tensor, rope: torch.Tensor | None) -> VisualGeometry:
        """Each sample's visual tokens are its images' grids one after another, in raster order."""
        rows, cols = self.image_grid
        per_image = rows * cols
        number = visual.long().cumsum(1) - 1  # [B, S] visual token number within its sample
        images = visual.sum(1) // per_image  # [B] images per sample
        images_before = torch.cumsum(images, 0) - images
        token = number.clamp_min(0) % per_image
        values = dict(
            image=images_before[:, None] + number.clamp_min(0) // per_image,
            crop=torch.zeros_like(number),
            row=token // cols,
            col=token % cols,
            rows=torch.full_like(number, rows),
            cols=torch.full_like(number, cols),
        )
        return VisualGeometry(**{name: torch.where(visual, value, -1) for name, value in values.items()})
