"""The token-pruner contract the runtime calls, and the registry of pruners by name.

The runtime owns this contract; the methods in `atp.token` implement it (they import this
module, never the reverse). A pruner is a scoring rule. The runtime calls `pruner.prune(ctx)` before each decoder
layer in `pruner.layers` and applies the decision (drop or mask). The pruner never
touches hidden states, caches or masks itself. A pruner that acts inside the vision tower
implements `vision_prune_layers` and `prune_vision(ctx: TowerContext)` instead (or as well):
the runtime calls it before those tower layers (`atp.runtime.tower`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from atp.models.adapter import TowerLayout, VisualGeometry

POSITION_POLICIES = ("reference", "original", "compact")
"""How kept tokens are numbered after pruning: "original" (each token keeps its position and rotary
ids), "compact" (the remaining tokens are renumbered contiguously), or "reference" (the method's
own reference policy, `TokenPruner.reference_position_ids`, resolved against the model family by
`resolve_position_policy`)."""


@dataclass
class MergeDecision:
    """A hard decision that also rewrites and reorders tokens (token-merging methods).

    keep:     [B, S] bool, slots that survive; a merged token lives in a kept slot
    hidden:   [B, S, d] replacement hidden states, read where `replaced` is True
    replaced: [B, S] bool, kept visual slots whose token becomes a merged token
    order:    [B, S] float sort key, or None: the kept visual tokens are rearranged among
              the kept visual slots in ascending key order (ties: slot order). Position ids
              stay with the slots, so e.g. merged tokens placed last get the last positions.
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    replaced: torch.Tensor | None = None
    order: torch.Tensor | None = None


@dataclass
class PruneContext:
    """What a pruner sees before decoder layer `layer` (all [B, S] tensors use the current layout).

    layer:             decoder layer about to run (0 = the LLM input embeddings)
    hidden:            [B, S, d] hidden states entering `layer`
    visual:            [B, S] bool, visual tokens still present (the only prunable slots)
    visual_index:      [B, S] long, image-token number counted in input order from 0, -1 elsewhere
    weight:            [B, S] float, soft keep weight so far (1 where nothing was masked)
    instruction:       [B, S] bool, prompt tokens after the image and before the answer
    last_prompt:       [B] long, slot of the last prompt token (the last token before the answer)
    num_visual:        [B] long, visual tokens each sample had at the LLM input
    grid:              (rows, cols) of visual tokens per image when every image has the same grid
                       (LLaVA-1.5), None when images have their own grids (see `geometry`)
    mode:              "drop" or "mask"
    attention:         attention(layer, queries [B, Q], temperature=1.0) -> [B, H, Q, S] post-softmax
                       probabilities of decoder layer `layer`: this one, or an earlier one listed in
                       probe_layers() that saw the current slots (the previous one always does);
                       softmax(logits / temperature) with another temperature
    attention_received: attention_received(layer, weights [B, n, S], heads="mean"|"max",
                       exclude_self=False) -> [B, n, S]: sum_i weights[b, n, i] * A[b, i, j], the
                       attention each slot j receives from weighted queries, without holding
                       [B, H, S, S] (`atp.runtime.probe.attention_received`)
    vision_cls_attention: vision_cls_attention(layer) -> [B, H, S]: for every visual slot, the
                       attention its image's [CLS] token pays to it in vision-tower layer
                       `layer` (listed in vision_probe_layers); 0 on other slots
    vision_attention_received: vision_attention_received(layer) -> [B, H, S]: for every visual
                       slot, the attention its token receives in vision-tower layer `layer`
                       (listed in vision_probe_layers), averaged over all queries of its tower
                       input ([CLS] included; a query outside the token's attention window, as in
                       Qwen2.5-VL's windowed blocks, gives 0), summed over the tower patches the
                       token covers; 0 on other slots
    vision_cls:        whether the vision tower has a [CLS] token before each input's patches
                       (`vision_cls_attention` needs one)
    vision_keys:       vision_keys(layer) -> [B, H, S, hd]: every visual slot's key in vision
                       layer `layer` (listed in vision_probe_layers); 0 on other slots
    vision_queries:    vision_queries(layer) -> [B, H, S, hd]: the same for the queries
    vision_features:   vision_features() -> [B, S, dv]: every visual slot's image feature at the
                       projector input (pruners with `needs_vision_features`); 0 elsewhere
    vision_attention:  vision_attention(layer) -> [B, H, S0, S0] at original positions: the attention
                       of vision layer `layer` (listed in vision_probe_layers) from visual token i to
                       visual token j of the same tower input (tokens of P patches: mean over i's,
                       sum over j's); 0 elsewhere
    patch_pixels:      patch_pixels() -> [B, S0, P, C, ph, pw] at original positions: the pixel patches
                       of each visual token (pruners with `needs_pixels`); 0 elsewhere
    project:           project(features [..., dv]) -> [..., d]: the model's multimodal projector
    input_embeds:      [B, S0, d] the LLM input embeddings in original positions (S0 >= S)
    input_visual:      [B, S0] bool image tokens, original positions
    input_instruction: [B, S0] bool instruction tokens, original positions
    origin:            [B, S] long original position of the token in each slot (0 in fill slots)
    input_geometry:    `atp.models.adapter.VisualGeometry` of the original positions ([B, S0] fields)
    input_structural:  [B, S0] bool image placeholders without image content (LLaVA-NeXT's newline
                       tokens), original positions; never visual, never pruned
    prunable:          [B, S] bool, the slots a decision may remove: the visual tokens present, and for a
                       pruner with `prunes_text` also the prompt text tokens present before the last
                       prompt token (never that token, never answer tokens: rejecting one is an error)
    geometry:          `atp.models.adapter.VisualGeometry` of the slots: each visual slot's image,
                       crop, row, column and its crop's grid size ([B, S] long, -1 elsewhere)
    keys:              keys(layer) -> [B, H, S, hd] float32 keys of decoder layer `layer` (this one or
                       the previous one, as `attention`) as its attention uses them: k norm, RoPE
                       and the GQA repeat to the query heads applied
    final_norm:        final_norm(hidden [..., d]) -> [..., d]: the language model's final norm
                       (without the runtime's output hook)
    real:              [B, S] bool, slots holding a real token (not padding, not a fill slot)
    sublayer:          sublayer(layer) -> [B, 2, S] float32: the statistic `observe_sublayer` gave
                       the attention block (index 0) and the MLP block (1) of an earlier decoder
                       layer listed in `sublayer_layers`, per token in the current slots (0 for a
                       token that layer did not see)
    """

    layer: int
    hidden: torch.Tensor
    visual: torch.Tensor
    visual_index: torch.Tensor
    weight: torch.Tensor
    instruction: torch.Tensor
    last_prompt: torch.Tensor
    num_visual: torch.Tensor
    grid: tuple[int, int] | None
    mode: str
    attention: Callable[..., torch.Tensor]
    attention_received: Callable[..., torch.Tensor] | None = None
    vision_cls_attention: Callable[[int], torch.Tensor] | None = None
    vision_attention_received: Callable[[int], torch.Tensor] | None = None
    vision_cls: bool = True
    vision_keys: Callable[[int], torch.Tensor] | None = None
    vision_queries: Callable[[int], torch.Tensor] | None = None
    vision_features: Callable[[], torch.Tensor] | None = None
    vision_attention: Callable[[int], torch.Tensor] | None = None
    patch_pixels: Callable[[], torch.Tensor] | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    input_embeds: torch.Tensor | None = None
    input_visual: torch.Tensor | None = None
    input_instruction: torch.Tensor | None = None
    origin: torch.Tensor | None = None
    geometry: VisualGeometry | None = None
    keys: Callable[[int], torch.Tensor] | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    real: torch.Tensor | None = None
    sublayer: Callable[[int], torch.Tensor] | None = None
    input_geometry: VisualGeometry | None = None
    input_structural: torch.Tensor | None = None
    prunable: torch.Tensor | None = None

    def visual_counts(self) -> torch.Tensor:
        """[B] long: visual tokens present per sample."""
        return self.visual.sum(1)


@dataclass
class TowerContext:
    """What an in-tower pruner sees before vision-tower layer `layer`. One row per image ([I, T]
    tensors use the tower's current slots: the prefix ([CLS]) first, then the surviving patch
    tokens in their original order, then padding where images of a batch keep different counts).

    layer:     vision layer about to run (its input is what gets pruned)
    hidden:    [I, T, dv] hidden states entering `layer`
    valid:     [I, T] bool, real tokens (False: padding of a ragged batch)
    prunable:  [I, T] bool, patch tokens present (valid, not prefix): the only slots a decision may drop
    index:     [I, T] long, each slot's original tower index ([CLS] = 0, patch p = prefix + p); -1 in padding
    tower:     `TowerLayout` of the family: prefix tokens, image offset, patches per image, feature layers
    attention: attention(rows=None) -> [I, H, R, T] post-softmax attention of layer `layer - 1` (whose
               output is this stage's input) for its first R query rows (all when rows is None; rows=1:
               the [CLS] row), equal to HF eager's `output_attentions`; 0 on padding rows / columns
    keys:      keys() -> [I, H, T, hd] key vectors (k_proj output split in heads) of layer `layer - 1`;
               0 on padding slots
    values:    values() -> [I, H, T, hd] value vectors (v_proj output split in heads) of layer `layer - 1`;
               0 on padding slots
    scratch:   a dict that lives for one tower forward, for state a method carries between its stages
               (e.g. FlowCut's cumulative scores, kept by original index)
    """

    layer: int
    hidden: torch.Tensor
    valid: torch.Tensor
    prunable: torch.Tensor
    index: torch.Tensor
    tower: TowerLayout
    attention: Callable[..., torch.Tensor]
    keys: Callable[[], torch.Tensor]
    values: Callable[[], torch.Tensor]
    scratch: dict

    def patch_counts(self) -> torch.Tensor:
        """[I] long: patch tokens present per image."""
        return self.prunable.sum(1)


class TokenPruner(nn.Module):
    """Base class: subclasses set `name`, and implement `prune` (and `probe_layers` if needed).

    `prune` returns a [B, S] decision over the current slots: a bool tensor (True = keep),
    in mask mode only a float tensor of soft keep weights in [0, 1], or a `MergeDecision`
    (token merging: replaced and reordered tokens, both modes). Only visual slots
    can be pruned; the runtime keeps every other slot whatever the decision says. A pruner that
    sets `prunes_text` may also prune prompt text tokens (`ctx.prunable`), with the same drop /
    mask semantics; rejecting the last prompt token or an answer token is a clear error.
    """

    name: ClassVar[str] = "base"
    #: the position policy of the method's reference code (on LLaVA): "original" or "compact"
    reference_position_ids: ClassVar[str] = "original"
    needs_vision_features: ClassVar[bool] = False  # capture the projector input (ctx.vision_features)
    needs_pixels: ClassVar[bool] = False  # capture the vision tower's pixel_values (ctx.patch_pixels)
    prunes_text: ClassVar[bool] = False  # may prune prompt text tokens too (ctx.prunable)
    revives: ClassVar[bool] = False  # decode steps re-select pruned prompt tokens (`revival_plan`, drop mode)
    needs_vision_cls: ClassVar[bool] = False  # reads the tower's [CLS] row (ctx.vision_cls_attention): checked at apply

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        bound = inspect.signature(cls.__init__).bind(instance, *args, **kwargs)
        bound.apply_defaults()
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        object.__setattr__(instance, "_build_kwargs", arguments)  # before nn.Module.__init__
        return instance

    def build_kwargs(self) -> dict:
        """The constructor arguments, so `build_pruner(self.name, **self.build_kwargs())` rebuilds it."""
        return dict(self._build_kwargs)

    def __init__(self, layers: int | list[int] | tuple[int, ...], position_ids: str = "original"):
        super().__init__()
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        if not layer_list and self.name != "none" and not self.prunes_in_tower():
            raise ValueError(f"{self.name}: give at least one layer to prune at.")
        if sorted(set(layer_list)) != layer_list:
            raise ValueError(f"{self.name}: layers must be strictly increasing, got {layer_list}.")
        if any((not isinstance(layer, int)) or layer < 0 for layer in layer_list):
            raise ValueError(f"{self.name}: layers must be integers >= 0 (0 = before the LLM), got {layer_list}.")
        if position_ids not in POSITION_POLICIES:
            raise ValueError(f"{self.name}: position_ids must be one of {POSITION_POLICIES}, got {position_ids!r}.")
        self.layers = tuple(layer_list)
        self.position_ids = position_ids

    def position_policy(self, compact_defined: bool, model_name: str = "this model") -> str:
        """The policy the runtime applies: "original" or "compact".

        compact_defined: whether the model family has a defined rule for compacting positions
        (`VLMAdapter.compact_positions`; False for M-RoPE). `position_ids="reference"` takes the
        method's reference policy, falling back to "original" where compaction has no defined
        rule [ours]; an explicit "compact" there is refused with a clear error.
        """
        if self.position_ids == "reference":
            policy = self.reference_position_ids
            return "original" if policy == "compact" and not compact_defined else policy
        if self.position_ids == "compact" and not compact_defined:
            raise ValueError(
                f"{self.name}: position_ids='compact' has no defined rule for the rotary ids of {model_name} "
                f"(M-RoPE: kept tokens keep their original ids there). Build the pruner with "
                f"position_ids='original' or 'reference' (the default, which keeps original ids on this family)."
            )
        return self.position_ids

    def stage_position_policy(self, layer: int, policy: str) -> str:
        """The policy ("original" or "compact") of the stage before `layer`, given the resolved
        `policy`; a method whose reference numbers positions differently per stage overrides it."""
        return policy

    def probe_layers(self) -> set[int]:
        """Decoder layers whose q/k projections the runtime must capture for `ctx.attention`."""
        return set()

    def vision_probe_layers(self) -> set[int]:
        """Vision-tower layers (negative counts from the end) whose q/k the runtime must capture."""
        return set()

    def sublayer_layers(self) -> set[int]:
        """Decoder layers whose attention and MLP blocks the runtime shows `observe_sublayer`."""
        return set()

    def observe_sublayer(self, before: torch.Tensor, after: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """A per-token statistic of one block (attention or MLP) of a layer in `sublayer_layers`,
        during a prefill: before [B, S, d] the block's input (the normed hidden states), after
        [B, S, d] its output (before the residual), present [B, S] bool the tokens that layer
        really holds (not padding, fill slots or masked-out tokens). Returns [B, S]; the runtime
        keeps it by token and hands it back through `ctx.sublayer(layer)`."""
        raise NotImplementedError(f"{self.name}: lists sublayer_layers() but does not define observe_sublayer.")

    def vision_probe_layers_in(self, depth: int) -> set[int]:
        """The vision layers to capture in a tower of `depth` layers, for pruners whose set depends
        on the depth (e.g. every layer from one on); called when `vision_probe_layers()` is not empty."""
        return self.vision_probe_layers()

    @classmethod
    def prunes_in_tower(cls) -> bool:
        """Whether the method acts inside the vision tower (implements `prune_vision`)."""
        return cls.prune_vision is not TokenPruner.prune_vision

    def vision_prune_layers(self, tower: TowerLayout) -> tuple[int, ...]:
        """Vision-tower layers before which `prune_vision` runs (strictly increasing, each in
        1..tower.feature_layers so that the cut changes the features the projector reads; a cut
        before layer feature_layers (< depth) selects among the very features the projector reads)."""
        return ()

    def prune_vision(self, ctx: TowerContext) -> torch.Tensor:
        """[I, T] bool keep mask over the tower's current slots (prefix and padding slots are kept /
        ignored whatever it says). Only in-tower pruners implement it."""
        raise NotImplementedError

    def validate(self, num_layers: int) -> None:
        """Raise a clear error if the pruner cannot run on a model with `num_layers` layers."""
        for layer in self.layers:
            if layer >= num_layers:
                raise ValueError(
                    f"{self.name}: layer {layer} is at or past the model's depth ({num_layers} decoder "
                    f"layers: valid layers are 0..{num_layers - 1}). Choose a smaller layer index."
                )

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, type[TokenPruner]] = {}


def register(cls: type[TokenPruner]) -> type[TokenPruner]:
    """Class decorator: make a pruner buildable by its `name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a pruner named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_pruners() -> list[str]:
    """Names accepted by `build_pruner`."""
    return sorted(_REGISTRY)


def pruner_class(name: str) -> type[TokenPruner]:
    """The registered class for `name`; a clear error lists the names there are."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruner {name!r}; available pruners: {', '.join(available_pruners())}.")
    return _REGISTRY[name]


def build_pruner(name: str, **kwargs) -> TokenPruner:
    """Build a registered pruner by name, e.g. `build_pruner("fastv", layer=2, keep_ratio=0.25)`."""
    cls = pruner_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"pruner {name!r} has no argument(s) {unknown}; it accepts {accepted}.")
    return cls(**kwargs)
