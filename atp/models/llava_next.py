"""Adapters for HF `LlavaNextForConditionalGeneration` and `LlavaOnevisionForConditionalGeneration`.

Both turn an image into a base view (the whole image at the tower's resolution) followed by an
"anyres" grid of crops, merged into one grid, unpadded to the image's aspect ratio, and closed
row by row with an `image_newline` token (a single-crop image: its base view and one newline).
All of these tokens share the image token id. LLaVA-OneVision resamples (bilinearly) an
unpadded grid larger than `anyres_max_N` crops.

The token layout is read, not re-derived: the model's own `pack_image_features` runs on index
tensors (each tower output replaced by its (crop, row, col), the newline by -1), so every image
placeholder token learns which crop and patch it is, or that it is a newline. A token whose
indices come out fractional was resampled from several patches (OneVision): the image's anyres
tokens are then described as one resampled grid (crop 1, its own rows and columns) with no
single tower output (`view` -1).

`generate` (transformers 5) encodes the images before it calls the model and drops `image_sizes`
from the call, so the adapter also reads them where the images are encoded: a per-instance
wrapper around this model's `get_image_features` (signature kept, removed by `atp.remove`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches as next_num_patches
from transformers.models.llava_onevision.modeling_llava_onevision import (
    image_size_to_num_patches as onevision_num_patches,
)

from atp.models.adapter import VisualGeometry
from atp.models.llava import LlavaAdapter

#: columns of a packed token table: tower view, crop, row, col, rows, cols, image, structural
VIEW, CROP, ROW, COL, ROWS, COLS, IMAGE, STRUCTURAL = range(8)


class LlavaNextAdapter(LlavaAdapter):
    """Locates the parts of one LLaVA-NeXT model instance and reads its anyres token layout."""

    model_classes = (LlavaNextForConditionalGeneration,)

    def __init__(self, model) -> None:
        super().__init__(model)
        self._tokens: torch.Tensor | None = None  # [T, 8] long per image placeholder of this forward
        self._encoded: torch.Tensor | None = None  # the table of the images get_image_features encoded last

    @property
    def fixed_grid(self) -> None:
        return None

    def tower_layout(self):
        """Refused: the tower runs every image as several crops (base view and anyres grid) that the
        model then unpads and, on OneVision, may resample; one cut per tower input would set a
        budget per crop and map its survivors through the unpadding, which no rule here defines."""
        raise ValueError(
            f"pruning inside the vision tower is not supported for {type(self.model).__name__}: the tower runs "
            "each image as several crops (base view and anyres grid) that the model unpads before the LLM. Use a "
            "method that prunes at the LLM input or inside the LLM."
        )

    # -- reading the layout ----------------------------------------------------------------
    def instance_hooks(self) -> list[Any]:
        return [InstanceMethodWrapper(self.model.model, "get_image_features", self._record_encoding)]

    def _record_encoding(self, arguments: dict[str, Any]) -> None:
        """Called with the arguments of every `get_image_features` call: the table of those images."""
        options = {**arguments.pop("kwargs", {}), **arguments}
        self._encoded = self.token_table(options["image_sizes"], options)

    def read_inputs(self, kwargs: dict[str, Any]) -> None:
        """Check the inputs and find the token table of this forward's images: packed from its
        `image_sizes`, or (images encoded beforehand, as `generate` does) the table recorded when
        they were encoded, checked against the encoded features' lengths."""
        self.check_inputs(kwargs)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is not None:
            if kwargs.get("image_sizes") is None:
                raise ValueError(
                    f"{type(self.model).__name__} was given images without image_sizes; pass the image_sizes "
                    "its processor returns (each image's (height, width))."
                )
            self._tokens = self.token_table(kwargs["image_sizes"], kwargs)
        elif encoded is not None:
            lengths = [int(features.shape[0]) for features in encoded.pooler_output]
            table = self._encoded
            if table is None or torch.bincount(table[:, IMAGE]).tolist() != lengths:
                raise ValueError(
                    f"{type(self.model).__name__} was given encoded images (mm_encoder_outputs) of {lengths} tokens "
                    "that do not match what this model's get_image_features encoded last under the atp runtime "
                    "(encoded elsewhere, or repeated by generate's num_beams / num_return_sequences > 1, which "
                    "the runtime does not support for this family). Pass pixel_values and image_sizes, one "
                    "sequence per prompt."
                )
            self._tokens = table
        else:
            self._tokens = None

    def _select_strategy(self, kwargs: dict[str, Any]) -> str:
        return kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy

    def _check_strategy(self, kwargs: dict[str, Any]) -> None:
        """The tower's outputs after feature selection must be exactly its patch grid."""
        embeddings = self.vision_transformer.embeddings
        has_cls = getattr(embeddings, "class_embedding", None) is not None
        strategy = self._select_strategy(kwargs)
        if has_cls != (strategy == "default"):
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} with a tower {'with' if has_cls else 'without'} a "
                "[CLS] token leaves features that are not the tower's patch grid, which anyres packing needs. "
                f"Use {'default' if has_cls else 'full'!r}."
            )

    def num_views(self, image_sizes: torch.Tensor, kwargs: dict[str, Any]) -> list[int]:
        """Tower inputs (base view + crops) per image, as the model's `get_image_features` counts them."""
        config = self.model.config
        return [
            next_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=self.crop_size)
            for size in image_sizes
        ]

    def pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor, kwargs):
        """The model's own `pack_image_features` on features [views, patches, k] per image."""
        packed, _ = self.model.model.pack_image_features(
            features, image_sizes, self._select_strategy(kwargs), image_newline=newline
        )
        return packed

    @property
    def crop_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def patch_grid(self) -> int:
        """Rows (= columns) of tower patches per view."""
        return self.crop_size // int(self.model.config.vision_config.patch_size)

    def token_table(self, image_sizes: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """[T, 8] long: for every image placeholder token of the batch (images in order, as the model
        scatters their features) its tower view, crop, row, col, grid rows, grid cols, image, and
        whether it is structural (1; then view to cols are -1)."""
        self._check_strategy(kwargs)
        side = self.patch_grid
        views = self.num_views(image_sizes, kwargs)
        patch = torch.arange(side * side, dtype=torch.float64)
        features = []
        for count in views:  # per view and patch: (crop, row, col)
            crop = torch.arange(count, dtype=torch.float64)[:, None].expand(count, side * side)
            features.append(torch.stack([crop, (patch // side).expand_as(crop), (patch % side).expand_as(crop)], -1))
        newline = torch.full((3,), -1.0, dtype=torch.float64)
        with torch.no_grad():
            packed = self.pack(features, image_sizes.cpu(), newline, kwargs)
        tables, first_view = [], 0
        for image, (values, count) in enumerate(zip(packed, views)):
            tables.append(describe_packed(values, image, first_view, side))
            first_view += count
        return torch.cat(tables).to(image_sizes.device)

    # -- answering the runtime -------------------------------------------------------------
    def _table_for(self, placeholders: torch.Tensor) -> torch.Tensor:
        table = self._tokens
        count = int(placeholders.sum())
        if table is None:
            if count:
                raise ValueError(
                    f"{count} image tokens but no images in this {type(self.model).__name__} forward: pass "
                    "pixel_values and image_sizes with the input_ids their processor built."
                )
            return torch.zeros(0, 8, dtype=torch.long, device=placeholders.device)
        if table.shape[0] != count:
            raise ValueError(
                f"the input_ids hold {count} image tokens, but the anyres layout of the images (from their "
                f"image_sizes) has {table.shape[0]}. Build input_ids, pixel_values and image_sizes together "
                "with the model's processor."
            )
        return table.to(placeholders.device)

    def structural_tokens(self, placeholders: torch.Tensor) -> torch.Tensor:
        """The `image_newline` tokens among the image placeholders."""
        table = self._table_for(placeholders)
        structural = torch.zeros_like(placeholders)
        structural[placeholders] = table[:, STRUCTURAL].bool()
        return structural

    def visual_geometry(self, visual: torch.Tensor, rope: torch.Tensor | None) -> VisualGeometry:
        """visual: [B, S] bool content tokens (image placeholders less the newline tokens), in the
        order the model scatters its image features into them."""
        table = self._tokens
        content = (
            table[table[:, STRUCTURAL] == 0].to(visual.device)
            if table is not None
            else torch.zeros(0, 8, dtype=torch.long, device=visual.device)
        )
        if content.shape[0] != int(visual.sum()):
            raise ValueError(
                f"{int(visual.sum())} visual tokens, but the images' anyres layout has {content.shape[0]} "
                "content tokens. Build input_ids, pixel_values and image_sizes with the model's processor."
            )
        columns = {"image": IMAGE, "crop": CROP, "row": ROW, "col": COL, "rows": ROWS, "cols": COLS, "view": VIEW}
        values = {}
        for name, column in columns.items():
            value = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
            value[visual] = content[:, column]
            values[name] = value
        return VisualGeometry(**values)

    def check_inputs(self, kwargs: dict[str, Any]) -> None:
        """LLaVA-NeXT has no video inputs; nothing to refuse beyond the layout checks."""


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: NeXT's layout, plus `anyres_max_N` resampling, a SigLIP tower without [CLS]
    and several images per sample (`batch_num_images`: then each image is its base view only)."""

    model_classes = (LlavaOnevisionForConditionalGeneration,)

    def check_inputs(self, kwargs: dict[str, Any]) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if any(kwargs.get(name) is not None for name in ("pixel_values_videos", "image_sizes_videos")) or (
            encoded.get("video") is not None
        ):
            raise ValueError(
                f"the atp runtime prunes image tokens; this {type(self.model).__name__} input holds a video. "
                "Pass images only (e.g. a video's frames as images)."
            )

    def vision_cls_offset(self) -> int:
        embeddings = self.vision_transformer.embeddings
        if getattr(embeddings, "class_embedding", None) is None:
            raise ValueError(
                "this method reads the vision tower's attention per image with its [CLS] token first, but "
                f"{type(self.model).__name__}'s tower ({type(self.vision_tower).__name__}) has no [CLS] token. Use a "
                "method that does not need one (fastv, pdrop, sparsevlm, divprune, random, spatial, fitprune, atp)."
            )
        return super().vision_cls_offset()

    def num_views(self, image_sizes: torch.Tensor, kwargs: dict[str, Any]) -> list[int]:
        """As the model's `get_image_features`: with `batch_num_images`, images of samples holding
        several images are their base view only."""
        config = self.model.config
        per_sample = kwargs.get("batch_num_images")
        patched = [True] * len(image_sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
        return [
            onevision_num_patches(
                image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=self.crop_size
            )
            if anyres
            else 1
            for size, anyres in zip(image_sizes, patched)
        ]

    def pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor, kwargs):
        ratio = kwargs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.model.model.pack_image_features(
            features, image_sizes, image_newline=newline, vision_aspect_ratio=ratio
        )
        return packed


class InstanceMethodWrapper:
    """Wraps method `name` of one module instance: `record(arguments)` sees the bound arguments of
    every call, then the method runs as before. The wrapper keeps the method's signature (transformers'
    `generate` reads it); `remove()` restores the instance."""

    def __init__(self, owner: Any, name: str, record) -> None:
        self.owner, self.name = owner, name
        self.had_own = name in vars(owner)
        self.previous = vars(owner).get(name)
        method = getattr(owner, name)
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            record(dict(signature.bind(*args, **kwargs).arguments))
            return method(*args, **kwargs)

        setattr(owner, name, wrapper)

    def remove(self) -> None:
        if self.had_own:
            setattr(self.owner, self.name, self.previous)
        else:
            vars(self.owner).pop(self.name, None)


def describe_packed(values: torch.Tensor, image: int, first_view: int, side: int) -> torch.Tensor:
    """[n, 8] long rows of the token table for one image's packed index tensor values [n, 3]
    ((crop, row, col) per token, -1 for a newline); first_view: the image's first tower view;
    side: patches per crop side."""
    structural = (values == -1).all(1)
    table = torch.full((values.shape[0], 8), -1, dtype=torch.long)
    table[:, STRUCTURAL] = structural.long()
    content = ~structural
    exact = bool((values[content] == values[content].round()).all())
    if exact:
        indices = values.round().long()
        table[content, CROP] = indices[content, 0]
        table[content, ROW] = indices[content, 1]
        table[content, COL] = indices[content, 2]
        table[content, ROWS] = side
        table[content, COLS] = side
        table[content, VIEW] = first_view + indices[content, 0]
    else:  # resampled (OneVision anyres_max_N): the base view is exact, the anyres part one new grid
        base = content & (values[:, 0] == 0) & (torch.arange(values.shape[0]) < side * side)
        table[base, CROP] = 0
        table[base, ROW] = values[base, 1].round().long()
        table[base, COL] = values[base, 2].round().long()
        table[base, ROWS] = table[base, COLS] = side
        table[base, VIEW] = first_view
        grid = content & ~base
        row = structural.long().cumsum(0) - structural.long()  # newlines before each token
        rows = int(structural.sum())
        positions = torch.arange(values.shape[0])
        start = torch.zeros(rows + 1, dtype=torch.long).scatter_reduce(
            0, row[grid], positions[grid], "amin", include_self=False
        )
        table[grid, CROP] = 1
        table[grid, ROW] = row[grid]
        table[grid, COL] = positions[grid] - start[row[grid]]
        table[grid, ROWS] = rows
        table[grid, COLS] = int(grid.sum()) // max(rows, 1)
    table[:, IMAGE] = image
    return table
