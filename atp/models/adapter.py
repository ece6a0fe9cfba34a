"""The adapter contract: what the family-agnostic runtime needs to know about one VLM family.

Every supported family keeps a decoder stack with Llama-style layers
(`layers[i].self_attn.{q,k,v,o}_proj`, `layers[i].input_layernorm`, `layers[i].mlp`, `norm`,
`rotary_emb`);
what differs is how images become tokens and how positions work. An adapter answers:

  * where the parts are (multimodal model, language model, layers, vision tower, projector);
  * which input tokens are visual, and for each visual token its image, crop, row and column
    (`visual_geometry`), instead of one fixed image grid;
  * which image placeholder tokens are structural (`structural_tokens`: LLaVA-NeXT's
    `image_newline`), which the runtime never prunes nor counts as visual tokens, and what of
    the multimodal model's call inputs it needs to know that (`read_inputs`);
  * whether the vision tower has a [CLS] token (`vision_cls_offset` raises when it has none),
    how to read its q/k as each layer attends with them (`vision_attention_hooks` capture a
    layer's parts, `tower_attention` turns them into per-tower-input q/k with their attention
    groups; `vision_query_key` for q/k norms), and which tower tokens and projector-input rows
    each visual token covers (`tower_rows`, `projector_rows`: one per token on LLaVA, a crop's
    own outputs on LLaVA-NeXT, 2 x 2 patches on InternVL and Qwen-VL);
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

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

import torch
from torch import nn

#: the keyword inputs of a supported model's forward that travel with a batch: the text, the images
#: and what each family needs to lay them out (LLaVA-NeXT: image_sizes; Qwen-VL: image_grid_thw,
#: mm_token_type_ids; OneVision: batch_num_images)
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_sizes",
    "batch_num_images",
    "image_grid_thw",
    "mm_token_type_ids",
)


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
    view:  row of the vision tower's input batch (one image or one crop) whose output the token
           is, counted over the batch; None when that is `image` (one view per image); -1 on a
           visual token that is no single tower output (LLaVA-OneVision's resampled grid)

    For multi-crop families `row` and `col` are the token's place in its crop's tower patch grid,
    so `token_in_crop()` is its index among that crop's tower outputs.
    """

    image: torch.Tensor
    crop: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    view: torch.Tensor | None = None

    def gather(self, index: torch.Tensor, visual: torch.Tensor) -> VisualGeometry:
        """The geometry of the tokens in slots: index [B, S'] original positions, visual [B, S']
        bool slots holding a (real) visual token; -1 in every other slot."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = None if value is None else torch.where(visual, torch.gather(value, 1, index), -1)
        return VisualGeometry(**values)

    def tower_view(self) -> torch.Tensor:
        """[B, S] long row of the vision tower's input batch each visual token came from; -1 elsewhere."""
        return self.image if self.view is None else self.view

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


@dataclass(frozen=True)
class TowerAttention:
    """The q/k of one vision-tower layer as it attends with them, per tower input (the rows of the
    tower's batch: an image, or a crop / tile; `tower_rows` names them and their tokens).

    query, key: per tower input, [H, T_i, hd], its tokens numbered as `tower_rows` numbers them
                ([CLS] first where the tower has one), q/k norms and rotary embeddings applied
    group:      per tower input, [T_i] long attention group of each token: a query attends only to
                the keys of its own group (Qwen2.5-VL's windows); None where every token of the input
                attends to every other
    scale:      the factor on q.k before the softmax
    """

    query: list[torch.Tensor]
    key: list[torch.Tensor]
    group: list[torch.Tensor | None]
    scale: float

    def __len__(self) -> int:
        return len(self.query)

    def probabilities(self, item: int, rows: slice | None = None) -> torch.Tensor:
        """[H, Q, T_i] float32 attention probabilities of tower input `item` (the query rows `rows`,
        default all): softmax of scale * q.k over the keys of each query's group."""
        query = self.query[item] if rows is None else self.query[item][:, rows]
        logits = (query.float() @ self.key[item].float().transpose(1, 2)) * self.scale
        group = self.group[item]
        if group is not None:
            query_group = group if rows is None else group[rows]
            logits = logits.masked_fill(query_group[:, None] != group[None, :], -torch.inf)
        return torch.softmax(logits, dim=-1)


def empty_geometry(shape: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """Values of the required fields of a VisualGeometry with no visual token, to fill in:
    {name: [B, S] of -1}."""
    return {
        f.name: torch.full(shape, -1, dtype=torch.long, device=device)
        for f in fields(VisualGeometry)
        if f.default is MISSING
    }


class VLMAdapter:
    """Locates the parts of one model instance; subclasses implement one family."""

    #: the HF model classes this adapter handles
    model_classes: tuple[type[nn.Module], ...] = ()
    #: rotary id axes per token: 1 (plain RoPE) or 3 (M-RoPE: temporal, height, width)
    rope_axes: int = 1
    #: whether compacting positions has a defined rule (renumber the 1-D position of the kept
    #: tokens); False where tokens carry multi-axis rotary ids (M-RoPE), which keep their ids
    compact_positions: bool = True
    #: whether the family takes images (False: a text-only causal LM, where only pruners that prune
    #: prompt text change anything)
    has_images: bool = True

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

    def has_vision_cls(self) -> bool:
        """Whether the vision tower puts a [CLS] token before each input's patches (`vision_cls_offset`
        answers without an error)."""
        try:
            self.vision_cls_offset()
        except ValueError:
            return False
        return True

    def vision_attention(self, index: int) -> nn.Module:
        """The attention module of vision layer `index` (has q_proj, k_proj, head_dim, scale)."""
        return self.vision_layers[index].self_attn

    def vision_query_key(self, index: int, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) [I, T, H * hd] as vision layer `index` attends with them, from its q_proj / k_proj
        outputs (towers that normalise q/k before splitting heads apply that here)."""
        return query, key

    def vision_attention_hooks(self, index: int, record: Callable[[str, Any], None]) -> list[Any]:
        """Per-instance hooks on vision layer `index` that hand what `tower_attention` needs to
        `record(name, value)` while the tower runs; each hook has a `remove()`. Default: the outputs
        of the attention's separate q_proj / k_proj ([I, T, H * hd], one row per tower input)."""
        attention = self.vision_attention(index)
        return [
            attention.q_proj.register_forward_hook(lambda _m, _i, output: record("query", output)),
            attention.k_proj.register_forward_hook(lambda _m, _i, output: record("key", output)),
        ]

    def tower_attention(self, index: int, parts: dict[str, Any]) -> TowerAttention:
        """The q/k of vision layer `index` per tower input, from the `parts` its hooks recorded in one
        tower forward. Default: towers that run each input as its own sequence with full attention."""
        attention = self.vision_attention(index)
        query, key = self.vision_query_key(index, parts["query"], parts["key"])
        split = lambda x: x.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)  # noqa: E731  [I, H, T, hd]
        query, key = split(query), split(key)
        return TowerAttention(list(query), list(key), [None] * query.shape[0], float(attention.scale))

    def tower_rows(self, geometry: VisualGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """(item [B, S], tokens [B, S, P]) long: for each visual token the tower input (row of the
        tower's batch: its image, or its crop for multi-crop families, `tower_view`) it came from and
        the P tower tokens ([CLS] counted) it covers; item -1 on other tokens. geometry: the prefill's
        geometry at original positions. Default: visual token = tower token `token_in_crop +
        vision_cls_offset()` of its view."""
        view = self._single_tower_outputs(geometry)
        token = geometry.token_in_crop().clamp_min(0) + self.vision_cls_offset()
        return view, token[..., None]

    def patch_pixels(self, pixel_values: torch.Tensor, geometry: VisualGeometry) -> torch.Tensor:
        """[B, S, P, C, ph, pw]: for each visual token the P pixel patches its tower tokens embedded (the
        `tower_rows` tokens; 0 on other tokens). pixel_values: [I, C, H, W], the tower's input. Default:
        towers whose patch tokens follow `vision_cls_offset()` in raster order over the tower input, with
        the vision config's `patch_size`; a clear error for other pixel layouts."""
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel patches per visual token are not mapped for {type(self.model).__name__} (its pixel_values "
                f"are {pixel_values.ndim}-D, not [images, C, H, W]); use a method that does not read pixel patches."
            )
        item, tokens = self.tower_rows(geometry)
        size = self.model.config.vision_config.patch_size
        height, width = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        patches = pixel_values.unfold(2, height, height).unfold(3, width, width)  # [I, C, R, Q, ph, pw]
        patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(1, 2)  # [I, R * Q, C, ph, pw] in raster order
        number = (tokens - self.vision_cls_offset()).clamp(0, patches.shape[1] - 1)  # [B, S, P]
        values = patches[item.clamp(0, patches.shape[0] - 1)[..., None], number]  # [B, S, P, C, ph, pw]
        return values.masked_fill((item < 0)[..., None, None, None, None], 0.0)

    def projector_rows(self, geometry: VisualGeometry, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item [B, S], row [B, S]) long: for each visual token its row in the projector input
        [items, length, dv]; item -1 on other tokens. Default: one projector input per tower view,
        ending with the token's crop grid (LLaVA-1.5: [CLS] dropped or not; LLaVA-NeXT per crop)."""
        view = self._single_tower_outputs(geometry)
        patches = (geometry.rows * geometry.cols).clamp_min(0)  # tokens of each token's crop grid
        return view, geometry.token_in_crop().clamp_min(0) + length - patches

    def _single_tower_outputs(self, geometry: VisualGeometry) -> torch.Tensor:
        """[B, S] each visual token's tower view; a clear error where a visual token is no single
        tower output (LLaVA-OneVision's grid resampled between patches)."""
        view = geometry.tower_view()
        if bool(((geometry.image >= 0) & (view < 0)).any()):
            raise ValueError(
                f"this method reads each visual token's vision-tower output, but some visual tokens of this "
                f"{type(self.model).__name__} input are no single tower output (resampled between patches). "
                "Use a method that scores the LLM's tokens (fastv, divprune, random, spatial)."
            )
        return view

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

    def instance_hooks(self) -> list[Any]:
        """Hooks on this model instance the family needs beyond the runtime's module hooks, each with
        a `remove()`; the runtime installs them with its own and removes them with `atp.remove`.
        The default: none."""
        return []

    def read_inputs(self, kwargs: dict[str, Any]) -> None:
        """Called with the multimodal model's call kwargs at every forward, before the language model
        runs: check them (`check_inputs`) and keep what `structural_tokens` and `visual_geometry`
        need for this forward (LLaVA-NeXT: `image_sizes`). The default only checks."""
        self.check_inputs(kwargs)

    def structural_tokens(self, placeholders: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: which image placeholder tokens (placeholders [B, S] bool) carry no image
        content but structure (LLaVA-NeXT's `image_newline` closing each row). The runtime keeps
        them in every layer, never offers them to a pruner and does not count them as visual
        tokens. The default: none."""
        return torch.zeros_like(placeholders)

    def visual_token_counts(self, inputs: dict[str, Any]) -> torch.Tensor:
        """[B] long visual tokens per sample of a model input (inputs: the model's call kwargs), as the
        runtime counts them: real image placeholders less the structural ones. For code that counts
        without the runtime (the unpruned side of an evaluation)."""
        self.read_inputs(inputs)
        placeholders = self.image_token_mask(inputs.get("input_ids"), inputs.get("inputs_embeds"))
        if inputs.get("attention_mask") is not None:
            placeholders = placeholders & inputs["attention_mask"].bool()
        return (placeholders & ~self.structural_tokens(placeholders)).sum(1)

    def visual_geometry(self, visual: torch.Tensor, rope: torch.Tensor | None) -> VisualGeometry:
        """Per visual token its image, crop, row and column. visual: [B, S] bool real image
        tokens (structural ones excluded); rope: [B, S, R] the rotary ids the model gave the tokens
        (`split_position_ids`), or None."""
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
