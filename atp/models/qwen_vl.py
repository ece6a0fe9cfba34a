"""Adapter for HF `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` and
`Qwen3VLForConditionalGeneration`.

What differs from LLaVA (transformers 5.24):
  * dynamic resolution: image i has its own grid `image_grid_thw[i] = (t, h, w)` of tower
    patches; after the 2x2 merger it becomes t x (h/2) x (w/2) visual tokens in raster order,
    between `<|vision_start|>` and `<|vision_end|>` (text tokens, never pruned);
  * M-RoPE: the language model receives rotary ids [3, B, S] (forward) or [4, B, S]
    (generate; row 0 the text position). An image token at (row, col) of an image starting
    at t0 gets (t0, t0 + row, t0 + col). Kept tokens keep these ids; decode steps use the ids
    the model computes itself from `rope_deltas`, exactly as stock HF;
  * the vision tower has no [CLS] token; it runs the patches of all images as one flattened
    sequence [N, dv] in the processor's order (per image, its 2x2 merge units in raster order,
    each unit's 4 patches in raster order) with one fused `qkv` projection, its own 2-D rotary
    embedding and attention only within each image (`cu_seqlens`); Qwen2.5-VL reorders the merge
    units window by window before the first block and attends within each window except in
    `fullatt_block_indexes`. `tower_attention` reads a layer's q/k from per-instance hooks (the
    qkv output, the block's cu_seqlens and rotary tables) and hands them back per image in the
    processor's order, each token tagged with its window;
  * Qwen3-VL (deepstack) adds visual features from several tower depths to the visual tokens
    after LM layers 0..k-1; the runtime adds each row to its token wherever the token sits
    (`take_visual_additions`), so dropped tokens drop their deepstack rows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_window_index

from atp.models.adapter import TowerAttention, VisualGeometry, VLMAdapter, empty_geometry


class QwenVLAdapter(VLMAdapter):
    """Locates the parts of one Qwen2-VL, Qwen2.5-VL or Qwen3-VL model instance."""

    model_classes = (
        Qwen2VLForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )
    rope_axes = 3
    compact_positions = False  # no defined rule for renumbering (t, h, w) ids [ours]

    # -- modules -------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def projector(self) -> nn.Module:
        """The patch merger: 2x2 tower patches [4 * dv] -> one LLM embedding [d]."""
        return self.model.model.visual.merger

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.model.model.visual.blocks

    def vision_attention(self, index: int) -> nn.Module:
        """Block `index`'s attention: a fused `qkv` Linear [dv -> 3 * dv], `num_heads`, `head_dim`, `scaling`."""
        return self.vision_layers[index].attn

    def vision_attention_hooks(self, index: int, record: Callable[[str, Any], None]) -> list[Any]:
        """Record, while the tower runs: its `grid_thw` (and whether the caller handed it a precomputed
        window order, which is refused), the block's `cu_seqlens` and rotary tables
        `position_embeddings` (cos, sin) [N, hd] as the block's attention receives them, and the fused
        projection's output `qkv` [N, 3 * dv]; all in the tower's sequence order (Qwen2.5-VL: window order)."""
        attention = self.vision_attention(index)

        def read_tower(_module, args, kwargs):
            record("grid_thw", kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])
            if kwargs.get("window_index") is not None or kwargs.get("cu_window_seqlens") is not None:
                record("precomputed_windows", True)

        def read_attention(_module, args, kwargs):
            record("cu_seqlens", kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1])
            record("rotary", kwargs.get("position_embeddings", args[2] if len(args) > 2 else None))

        return [
            self.vision_tower.register_forward_pre_hook(read_tower, with_kwargs=True),
            attention.register_forward_pre_hook(read_attention, with_kwargs=True),
            attention.qkv.register_forward_hook(lambda _m, _i, output: record("qkv", output)),
        ]

    def tower_attention(self, index: int, parts: dict[str, Any]) -> TowerAttention:
        """Per image, q/k [H, T_i, hd] of block `index` as it attends with them (the qkv output split
        into heads, the tower's own `apply_rotary_pos_emb_vision` with the block's cos / sin), its
        patches in the processor's order (Qwen2.5-VL's window order undone), and each patch's
        attention group: its segment of the block's `cu_seqlens` (the image, or its window)."""
        attention = self.vision_attention(index)
        qkv, (cos, sin), bounds = parts["qkv"], parts["rotary"], parts["cu_seqlens"]
        length = qkv.shape[0]
        query, key, _ = qkv.reshape(length, 3, attention.num_heads, -1).unbind(1)  # [N, H, hd] each
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
        query, key = rotate(query, key, cos, sin)
        bounds = bounds[1:].to(device=qkv.device, dtype=torch.long)
        segment = torch.searchsorted(bounds, torch.arange(length, device=qkv.device), right=True)  # [N]
        if parts.get("precomputed_windows"):
            raise ValueError(
                "the vision tower was called with a precomputed window_index / cu_window_seqlens; the atp runtime "
                "reads its attention with the window order the tower computes from grid_thw. Call the model "
                "without them."
            )
        grid = parts["grid_thw"]
        order = self.tower_order(grid, length).to(qkv.device)
        query, key, segment = query[order], key[order], segment[order]
        sizes = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
        return TowerAttention(
            query=[q.transpose(0, 1) for q in query.split(sizes)],
            key=[k.transpose(0, 1) for k in key.split(sizes)],
            group=list(segment.split(sizes)),
            scale=float(attention.scaling),
        )

    def tower_order(self, grid_thw: torch.Tensor, length: int) -> torch.Tensor:
        """[N] long: for each patch in the processor's order (images one after another), its place in
        the tower's sequence. The identity, except on Qwen2.5-VL, whose tower reorders merge units
        window by window (`get_vision_window_index`, as the tower itself calls it)."""
        tower = self.vision_tower
        identity = torch.arange(length, device=grid_thw.device)
        if not hasattr(tower, "fullatt_block_indexes"):
            return identity
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=tower.spatial_merge_size,
            window_size=tower.window_size,
            patch_size=tower.patch_size,
        )
        unit = tower.spatial_merge_unit
        window_index = window_index.to(grid_thw.device)
        moved = (
            window_index[:, None] * unit + torch.arange(unit, device=grid_thw.device)
        ).flatten()  # tower -> processor
        if moved.numel() != length:
            raise RuntimeError(f"Qwen2.5-VL window order covers {moved.numel()} patches, the tower ran {length}.")
        return torch.argsort(moved)

    def tower_rows(self, geometry: VisualGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [B, S], tokens [B, S, 4]): each visual token's image and the 4 patches of its 2x2 merge
        unit, numbered in the processor's order: unit row * cols + col holds patches 4 u .. 4 u + 3."""
        image = geometry.image
        unit = self.merge_size**2
        first = geometry.token_in_crop().clamp_min(0) * unit
        tokens = first[..., None] + torch.arange(unit, device=image.device)
        return image, tokens.masked_fill(image[..., None] < 0, 0)

    def patch_pixels(self, pixel_values: torch.Tensor, geometry: VisualGeometry) -> torch.Tensor:
        """[B, S, 4 * tp, C, ph, pw]: for each visual token the pixels of its 4 tower patches, each of the
        `temporal_patch_size` (tp) frames one entry (an image's frames are copies of it); 0 on other tokens.
        pixel_values: [N, C * tp * ph * pw], the processor's rows (one per patch, images one after another
        in the order of `tower_rows`), as the tower's patch embedding views them."""
        vision = self.model.config.vision_config
        channels, frames, size = int(vision.in_channels), int(vision.temporal_patch_size), int(vision.patch_size)
        if pixel_values.ndim != 2 or pixel_values.shape[1] != channels * frames * size * size:
            raise ValueError(
                f"{type(self.model).__name__} pixel_values must be [patches, {channels * frames * size * size}] (the "
                f"processor's rows), got shape {tuple(pixel_values.shape)}."
            )
        patches = pixel_values.view(-1, channels, frames, size, size).transpose(1, 2)  # [N, tp, C, ph, pw]
        image, tokens = self.tower_rows(geometry)
        first = torch.full((int(image.max()) + 1,), -1, device=image.device, dtype=torch.long)
        visual = image >= 0
        sizes = first.scatter_reduce(
            0, image[visual], (geometry.rows * geometry.cols)[visual] * self.merge_size**2, "amax"
        )
        start = sizes.cumsum(0) - sizes  # [I] first row of each image
        if int(sizes.sum()) != patches.shape[0]:
            raise ValueError(
                f"the images of this input cover {int(sizes.sum())} tower patches, but pixel_values has "
                f"{patches.shape[0]} rows; build both with the model's processor."
            )
        rows = (start[image.clamp_min(0)][..., None] + tokens).clamp(0, patches.shape[0] - 1)  # [B, S, 4]
        values = patches[rows].flatten(2, 3)  # [B, S, 4 * tp, C, ph, pw]
        return values.masked_fill(~visual[..., None, None, None, None], 0.0)

    def vision_cls_offset(self) -> int:
        raise ValueError(
            "this method reads the vision tower's attention per image with its [CLS] token first, but "
            f"{type(self.model).__name__}'s vision tower has no [CLS] token (its patches go straight to the 2x2 "
            "merger). Use a method that does not need one (fastv, pdrop, sparsevlm, divprune, random, fitprune)."
        )

    def tower_layout(self):
        raise ValueError(
            f"pruning inside the vision tower is not supported for {type(self.model).__name__}: its tower runs "
            "the patches of all images as one flattened sequence (cu_seqlens, windowed attention in Qwen2.5-VL), "
            "has no [CLS] token, and merges 2x2 patches into one image token after its last layer. Use a method "
            "that prunes at the LLM input or inside the LLM with this model."
        )

    # -- images ------------------------------------------------------------------------
    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def check_inputs(self, kwargs: dict[str, Any]) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if any(kwargs.get(name) is not None for name in ("pixel_values_videos", "video_grid_thw")) or (
            encoded.get("video") is not None
        ):
            raise ValueError(
                f"the atp runtime prunes image tokens; this {type(self.model).__name__} input holds a video. "
                "Pass images only (e.g. a video's frames as images)."
            )
        input_ids, grid_thw = kwargs.get("input_ids"), kwargs.get("image_grid_thw")
        if input_ids is not None and grid_thw is not None:
            check_image_tokens(input_ids == self.image_token_id, grid_thw, self.merge_size)

    def visual_geometry(self, visual: torch.Tensor, rope: torch.Tensor | None) -> VisualGeometry:
        """Read from the M-RoPE ids the model computed from `image_grid_thw`: a contiguous run of
        image tokens is one image (as in the model's own `get_rope_index`), its first token has ids
        (t0, t0, t0) and the token at (row, col) has height id t0 + row and width id t0 + col."""
        values = empty_geometry(tuple(visual.shape), visual.device)
        if not bool(visual.any()):
            return VisualGeometry(**values)
        if rope is None:
            raise ValueError(
                f"{int(visual.sum())} image tokens but no M-RoPE position ids: call the model with "
                "pixel_values, image_grid_thw and mm_token_type_ids (as its processor returns them)."
            )
        flat = visual.flatten()
        where = flat.nonzero()[:, 0]
        image = image_runs(visual)[where]
        height, width = rope[..., 1].flatten()[where], rope[..., 2].flatten()[where]
        first = torch.full((int(image.max()) + 1,), flat.numel(), device=where.device)
        first = first.scatter_reduce(0, image, where, "amin")  # [I] first flat position of each image
        row = height - rope[..., 1].flatten()[first][image]
        col = width - rope[..., 2].flatten()[first][image]
        rows = torch.zeros_like(first).scatter_reduce(0, image, row + 1, "amax")[image]
        cols = torch.zeros_like(first).scatter_reduce(0, image, col + 1, "amax")[image]
        fill = {"image": image, "crop": torch.zeros_like(image), "row": row, "col": col, "rows": rows, "cols": cols}
        for name, value in fill.items():
            values[name].view(-1)[where] = value
        return VisualGeometry(**values)

    def take_visual_additions(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Qwen3-VL's deepstack: `deepstack_visual_embeds[i]` ([N, d], one row per token of
        `visual_pos_masks`) is added to the visual tokens after LM layer i."""
        mask = kwargs.pop("visual_pos_masks", None)
        rows = kwargs.pop("deepstack_visual_embeds", None)
        return mask, list(rows) if rows is not None else []

    # -- positions -----------------------------------------------------------------------
    def split_position_ids(self, position_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """[4, B, S] (generate: text row, then 3 rotary rows), [3, B, S] (forward: rotary rows only),
        [B, S] (text position on every axis) or None (the model's default: the same)."""
        if position_ids is None or position_ids.ndim == 2:
            return position_ids, None
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:
            return position_ids[0], position_ids[1:].permute(1, 2, 0)
        if position_ids.ndim == 3 and position_ids.shape[0] == 3:
            return None, position_ids.permute(1, 2, 0)
        raise ValueError(
            f"{type(self.model).__name__} position_ids must be [B, S], [3, B, S] or [4, B, S]; "
            f"got shape {tuple(position_ids.shape)}."
        )

    def language_position_ids(self, given: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        return given if given is not None else text

    def rotary(
        self, hidden: torch.Tensor, position: torch.Tensor, rope: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = rope.permute(2, 0, 1) if rope is not None else position  # [3, B, S] (2D: every axis)
        return self.rotary_emb(hidden, ids)


def image_runs(visual: torch.Tensor) -> torch.Tensor:
    """[B * S] long: for every position of visual [B, S] (flattened sample by sample) the number of
    the run of consecutive image tokens it belongs to, counted over the batch (-1 before the first
    run; meaningful on image tokens). A run never continues into the next sample."""
    previous = torch.zeros_like(visual)
    previous[:, 1:] = visual[:, :-1]
    starts = visual & ~previous  # a run of image tokens starts here
    return starts.flatten().long().cumsum(0) - 1


def check_image_tokens(image_mask: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> None:
    """Raise a clear error unless the runs of image tokens in image_mask [B, S] hold, in order,
    exactly t * h * w / merge**2 tokens for each image of grid_thw [I, 3]."""
    expected = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2] // merge**2).tolist()
    runs = image_runs(image_mask)[image_mask.flatten()]
    found = torch.bincount(runs).tolist() if runs.numel() else []
    if found != expected:
        raise ValueError(
            f"the image tokens do not match image_grid_thw {grid_thw.tolist()}: it describes images of "
            f"{expected} tokens (t * h * w / {merge**2} each), the input_ids hold runs of {found} image tokens. "
            "Build input_ids and image_grid_thw together with the model's processor, one run of image tokens "
            "(between <|vision_start|> and <|vision_end|>) per image."
        )
