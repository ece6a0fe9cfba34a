"""Adapter for HF `InternVLForConditionalGeneration` (InternVL3 / InternVL3.5 layout).

What differs from LLaVA (transformers 5.24):
  * an image is 1-12 tiles plus, when it has more than one tile, a thumbnail of the whole
    image, which the processor places last; every tile is one input of the vision tower
    (`pixel_values` [tiles, 3, H, W], the tiles of all images of the batch in order) and
    becomes `T` visual tokens (256 for InternVL3's 448 px tiles), one run of `<IMG_CONTEXT>`
    tokens per image between `<img>` and `</img>` (text tokens, never pruned);
  * a pixel shuffle merges each 2x2 block of tower patches into one visual token (channels
    concatenated), so visual token (row, col) of a tile covers 4 tower patches;
  * the tower (InternViT) has a [CLS] token (`embeddings.cls_token`) before the patches, which
    `vision_feature_select_strategy="default"` drops; its attention module is
    `encoder.layer[i].attention`, with optional RMS norms on the full q/k projections
    (`use_qk_norm`, InternViT-6B) applied before the heads are split;
  * plain 1-D RoPE positions: the text backbone (Qwen2 for InternVL3, Qwen3 for InternVL3.5,
    Llama-style) keeps the standard layer layout; Qwen2's q/k/v biases live in the projections
    the runtime hooks, Qwen3's per-head q/k norms are applied by the runtime's probe, and
    sliding windows are read from the text config as for every family.

The order of a tile's visual tokens and the patches each holds are not re-derived: the adapter
runs the model's own `pixel_shuffle` on a tensor of patch indices (`tile_patches`).
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration

from atp.models.adapter import VisualGeometry, VLMAdapter, empty_geometry
from atp.models.qwen_vl import image_runs


class InternVLAdapter(VLMAdapter):
    """Locates the parts of one InternVL model instance."""

    model_classes = (InternVLForConditionalGeneration,)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        attention = self.layers[0].self_attn
        if getattr(attention, "sinks", None) is not None:
            raise ValueError(
                f"InternVL's language model ({type(self.language_model).__name__}) uses attention sinks, which the "
                "atp runtime's attention probes do not model (their rows would not sum as the model's do). "
                "Supported InternVL text backbones: Qwen2 (InternVL3), Qwen3 (InternVL3.5) and Llama-style decoders."
            )

    # -- modules -------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        """The multimodal projector: pixel-shuffled features [..., 4 * dv] -> LLM embeddings [..., d]."""
        return self.model.model.multi_modal_projector

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layer

    def vision_attention(self, index: int) -> nn.Module:
        return self.vision_layers[index].attention

    def vision_query_key(self, index: int, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InternViT normalises the whole q/k projection (RMSNorm over H * hd, `use_qk_norm`)
        before splitting heads; identity modules when the tower has no q/k norm."""
        attention = self.vision_attention(index)
        return attention.q_norm(query), attention.k_norm(key)

    def vision_cls_offset(self) -> int:
        """1: the [CLS] token (`embeddings.cls_token`) precedes the patches of every tile."""
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"InternVL with vision_feature_select_strategy={strategy!r} keeps the [CLS] token among its "
                "image features, which the pixel shuffle cannot square; use the model's default ('default')."
            )
        return 1

    def tower_layout(self):
        """Refused: each LLM token is one 2x2 pixel-shuffle block of tower patches (of a tile), so a
        cut between tower layers would have to keep or remove whole blocks; no rule here defines that."""
        raise ValueError(
            f"pruning inside the vision tower is not supported for {type(self.model).__name__}: each image token "
            "is a pixel shuffle of 2x2 tower patches of one tile, which a cut between tower layers would split. "
            "Use a method that prunes at the LLM input or inside the LLM."
        )

    # -- tiles ---------------------------------------------------------------------------
    @cached_property
    def tile_patches(self) -> torch.Tensor:
        """[T, k*k] long: for each visual token of a tile, in the order the language model receives
        them, the raster indices (among the tile's patches, [CLS] not counted) of the tower patches
        it holds, in the order the pixel shuffle concatenates them. Computed by running the model's
        own reshape and `pixel_shuffle` (InternVLModel.get_image_features) on patch indices."""
        vision = self.model.config.vision_config
        height, width = (int(vision.image_size[i]) // int(vision.patch_size[i]) for i in (0, 1))
        if height != width:
            raise ValueError(
                f"InternVL tiles of {height} x {width} patches: the model's feature path assumes square tiles."
            )
        index = torch.arange(height * width, dtype=torch.float64).reshape(1, height, width, 1)
        shuffled = self.model.model.pixel_shuffle(index, scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(shuffled.shape[1] * shuffled.shape[2], -1).round().long()

    @cached_property
    def tile_grid(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(row [T], col [T], rows, cols): each visual token's place in its tile's grid of visual
        tokens, read from the patches it holds (the block of k x k patches at patch row
        k * row, column k * col)."""
        patches = self.tile_patches
        side = math.isqrt(patches.numel())
        factor = math.isqrt(patches.shape[1])
        row = (patches // side).amin(1) // factor
        col = (patches % side).amin(1) // factor
        rows = cols = side // factor
        if sorted((row * cols + col).tolist()) != list(range(rows * cols)):
            raise RuntimeError("InternVL's pixel shuffle did not map patch blocks one-to-one onto visual tokens.")
        return row, col, rows, cols

    @cached_property
    def number_at(self) -> torch.Tensor:
        """[T] long: the number (in the model's order) of the visual token at each raster index
        row * cols + col of the tile's grid."""
        row, col, _, cols = self.tile_grid
        number = torch.empty_like(row)
        number[row * cols + col] = torch.arange(len(row))
        return number

    @property
    def tokens_per_tile(self) -> int:
        return int(self.tile_patches.shape[0])

    # -- images ------------------------------------------------------------------------
    def check_inputs(self, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            return
        visual = input_ids == self.image_token_id
        runs = image_runs(visual)[visual.flatten()]
        lengths = torch.bincount(runs).tolist() if runs.numel() else []
        per_tile = self.tokens_per_tile
        if any(length % per_tile for length in lengths):
            raise ValueError(
                f"InternVL image tokens come in runs of {lengths} tokens, but every tile gives {per_tile} "
                "(image_size / patch_size)^2 * downsample_ratio^2. Build input_ids with the model's processor: "
                "one run of <IMG_CONTEXT> tokens (between <img> and </img>) per image, tiles x tokens per tile long."
            )
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is not None and pixel_values.shape[0] * per_tile != sum(lengths):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} tiles ({pixel_values.shape[0] * per_tile} visual tokens) "
                f"but input_ids hold {sum(lengths)} image tokens; build both with the model's processor."
            )

    def visual_geometry(self, visual: torch.Tensor, rope: torch.Tensor | None) -> VisualGeometry:
        """A run of image tokens is one image (the processor wraps each in <img> ... </img>); its
        tokens are its tiles one after another (thumbnail last), T tokens each in the order
        `tile_patches` gives; crop = the tile's number within its image."""
        values = empty_geometry(tuple(visual.shape), visual.device)
        if not bool(visual.any()):
            return VisualGeometry(**values)
        flat = visual.flatten()
        where = flat.nonzero()[:, 0]
        image = image_runs(visual)[where]
        first = torch.full((int(image.max()) + 1,), flat.numel(), device=where.device)
        first = first.scatter_reduce(0, image, where, "amin")  # [I] first flat position of each image
        within = where - first[image]  # a run is contiguous: the token's number within its image
        per_tile = self.tokens_per_tile
        row, col, rows, cols = self.tile_grid
        token = (within % per_tile).cpu()
        fill = {
            "image": image,
            "crop": within // per_tile,
            "row": row[token].to(visual.device),
            "col": col[token].to(visual.device),
            "rows": torch.full_like(image, rows),
            "cols": torch.full_like(image, cols),
        }
        for name, value in fill.items():
            values[name].view(-1)[where] = value
        return VisualGeometry(**values)

    def tile_of(self, geometry: VisualGeometry) -> torch.Tensor:
        """[B, S] long: the tower input (row of `pixel_values`) each visual token came from: the
        tiles of earlier images (over the batch, in order), then its crop; -1 elsewhere. geometry:
        the prefill's geometry at original positions (every visual token present)."""
        visual = geometry.image >= 0
        image, crop = geometry.image[visual], geometry.crop[visual]
        if image.numel() == 0:
            return torch.full_like(geometry.image, -1)
        tiles = torch.zeros(int(image.max()) + 1, dtype=torch.long, device=image.device)
        tiles = tiles.scatter_reduce(0, image, crop + 1, "amax")  # [I] tiles per image
        before = tiles.cumsum(0) - tiles
        out = torch.full_like(geometry.image, -1)
        out[visual] = before[image] + crop
        return out

    def tower_rows(self, geometry: VisualGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile [B, S], tokens [B, S, 4]): each visual token's tower input and the tower tokens
        ([CLS] at 0, so patch p is token p + 1) of the 2x2 patches it holds; -1 / 0 elsewhere."""
        tile = self.tile_of(geometry)
        number = self.number_at.to(tile.device)[geometry.token_in_crop().clamp_min(0)]
        patches = self.tile_patches.to(tile.device)[number]  # [B, S, 4]
        return tile, (patches + self.vision_cls_offset()).masked_fill(tile[..., None] < 0, 0)

    def projector_rows(self, geometry: VisualGeometry, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile [B, S], row [B, S]): each visual token's row in the projector input [tiles, T, 4 * dv]
        (the pixel-shuffled features, one row per visual token in the model's order)."""
        if length != self.tokens_per_tile:
            raise ValueError(f"InternVL projector input has {length} rows per tile, expected {self.tokens_per_tile}.")
        tile = self.tile_of(geometry)
        number = self.number_at.to(tile.device)[geometry.token_in_crop().clamp_min(0)]
        return tile, number.masked_fill(tile < 0, 0)
