"""The adapter contract: what the family-agnostic runtime needs to know about one VLM family.

Every supported family keeps a decoder stack with Llama-style layers
(`layers[i].self_attn.{q,k,v,o}_proj`, `layers[i].input_layernorm`, `norm`, `rotary_emb`);
what differs is how images become tokens and how positions work. An adapter answers:

  * where the parts are (multimodal model, language model, layers, vision tower, projector);
  * which input tokens are visual, and for each visual token its image, crop, row and column
    (`visual_geometry`), instead of one fixed image grid;
  * whether the vision tower has a [CLS] token (`vision_cls_offset` raises when it has none);
  * how the tower's token sequence maps to the LLM's image tokens, for pruning inside the tower
    (`tower_layout`; raises where the family's tower cannot be pruned between layers);
  * how position ids are split into the 1-D text position (`[B, S]`, used for position
    compaction and decode continuation) and the rotary ids (`[B, S, R]`, R axes: 1 for plain
    RoPE, 3 for Qwen's M-RoPE), which the layout carries per token so that kept tokens keep
    their original rotary ids (`split_position_ids`, `rotary`);
  * what position ids to hand the language model (`language_position_ids`).

The runtime never asks which family it runs; it only calls these methods.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class VisualGeometry:
    """Where each visual token came from. Every field is [B, S] long; -1 on non-visual tokens.

    image: number of the token's image in the order the vision tower received the images
           (counted over the whole batch, sample by sample)
    crop:  crop (view) of the image the token belongs to (0 for single-view families)
    row:   row of the token in its crop's grid of visual tokens
    col:   column of the token in its crop's grid
    rows:  rows of that grid
    cols:  columns of that grid
    """

    image: torch.Tensor
    crop: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    def gather(self, index: torch.Tensor, visual: torch.Tensor) -> VisualGeometry:
        """The geometry of the tokens in slots: index [B, S'] original positions, visual [B, S']
        bool slots holding a (real) visual token; -1 in every other slot."""
        return VisualGeometry(
            **{f.name: torch.where(visual, torch.gather(getattr(self, f.name), 1, index), -1) for f in fields(self)}
        )

    def token_in_crop(self) -> torch.Tensor:
        """[B, S] long raster index of each visual token within its crop (row * cols + col); -1 elsewhere."""
        return torch.where(self.row >= 0, self.row * self.cols + self.col, -1)


@dataclass(frozen=True)
class TowerLayout:
    """How one image's token sequence in the vision tower maps to the LLM's image tokens.

    depth:          encoder layers of the tower
    prefix:         tokens before the patch tokens ([CLS]: 1), never pruned by the runtime
    image_offset:   tower index of the LLM's image token 0 (1 when the [CLS] is dropped before the
                    projector, 0 when it is passed on as an image token)
    patches:        patch tokens per image
    feature_layers: tower layers that run before the hidden state the projector reads (LLaVA-1.5
                    reads the output of layer 22 of 24: 23); a cut before layer k changes the
                    projector's input only for k < feature_layers
    """

    depth: int
    prefix: int
    image_offset: int
    patches: int
    feature_layers: int

    @property
    def tokens(self) -> int:
        """Tokens per image at the tower input (prefix + patches)."""
        return self.prefix + self.patches

    @property
    def image_tokens(self) -> int:
        """Image tokens per image the LLM receives without pruning."""
        return self.tokens - self.image_offset


def empty_geometry(shape: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """Field values of a VisualGeometry with no visual token, to fill in: {name: [B, S] of -1}."""
    return {f.name: torch.full(shape, -1, dtype=torch.long, device=device) for f in fields(VisualGeometry)}


class VLMAdapter:
    """Locates the parts of one model instance; subclasses implement one family."""

    #: the HF model classes this adapter handles
    model_classes: tuple[type[nn.Module], ...] = ()
    #: rotary id axes per token: 1 (plain RoPE) or 3 (M-RoPE: temporal, height, width)
    rope_axes: int = 1
    #: whether compacting positions has a defined rule (renumber the 1-D position of the kept
    #: tokens); False where tokens carry multi-axis rotary ids (M-RoPE), which keep their ids
    compact_positions: bool = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_classes)

    # -- modules -------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module that receives `input_ids` and scatters image features."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack: embed_tokens, layers, norm, rotary_emb."""
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
        raise NotImplementedError

    @property
    def projector(self) -> nn.Module:
        raise NotImplementedError

    @property
    def vision_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def vision_cls_offset(self) -> int:
        """Index of visual token 0 among the tower's tokens of an image; raises a clear error when
        the tower has no [CLS] token (methods that score by [CLS] attention cannot run)."""
        raise NotImplementedError

    def tower_layout(self) -> TowerLayout:
        """How the tower's tokens map to image tokens (in-tower pruning). Raises a clear error for a
        family whose tower cannot be pruned between its layers."""
        raise ValueError(
            f"pruning inside the vision tower is not supported for {type(self.model).__name__}; "
            "use a method that prunes at the LLM input or inside the LLM."
        )

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
    def fixed_grid(self) -> tuple[int, int] | None:
        """(rows, cols) shared by every image, or None when images have their own grids."""
        return None

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
            raise ValueError(f"{type(self.model).__name__} forward needs input_ids or inputs_embeds.")
        embedding = self.model.get_input_embeddings()
        image_embed = embedding(torch.tensor(self.image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embed).all(-1)

    # -- images ------------------------------------------------------------------------
    def check_inputs(self, kwargs: dict[str, Any]) -> None:
        """Raise a clear error for inputs of the multimodal model the runtime cannot prune."""

    def visual_geometry(self, visual: torch.Tensor, rope: torch.Tensor | None) -> VisualGeometry:
        """Per visual token its image, crop, row and column. visual: [B, S] bool real image
        tokens; rope: [B, S, R] the rotary ids the model gave the tokens (`split_position_ids`), or None."""
        raise NotImplementedError

    def take_visual_additions(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Per-visual-token additions the language model makes to its hidden states after its first
        layers (Qwen3-VL's deepstack), removed from the language model's call kwargs so that the
        runtime adds them to the tokens each layer really holds. Returns (mask [B, S] bool of the
        tokens the rows belong to, in flattened order; rows [N, d] added after layer i, per i)."""
        return None, []

    # -- positions -----------------------------------------------------------------------
    def split_position_ids(self, position_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(text [B, S] or None, rotary ids [B, S, R] or None) from the position ids the language
        model received; None where the model's own default applies."""
        if position_ids is not None and position_ids.ndim != 2:
            raise ValueError(f"atp runtime supports 2D position_ids [batch, seq], got {position_ids.ndim}D.")
        return position_ids, None

    def language_position_ids(self, given: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        """The position ids to hand the language model: given (as received, may be None) and the
        runtime's text positions text [B, S]."""
        return text

    def rotary(
        self, hidden: torch.Tensor, position: torch.Tensor, rope: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B, S, hd], for tokens with text positions position [B, S] and rotary
        ids rope [B, S, R] (None: the text position on every axis)."""
        return self.rotary_emb(hidden, position)
