"""The token-pruning runtime: per-instance hooks around an HF VLM's own decoder loop.

Nothing of transformers is forked or globally patched. On one model instance we add:

  * pre-hooks on the top model and the multimodal model, to read `labels` and `input_ids`
    (where the image and the answer are);
  * a pre-hook on the language model, which starts a prefill or a decode step, fixes the
    original position ids (and, through the model adapter, each token's rotary ids, e.g.
    M-RoPE, which the layout then carries with the token), and takes out per-visual-token
    additions the model would make after its first layers (Qwen3-VL's deepstack), to add
    them to the tokens each layer really holds;
  * a pre-hook on every decoder layer, which runs the pruner before the layers it names
    and hands the layer the hidden states, attention mask, position ids and rotary
    embeddings of the current layout (drop: gathered; mask: key bias);
  * a forward hook on the final norm, which scatters the surviving tokens back to their
    original positions, so logits, labels and `logits_to_keep` keep their HF meaning
    (positions of dropped tokens get a zero hidden state);
  * forward hooks on q_proj/k_proj of the layers a pruner probes;
  * for a pruner that cuts inside the vision tower, the hooks of `atp.runtime.tower`; the
    positions of the tokens cut there are removed before decoder layer 0 (see that module).

KV cache: each layer's cache holds only the tokens that layer saw; decode steps attend to
the cached prefix through that layer's prefill layout and continue original positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from atp.models import get_adapter
from atp.models.adapter import TowerAttention, VisualGeometry
from atp.models.hf_compat import cache_of
from atp.runtime.key_reuse import KeyReuse
from atp.runtime.layout import Layout, causal_only, decode_mask, prefill_mask
from atp.runtime.probe import (
    ProjectionCapture,
    TowerCapture,
    attention_received,
    attention_rows,
    attention_rows_of,
    project_qk,
    rotated_keys,
)
from atp.runtime.prompt import locate_prompt_parts
from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner
from atp.runtime.revival import AuxCache, RevivalDecoder
from atp.runtime.stage import (
    apply_drop,
    apply_mask,
    apply_merge,
    check_decision,
    check_protected,
    drop_slots,
    gather_rows,
    present_text,
    present_visual,
    remaining_visual,
)
from atp.runtime.stats import PruningStats
from atp.runtime.tower import TowerPruning

MODES = ("drop", "mask")
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class LayerInputs:
    """What one decoder layer is given: its layout, mask [B,1,Q,K] and rotary (cos, sin).

    causal_only: the mask is exactly the causal triangle (no padding, no hidden or soft-weighted
    key; a prefill): under SDPA the layer is given no mask and SDPA runs its is_causal kernel, as
    stock HF does for such inputs, instead of the explicit mask's full-square kernel. The probes
    read `mask` either way."""

    layout: Layout
    mask: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    causal_only: bool = False


class _Prefill:
    """Scratch state of one prefill forward."""

    def __init__(
        self,
        layout: Layout,
        embeds: torch.Tensor,
        visual_index: torch.Tensor,
        geometry: VisualGeometry,
        instruction: torch.Tensor,
        last_prompt: torch.Tensor,
        original_length: int,
        num_layers: int,
    ) -> None:
        self.layout = layout
        self.embeds = embeds  # [B, S, d] the LLM input embeddings
        self.input_tokens = layout.valid.sum(1)  # [B] real tokens before any pruning
        self.visual_index = visual_index  # [B, S] in original positions
        self.geometry = geometry  # image, crop, row, col per original position
        self.instruction = instruction  # [B, S] in original positions
        self.last_prompt = last_prompt  # [B] original position
        self.original_length = original_length
        self.layer_inputs: list[LayerInputs | None] = [None] * num_layers
        self.layouts: list[Layout] = []  # per layer, kept after the forward for decode steps
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.scoring_seconds = 0.0
        self.reused_seconds = 0.0  # of scoring_seconds: key projections the layers then reused
        self.cache = None
        self.additions: list[torch.Tensor] = []  # [N, d] rows added to visual tokens after layer i
        self.sublayer: dict[int, dict[str, torch.Tensor]] = {}  # layer -> part -> [B, S] by original position
        self.tower_survivors: torch.Tensor | None = None  # [I, image tokens] bool, what the tower's cuts kept
        self.vision_tokens: torch.Tensor | None = None  # [I, tower layers] real tokens each tower layer ran on
        self.structural: torch.Tensor | None = None  # [B, S] placeholders without image content (newlines)
        self.text: torch.Tensor | None = None  # [B, S] real tokens that are not visual (stats per kind)
        self.prompt_text: torch.Tensor | None = None  # [B, S] text tokens a prunes_text pruner may prune
        self.protected: torch.Tensor | None = None  # [B, S] long: 1 the last prompt token, 2 answer tokens
        self.kept_text: dict[int, list[torch.Tensor]] = {}  # layer -> original positions of prunable text kept
        self.aux: AuxCache | None = None  # hidden states of pruned tokens, for a reviving pruner (drop mode)
        self.aux_position: tuple | None = None  # ([B, S] position ids, [B, S, R] rotary ids or None) at the input
        self.addition_index: torch.Tensor | None = None  # [B, S] row of each original position, -1 if none


class _Decode:
    """Scratch state of one decode (continuation) forward."""

    def __init__(
        self, new_valid: torch.Tensor, num_cached_new: int, position: torch.Tensor, rope: torch.Tensor | None
    ) -> None:
        self.new_valid = new_valid  # [B, T] validity of all tokens appended after the prefill
        self.num_cached_new = num_cached_new
        self.position = position  # [B, Q] original positions of this step's tokens
        self.rope = rope  # [B, Q, R] their rotary ids as the model gave them, or None
        self.by_layout: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}


class PruningRuntime:
    """Owns the hooks and state that `atp.apply` attaches to one model instance."""

    def __init__(self, model: nn.Module, pruner: TokenPruner, mode: str = "drop") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not isinstance(pruner, TokenPruner):
            raise TypeError(
                f"expected a TokenPruner (see atp.build_pruner / atp.available_pruners()), got {type(pruner).__name__}."
            )
        self.model = model
        self.adapter = get_adapter(model)
        self.pruner = pruner
        self.mode = mode
        self.num_layers = self.adapter.num_layers
        pruner.validate(self.num_layers)
        self.position_policy = pruner.position_policy(self.adapter.compact_positions, type(model).__name__)
        if not self.adapter.has_images and not pruner.prunes_text and pruner.name != "none":
            raise ValueError(
                f"{pruner.name} prunes image tokens, and {type(model).__name__} is a text-only model: it would "
                "change nothing. Use a pruner that prunes prompt text (e.g. lazyllm) on this model."
            )
        self._check_attention()
        self.captures = {layer: ProjectionCapture() for layer in sorted(pruner.probe_layers())}
        for layer in self.captures:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"{pruner.name}: probe layer {layer} is outside 0..{self.num_layers - 1}.")
        self.vision_captures = self._vision_captures(pruner.vision_probe_layers())
        self.sublayer_layers = sorted(pruner.sublayer_layers())
        for layer in self.sublayer_layers:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"{pruner.name}: sub-layer layer {layer} is outside 0..{self.num_layers - 1}.")
        self.tower = TowerPruning(self.adapter, pruner) if pruner.prunes_in_tower() else None
        self.projector_input: torch.Tensor | None = None  # [I, T, dv], for needs_vision_features
        self.pixel_values: torch.Tensor | None = None  # [I, C, H, W] the tower's input, for needs_pixels
        self._tower_output = None  # the vision tower's last output (what generate's mm_encoder_outputs hold)
        self._vision_reused = False  # this forward reads pre-encoded images the captures came from
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._probed_modules: dict[int, tuple[nn.Module, nn.Module]] = {}
        self._labels: torch.Tensor | None = None
        self._image_mask: torch.Tensor | None = None
        self._prefill: _Prefill | None = None  # the forward in flight, if a prefill
        self._decode: _Decode | None = None  # the forward in flight, if a decode step
        self._last_prefill: _Prefill | None = None  # what a cache continuation attends to
        self._key_reuse = KeyReuse()  # a probe's keys of the layer about to run, reused by that layer
        self.last_stats: PruningStats | None = None
        self.revival: RevivalDecoder | None = None  # decode steps with revival (pruner.revives, drop mode)

    # -- install / remove -------------------------------------------------------------
    def install(self) -> None:
        adapter = self.adapter
        hook = lambda module, fn: self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))  # noqa: E731
        self._handles.extend(adapter.instance_hooks())
        hook(self.model, self._read_labels)
        hook(adapter.multimodal_model, self._read_inputs)
        hook(adapter.language_model, self._begin_forward)
        for index, layer in enumerate(adapter.layers):
            hook(layer, self._layer_hook(index))
        self._handles.append(adapter.final_norm.register_forward_hook(self._after_norm))
        if self.vision_captures:  # armed while the tower runs (generate runs it before the LLM call)
            tower = adapter.vision_tower
            self._handles.append(tower.register_forward_pre_hook(lambda *_: self._arm_vision(True)))
            self._handles.append(tower.register_forward_hook(lambda *_: self._arm_vision(False)))
        if self.tower is not None:
            self._handles.extend(self.tower.install())
        if self.pruner.needs_vision_features:
            self._handles.append(adapter.projector.register_forward_pre_hook(self._read_projector_input))
        if self.pruner.needs_pixels:
            hook(adapter.vision_tower, self._read_pixels)
        if self.vision_captures or self.pruner.needs_pixels or self.pruner.needs_vision_features:
            self._handles.append(adapter.vision_tower.register_forward_hook(self._read_tower_output))
        for index, capture in self.vision_captures.items():
            self._handles.extend(adapter.vision_attention_hooks(index, capture.record))
        for index in self.sublayer_layers:
            layer = adapter.layers[index]
            self._handles.append(
                layer.self_attn.register_forward_hook(self._sublayer_hook(index, "attention"), with_kwargs=True)
            )
            self._handles.append(layer.mlp.register_forward_hook(self._sublayer_hook(index, "mlp"), with_kwargs=True))
        for index, capture in self.captures.items():
            attn = adapter.layers[index].self_attn
            self._probed_modules[index] = (attn.q_proj, attn.k_proj)
            self._handles.append(attn.q_proj.register_forward_hook(capture.hook("query")))
            self._handles.append(attn.k_proj.register_forward_hook(capture.hook("key")))

    def _sublayer_hook(self, index: int, part: str):
        """Forward hook on layer `index`'s attention or MLP block: during a prefill, hand the block's
        input (the normed hidden states) and output to `pruner.observe_sublayer` and keep the
        [B, S] statistic by original position (0 where the token is absent)."""

        def observe(_module, args, kwargs, output):
            state = self._prefill
            if state is None:
                return None
            before = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            after = output[0] if isinstance(output, tuple) else output
            layout = state.layer_inputs[index].layout
            present = layout.visible()
            with torch.no_grad():
                statistic = self.pruner.observe_sublayer(before.detach(), after.detach(), present)
            statistic = torch.where(present, statistic.float(), 0.0)
            target = torch.where(layout.valid, layout.index, state.original_length)
            full = statistic.new_zeros(statistic.shape[0], state.original_length + 1).scatter(1, target, statistic)
            state.sublayer.setdefault(index, {})[part] = full[:, : state.original_length]
            return None

        return observe

    def _vision_captures(self, layers: set[int]) -> dict[int, TowerCapture]:
        if not layers:
            return {}
        if self.pruner.needs_vision_cls:
            self.adapter.vision_cls_offset()  # raises if there is no [CLS] token
        depth = len(self.adapter.vision_layers)
        layers = self.pruner.vision_probe_layers_in(depth)
        for layer in layers:
            if not -depth <= layer < depth:
                raise ValueError(f"{self.pruner.name}: vision layer {layer} is outside the tower's {depth} layers.")
        return {layer % depth: TowerCapture() for layer in sorted(layers)}

    def remove(self) -> None:
        self._key_reuse.restore()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._prefill = self._decode = self._last_prefill = None
        self.revival = None
        self._clear_vision()

    # -- checks -------------------------------------------------------------------------
    def _check_attention(self) -> None:
        implementation = self.adapter.attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the atp runtime passes per-layer additive masks, which attn_implementation="
                f"{implementation!r} does not take. Load the model with attn_implementation='sdpa' "
                "(fast) or 'eager', or call model.set_attn_implementation('sdpa')."
            )

    def _check_probed_modules(self) -> None:
        for index, (q_proj, k_proj) in self._probed_modules.items():
            attn = self.adapter.layers[index].self_attn
            if attn.q_proj is not q_proj or attn.k_proj is not k_proj:
                raise RuntimeError(
                    f"layer {index}'s q/k projections were replaced after atp.apply (e.g. by peft LoRA). "
                    "Call atp.remove(model) and atp.apply(...) again after wrapping the model."
                )

    # -- hooks: inputs ----------------------------------------------------------------
    def _read_labels(self, _module, args, kwargs):
        self._labels = kwargs.get("labels")
        return None

    def _read_inputs(self, _module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.adapter.read_inputs(kwargs)
        self._image_mask = self.adapter.image_token_mask(input_ids, kwargs.get("inputs_embeds"))
        # generate pre-encodes the images once (`mm_encoder_outputs`, transformers 5) and hands the same
        # output to every step: what the tower's hooks captured then stays valid for each prefill on it
        # (use_cache=False); any other call without pixel_values finds nothing stale
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        self._vision_reused = encoded is not None and encoded is self._tower_output
        if kwargs.get("pixel_values") is None and not self._vision_reused:
            self._clear_vision()
        return None

    def _read_tower_output(self, _module, _args, output):
        self._tower_output = output
        return None

    def _clear_vision(self) -> None:
        """Forget what the vision tower's hooks captured."""
        for capture in self.vision_captures.values():
            capture.armed = False
            capture.clear()
        self.projector_input = None
        self.pixel_values = None
        self._tower_output = None

    def _read_projector_input(self, _module, args):
        self.projector_input = args[0]
        return None

    def _read_pixels(self, _module, args, kwargs):
        self.pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        return None

    def _arm_vision(self, start: bool) -> None:
        """Vision-tower q/k captures: cleared and armed when the tower starts, disarmed when it ends."""
        for capture in self.vision_captures.values():
            if start:
                capture.clear()
            capture.armed = start

    def _begin_forward(self, _module, args, kwargs):
        self._key_reuse.restore()  # an override a failed forward left unused
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("atp runtime: the language model was called without inputs_embeds; call the full VLM.")
        image_mask, labels = self._image_mask, self._labels
        self._image_mask = self._labels = None
        if image_mask is None or image_mask.shape != embeds.shape[:2]:
            raise RuntimeError(
                "atp runtime: could not locate the image tokens of this forward. Call the model itself "
                "(model(...) or model.generate(...)), not its language model."
            )
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                f"atp runtime needs a 2D padding attention_mask [batch, seq]; got {attention_mask.ndim}D. "
                "Custom 4D masks and compiled static caches are not supported with pruning."
            )
        given = kwargs.get("position_ids")
        position_ids, rope = self.adapter.split_position_ids(given)
        addition_mask, additions = self.adapter.take_visual_additions(kwargs)
        cache = cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if additions and cached > 0:
            raise ValueError("image tokens in a continuation of a cached prefill are not supported.")
        if cached > 0:
            position = self._begin_decode(embeds, attention_mask, position_ids, rope, cache, image_mask)
        else:
            position = self._begin_prefill(embeds, attention_mask, position_ids, rope, image_mask, labels)
            self._set_additions(addition_mask, additions)
        kwargs["position_ids"] = self.adapter.language_position_ids(given, position)
        return args, kwargs

    def _begin_prefill(self, embeds, attention_mask, position_ids, rope, image_mask, labels) -> torch.Tensor:
        batch, length = embeds.shape[:2]
        window = self.adapter.sliding_window()
        if window is not None and length > window:
            raise ValueError(
                f"sequence length {length} exceeds the model's sliding window ({window}); the atp runtime "
                "builds full causal masks. Shorten the input or use a model without sliding-window attention."
            )
        device = embeds.device
        valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]
        position = position_ids.expand(batch, length)
        image_mask = image_mask.to(device)
        structural = self.adapter.structural_tokens(image_mask & valid)  # newline tokens: never pruned
        parts = locate_prompt_parts(image_mask, valid, labels, structural)
        visual_index = torch.where(parts.visual, parts.visual.long().cumsum(1) - 1, -1)
        if rope is not None:
            rope = rope.expand(batch, length, -1)
        geometry = self.adapter.visual_geometry(parts.visual, rope)
        layout = Layout.initial(valid, position, parts.visual, rope)
        self._check_probed_modules()
        self._prefill = _Prefill(
            layout, embeds, visual_index, geometry, parts.instruction, parts.last_prompt, length, self.num_layers
        )
        self._prefill.structural = structural & valid
        self._set_text_parts(parts, image_mask & valid, valid)
        self.revival = None
        if self.pruner.revives and self.mode == "drop":
            self._prefill.aux = AuxCache(batch, length, embeds.shape[-1], self.num_layers, embeds.dtype, device)
            self._prefill.aux_position = (position, rope)
        if self.tower is not None:
            survivors, vision_tokens, seconds = self.tower.take_survivors()
            if bool(parts.visual.any()):  # a text-only prefill ignores an earlier tower pass
                self._prefill.tower_survivors, self._prefill.vision_tokens = survivors, vision_tokens
                self._prefill.scoring_seconds += seconds  # the in-tower cuts count as the pruner's time
            if self._prefill.tower_survivors is None and bool(parts.visual.any()):
                raise ValueError(
                    f"{self.pruner.name} cuts tokens inside the vision tower, but the tower did not run in this "
                    "forward (image features passed precomputed?). Pass pixel_values to the pruned model."
                )
        self._decode = None
        for capture in self.captures.values():
            capture.clear()
            capture.armed = True
        return position

    def _set_text_parts(self, parts, placeholder: torch.Tensor, valid: torch.Tensor) -> None:
        """Which original positions are text, which text a prunes_text pruner may prune (prompt text
        before the last prompt token), and which it may never prune (that token; answer tokens)."""
        state = self._prefill
        batch, length = valid.shape
        position = torch.arange(length, device=valid.device).expand(batch, length)
        last = position == state.last_prompt[:, None]
        prompt = parts.prompt
        state.text = valid & ~parts.visual & ~state.structural
        state.prompt_text = prompt & ~placeholder & ~last
        state.protected = torch.where(last & valid, 1, torch.where(valid & ~prompt, 2, 0))

    def _set_additions(self, mask: torch.Tensor | None, additions: list[torch.Tensor]) -> None:
        """Keep the per-visual-token additions (deepstack) of this prefill, rows by original position."""
        if not additions:
            return
        state = self._prefill
        visual = state.visual_index >= 0
        if mask is None or mask.shape != visual.shape or not torch.equal(mask.to(visual.device), visual):
            raise ValueError(
                "the model's per-visual-token additions (e.g. deepstack features) do not belong to exactly the "
                "image tokens of this input; the runtime prunes image tokens only (no videos)."
            )
        if len(additions) >= self.num_layers:
            raise ValueError(
                f"the model adds visual features after {len(additions)} layers, as many as it has; "
                "the runtime adds them before the next layer and needs one to follow."
            )
        if state.aux is not None and min(self.pruner.layers) < len(additions):
            raise ValueError(
                f"{self.pruner.name}: this model adds per-visual-token features after its first {len(additions)} "
                f"layers (Qwen3-VL's deepstack), and a token revived in a decode step before layer "
                f"{min(self.pruner.layers)} would miss some. Prune from layer {len(additions)} on, or build the "
                "pruner with revival=False."
            )
        number = visual.flatten().long().cumsum(0).view(visual.shape) - 1
        state.addition_index = torch.where(visual, number, -1)
        state.additions = additions

    def _begin_decode(self, embeds, attention_mask, position_ids, rope, cache, image_mask) -> torch.Tensor:
        record = self._last_prefill
        if record is None or record.cache is not cache:
            raise RuntimeError(
                "this KV cache was not filled by a prefill of the pruned model (atp.apply was called after "
                "it, or it belongs to another run). Run the prompt again with the pruned model."
            )
        if image_mask.any():
            raise ValueError(
                "image tokens in a continuation of a cached prefill are not supported; put the image in the prompt."
            )
        batch, queries = embeds.shape[:2]
        first = record.layouts[0]
        num_cached_new = cache.get_seq_length(0) - first.length
        total_new = num_cached_new + queries
        if attention_mask is not None:
            new_valid = attention_mask[:, record.original_length :].bool()
            if new_valid.shape[1] != total_new:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions; expected the prompt's "
                    f"{record.original_length} plus {total_new} appended tokens."
                )
        else:
            new_valid = torch.ones(batch, total_new, dtype=torch.bool, device=embeds.device)
        if position_ids is None:
            start = record.original_length + num_cached_new
            position_ids = torch.arange(start, start + queries, device=embeds.device)[None]
        position = position_ids.expand(batch, queries)
        if rope is not None:
            rope = rope.expand(batch, queries, -1)
        self._prefill = None
        self._decode = _Decode(new_valid, num_cached_new, position, rope)
        if self.pruner.revives and self.mode == "mask":
            raise ValueError(
                f"{self.pruner.name}: revival of pruned tokens in decode steps runs in drop mode; in mask mode build "
                "the pruner with revival=False (decode steps then attend to what the prefill kept)."
            )
        if self.revival is not None:
            self.revival.begin_step(position, rope, new_valid)
        return position

    # -- hooks: decoder layers ------------------------------------------------------------
    def _layer_hook(self, index: int):
        def before_layer(_module, args, kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if self._prefill is not None:
                hidden, inputs = self._prefill_layer(index, hidden, kwargs)
            elif self._decode is not None and self.revival is not None:
                hidden, (mask, rotary, position) = self.revival.before_layer(index, hidden, cache_of(kwargs))
                kwargs.update(attention_mask=mask, position_embeddings=rotary, position_ids=position)
                return (hidden, *rest), kwargs
            elif self._decode is not None:
                inputs = self._decode_layer(index, hidden, kwargs)
            else:
                raise RuntimeError("atp runtime: a decoder layer ran outside a model forward; call the full model.")
            kwargs["attention_mask"] = None if inputs.causal_only and self._sdpa_is_causal(kwargs) else inputs.mask
            kwargs["position_embeddings"] = inputs.rotary
            kwargs["position_ids"] = (
                inputs.layout.position if self._prefill is not None else self._decode_positions(inputs.layout)
            )
            return (hidden, *rest), kwargs

        return before_layer

    def _prefill_layer(self, index: int, hidden: torch.Tensor, kwargs: dict):
        state = self._prefill
        if index == 0:
            cache = cache_of(kwargs)
            if cache is not None and getattr(cache, "is_compileable", False):
                raise ValueError(
                    f"{type(cache).__name__} is not supported by the pruning runtime (each layer caches a "
                    "different number of tokens); use the default dynamic cache."
                )
            state.cache = cache
        if 0 < index <= len(state.additions):
            hidden = self._add_visual(hidden, state.additions[index - 1])
        if index == 0 and state.tower_survivors is not None:
            hidden = self._apply_tower_cut(hidden)
        if index in self.pruner.layers:
            hidden = self._run_stage(index, hidden)
        previous = state.layer_inputs[index - 1] if index > 0 else None
        if previous is not None and previous.layout is state.layout:
            inputs = previous
        else:
            mask = prefill_mask(state.layout, hidden.dtype)
            rotary = self._rotary(hidden, state.layout)
            inputs = LayerInputs(state.layout, mask, rotary, causal_only(state.layout))
        state.layer_inputs[index] = inputs
        return hidden, inputs

    def _add_visual(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, d] plus, on every slot holding an original visual token, its row of rows [N, d]
        (as the model adds it after a layer; merged tokens get none)."""
        state = self._prefill
        layout = state.layout
        number = torch.gather(state.addition_index, 1, layout.index)
        present = (number >= 0) & layout.valid
        if layout.merged is not None:
            present = present & ~layout.merged
        values = rows.to(hidden.device, hidden.dtype)[number.clamp_min(0)]  # [B, S, d]
        return hidden + torch.where(present[..., None], values, torch.zeros_like(values))

    def _decode_layer(self, index: int, hidden: torch.Tensor, kwargs: dict) -> LayerInputs:
        state, record = self._decode, self._last_prefill
        layout = record.layouts[index]
        cache = cache_of(kwargs)
        expected = layout.length + state.num_cached_new
        if cache is not None and cache.get_seq_length(index) != expected:
            raise RuntimeError(
                f"KV cache of layer {index} holds {cache.get_seq_length(index)} tokens, expected {expected}: "
                "the cache was cropped or edited outside the pruning runtime."
            )
        key = id(layout)
        if key not in state.by_layout:
            mask = decode_mask(layout, state.new_valid, state.num_cached_new, hidden.dtype)
            rotary = self.adapter.rotary(hidden, self._decode_positions(layout), state.rope)
            state.by_layout[key] = (mask, rotary)
        mask, rotary = state.by_layout[key]
        return LayerInputs(layout, mask, rotary)

    def _sdpa_is_causal(self, kwargs: dict) -> bool:
        """Whether a layer given no mask attends causally: HF's SDPA path with the is_causal flag
        (`sdpa_attention_forward`: no mask, more than one query, the module's or the call's is_causal).
        Read at every call, so a model switched to eager after atp.apply still gets its explicit masks."""
        return (
            self.adapter.attn_implementation == "sdpa"
            and kwargs.get("is_causal", True) is True
            and all(getattr(layer.self_attn, "is_causal", True) is True for layer in self.adapter.layers)
        )

    def _decode_positions(self, layout: Layout) -> torch.Tensor:
        return self._decode.position - layout.shift[:, None]

    def _rotary(self, hidden: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, S, hd] of the tokens in `layout`'s slots, from their carried ids."""
        return self.adapter.rotary(hidden, layout.position, layout.rope)

    # -- the pruning stage ---------------------------------------------------------------
    def _run_stage(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run the pruner before layer `index` and apply its decision; returns the new hidden states."""
        state = self._prefill
        layout = state.layout
        ctx = self._context(index, hidden)
        start = time.perf_counter()
        decision = self.pruner.prune(ctx)
        check_decision(decision, layout, self.pruner.name, self.mode)
        if self.pruner.prunes_text and not isinstance(decision, MergeDecision):
            check_protected(decision, torch.gather(state.protected, 1, layout.index), layout, self.pruner.name)
        if hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        state.scoring_seconds += time.perf_counter() - start  # the pruner alone: scores and probes
        taken = self._key_reuse.take(index, hidden)  # the probe's keys of this layer, if it projected them
        keys, key_seconds = taken if taken is not None else (None, 0.0)
        projected = layout.length
        if isinstance(decision, MergeDecision):
            layout, hidden, decision = apply_merge(layout, hidden, decision)
            keys = None  # merged tokens' hidden states changed
        compact = self.pruner.stage_position_policy(index, self.position_policy) == "compact"
        prunable = ctx.prunable
        if state.aux is not None:
            state.aux.store(index, layout, hidden, prunable & ~decision)
        if self.mode == "drop":
            if keys is not None:
                keys = gather_rows(keys, drop_slots(layout, decision, prunable)[0])
            layout, hidden = apply_drop(layout, hidden, decision, compact, prunable)
        else:
            layout = apply_mask(layout, decision, compact, prunable)
        if keys is not None:
            self._key_reuse.serve(self.adapter.layers[index].self_attn.k_proj, keys)
            state.reused_seconds += key_seconds * keys.shape[1] / projected  # the rows the layer receives
        state.layout = layout
        state.kept[index] = remaining_visual(layout, torch.gather(state.visual_index, 1, layout.index))
        if self.pruner.prunes_text:
            text = present_text(layout, torch.gather(state.prompt_text, 1, layout.index))
            state.kept_text[index] = [layout.index[b][text[b]].sort().values.cpu() for b in range(text.shape[0])]
        return hidden

    def _apply_tower_cut(self, hidden: torch.Tensor) -> torch.Tensor:
        """Before decoder layer 0: remove the image tokens the vision tower's cuts removed (their
        placeholders hold zero features); `kept[0]` records the image tokens that reach the LLM."""
        state = self._prefill
        layout, survivors = state.layout, state.tower_survivors
        images = int(state.geometry.image.max()) + 1
        if images != survivors.shape[0]:
            raise RuntimeError(
                f"the prompt holds {images} images but the vision tower ran on {survivors.shape[0]}; the runtime "
                "cannot tell which image's cut belongs to which placeholders."
            )
        geometry = self._prefill.geometry
        rows = (geometry.tower_view(), geometry.token_in_crop().clamp_min(0))  # survivors are [I, image tokens]
        keep = self._per_visual_slot(survivors.to(hidden.device, torch.float32), layout, rows) > 0.5
        compact = self.position_policy == "compact"
        if self.mode == "drop":
            layout, hidden = apply_drop(layout, hidden, keep, compact)
        else:
            layout = apply_mask(layout, keep, compact)
        state.layout = layout
        state.kept[0] = remaining_visual(layout, torch.gather(state.visual_index, 1, layout.index))
        return hidden

    def _context(self, index: int, hidden: torch.Tensor) -> PruneContext:
        """What the pruner sees before layer `index`, in the current layout's slots."""
        state = self._prefill
        layout = state.layout
        to_slots = lambda t: torch.gather(t, 1, layout.index)  # original positions -> slots  # noqa: E731
        slot_of = torch.full((hidden.shape[0], state.original_length + 1), -1, device=hidden.device)
        slot_of.scatter_(
            1,
            torch.where(layout.valid, layout.index, state.original_length),
            torch.arange(layout.length, device=hidden.device).expand_as(layout.index),
        )
        weight = layout.weight if layout.weight is not None else torch.ones(layout.index.shape, device=hidden.device)
        prunable = layout.visual_alive()
        if self.pruner.prunes_text:
            prunable = prunable | present_text(layout, to_slots(state.prompt_text))
        return PruneContext(
            layer=index,
            hidden=hidden,
            visual=layout.visual_alive(),
            visual_index=torch.where(layout.visual & layout.valid, to_slots(state.visual_index), -1),
            weight=weight,
            instruction=to_slots(state.instruction) & layout.valid,
            last_prompt=torch.gather(slot_of, 1, state.last_prompt[:, None])[:, 0].clamp_min(0),
            num_visual=(state.visual_index >= 0).sum(1),
            grid=self.adapter.fixed_grid,
            mode=self.mode,
            attention=lambda layer, queries, **options: self._attention(index, hidden, layer, queries, **options),
            attention_received=lambda layer, weights, **options: self._attention_received(
                index, hidden, layer, weights, **options
            ),
            vision_cls_attention=lambda layer: self._vision_cls_attention(layer, layout),
            vision_attention_received=lambda layer: self._vision_attention_received(layer, layout),
            vision_cls=self.adapter.has_vision_cls(),
            vision_keys=lambda layer: self._vision_keys(layer, layout),
            vision_queries=lambda layer: self._vision_queries(layer, layout),
            vision_features=lambda: self._vision_features(layout),
            vision_attention=self._vision_attention,
            patch_pixels=self._patch_pixels,
            project=self.adapter.projector,
            input_embeds=state.embeds,
            input_visual=state.visual_index >= 0,
            input_instruction=state.instruction,
            origin=layout.index,
            geometry=state.geometry.gather(layout.index, layout.visual & layout.valid),
            keys=lambda layer: self._keys(index, hidden, layer),
            sublayer=lambda layer: self._sublayer(index, layer, layout),
            final_norm=self.adapter.final_norm.forward,  # .forward: not the output hook `_after_norm`
            real=layout.valid,
            input_geometry=state.geometry,
            input_structural=state.structural,
            prunable=prunable,
        )

    def _per_visual_slot(
        self, per_item: torch.Tensor, layout: Layout, rows: tuple[torch.Tensor, torch.Tensor], reduce: str = "mean"
    ) -> torch.Tensor:
        """[B, S, *rest]: for each visual slot, the rows of per_item [I, T, *rest] (a tower or projector
        input's tokens) it covers, reduced ("mean" or "sum") over them; 0 elsewhere. rows: (item [B, S0],
        tokens [B, S0] or [B, S0, P]) at original positions, from the adapter (`tower_rows`, `projector_rows`)."""
        item, tokens = rows
        tokens = tokens if tokens.ndim == 3 else tokens[..., None]
        index = torch.where(layout.valid, layout.index, 0)
        item = torch.where(layout.valid, torch.gather(item, 1, index), -1)  # [B, S]
        tokens = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[2]))  # [B, S, P]
        visual = item >= 0
        values = per_item[item.clamp(0, per_item.shape[0] - 1)[..., None], tokens.clamp(0, per_item.shape[1] - 1)]
        values = values.sum(2) if reduce == "sum" else values.mean(2)  # [B, S, *rest]
        shape = visual.shape + (1,) * (values.ndim - 2)
        return values.masked_fill(~visual.view(shape), 0.0)

    def _vision_capture(self, layer: int) -> TowerAttention:
        """The q/k of vision layer `layer` per tower input, as it attends with them (adapter.tower_attention)."""
        depth = len(self.adapter.vision_layers)
        if layer % depth not in self.vision_captures:
            raise ValueError(f"{self.pruner.name}: vision layer {layer} is not in vision_probe_layers().")
        parts = self.vision_captures[layer % depth].parts
        if not parts:
            raise RuntimeError(
                f"vision layer {layer}'s q/k were not captured: the vision tower did not run on this forward's images "
                "with atp attached (no pixel_values, or images pre-encoded before atp.apply); pass pixel_values."
            )
        return self.adapter.tower_attention(layer % depth, parts)

    @staticmethod
    def _stack_items(rows: list[torch.Tensor]) -> torch.Tensor:
        """[I, T_max, *rest]: per-tower-input rows [T_i, *rest] stacked, zero past each input's T_i."""
        out = rows[0].new_zeros(len(rows), max(r.shape[0] for r in rows), *rows[0].shape[1:])
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out

    def _vision_cls_attention(self, layer: int, layout: Layout) -> torch.Tensor:
        """[B, H, S]: attention from each visual slot's tower input's [CLS] token to it, vision layer
        `layer`; a visual token covering several tower patches gets the sum over them."""
        self.adapter.vision_cls_offset()  # raises if there is no [CLS] token
        towers = self._vision_capture(layer)
        cls_rows = [towers.probabilities(i, slice(0, 1))[:, 0].transpose(0, 1) for i in range(len(towers))]  # [T_i, H]
        rows = self.adapter.tower_rows(self._prefill.geometry)
        return self._per_visual_slot(self._stack_items(cls_rows), layout, rows, "sum").permute(0, 2, 1)

    def _vision_attention_received(self, layer: int, layout: Layout) -> torch.Tensor:
        """[B, H, S]: attention each visual slot's token receives in vision layer `layer`, averaged
        over all queries of its tower input ([CLS] included; 0 from queries outside its attention
        group), computed one input at a time; a visual token covering several tower patches gets
        the sum over them."""
        towers = self._vision_capture(layer)
        received = [towers.probabilities(i).mean(1).transpose(0, 1) for i in range(len(towers))]  # [T_i, H]
        rows = self.adapter.tower_rows(self._prefill.geometry)
        return self._per_visual_slot(self._stack_items(received), layout, rows, "sum").permute(0, 2, 1)

    def _vision_keys(self, layer: int, layout: Layout) -> torch.Tensor:
        """[B, H, S, hd]: each visual slot's key (split into heads), vision layer `layer`; a visual token
        covering several tower patches gets the mean of their keys."""
        towers = self._vision_capture(layer)
        key = self._stack_items([k.transpose(0, 1) for k in towers.key])  # [I, T, H, hd]
        rows = self.adapter.tower_rows(self._prefill.geometry)
        return self._per_visual_slot(key, layout, rows).permute(0, 2, 1, 3)

    def _vision_queries(self, layer: int, layout: Layout) -> torch.Tensor:
        """[B, H, S, hd]: each visual slot's query (split into heads), vision layer `layer`; a visual token
        covering several tower patches gets the mean of their queries."""
        towers = self._vision_capture(layer)
        query = self._stack_items([q.transpose(0, 1) for q in towers.query])  # [I, T, H, hd]
        rows = self.adapter.tower_rows(self._prefill.geometry)
        return self._per_visual_slot(query, layout, rows).permute(0, 2, 1, 3)

    def _vision_attention(self, layer: int) -> torch.Tensor:
        """[B, H, S0, S0] at original positions: the attention of vision layer `layer` (softmax over the
        keys each query attends to, [CLS] included) from visual token i to visual token j of the same
        tower input; a visual token covering P tower patches sends the mean of its patches' rows and
        receives the sum over its patches (P = 1: the plain entry); 0 between tokens of different tower
        inputs and elsewhere. Computed one tower input at a time."""
        towers = self._vision_capture(layer)
        item, tokens = self.adapter.tower_rows(self._prefill.geometry)  # [B, S0], [B, S0, P]
        heads = towers.query[0].shape[0]
        out = torch.zeros(item.shape[0], heads, item.shape[1], item.shape[1], device=item.device)
        for i in range(len(towers)):
            where = (item == i).nonzero()  # [n, 2] (sample, position) of this input's visual tokens
            if where.numel() == 0:
                continue
            sample, position = where[:, 0], where[:, 1]
            if bool((sample != sample[0]).any()):
                raise RuntimeError(f"tower input {i}'s visual tokens span several samples.")
            probs = towers.probabilities(i)  # [H, T, T]
            patches = tokens[sample, position]  # [n, P]
            sent = probs[:, patches].mean(2)  # [H, n, T]: the mean of each token's patch rows
            pairs = sum(sent[:, :, patches[:, q]] for q in range(patches.shape[1]))  # [H, n, n]: summed columns
            grid = torch.meshgrid(position, position, indexing="ij")
            out[sample[0]][:, grid[0], grid[1]] = pairs  # [H, n, n] into [H, S0, S0]
        return out

    def _patch_pixels(self) -> torch.Tensor:
        """[B, S0, P, C, ph, pw] at original positions: each visual token's pixel patches (adapter.patch_pixels)."""
        if not self.pruner.needs_pixels:
            raise ValueError(f"{self.pruner.name}: set needs_pixels = True to read pixel patches.")
        if self.pixel_values is None:
            raise RuntimeError("the vision tower's pixel_values were not captured: this forward had no image.")
        try:
            return self.adapter.patch_pixels(self.pixel_values, self._prefill.geometry)
        except ValueError as error:
            raise ValueError(f"{self.pruner.name}: {error}") from None

    def _vision_features(self, layout: Layout) -> torch.Tensor:
        """[B, S, dv]: each visual slot's image feature as the projector received it."""
        if not self.pruner.needs_vision_features:
            raise ValueError(f"{self.pruner.name}: set needs_vision_features = True to read vision features.")
        features = self.projector_input
        if features is None:
            raise RuntimeError("the projector input was not captured: this forward had no pixel_values.")
        try:
            rows = self.adapter.projector_rows(self._prefill.geometry, features.shape[1])
        except ValueError as error:
            raise ValueError(f"{self.pruner.name}: {error}") from None
        return self._per_visual_slot(features, layout, rows)

    def _probe_inputs(
        self, stage: int, hidden: torch.Tensor, layer: int, query_slots: torch.Tensor | None = None
    ) -> tuple:
        """(attention module, q, k, rotary, mask) of layer `layer` for a pruner before layer `stage`;
        for the layer about to run with `query_slots` [B, Q], q holds those slots' rows only."""
        state = self._prefill
        if layer == stage:
            query, key, key_seconds = project_qk(self.adapter.layers[layer], hidden, query_slots)
            self._key_reuse.offer(stage, hidden, key, key_seconds)
            mask = prefill_mask(state.layout, hidden.dtype)
            rotary = self._rotary(hidden, state.layout)
        elif (
            layer < stage
            and layer in self.captures
            and (layer == stage - 1 or state.layer_inputs[layer].layout is state.layout)
        ):  # an earlier layer that saw the current slots
            capture = self.captures[layer]
            if capture.query is None or capture.key is None:
                raise RuntimeError(f"layer {layer}'s q/k projections were not captured in this forward.")
            query, key = capture.query, capture.key
            inputs = state.layer_inputs[layer]
            mask, rotary = inputs.mask, inputs.rotary
        else:
            raise ValueError(
                f"{self.pruner.name}: before layer {stage} the probe can read layer {stage} (computed on "
                f"demand), or an earlier layer listed in probe_layers() that saw the current tokens (layer "
                f"{stage - 1}, or earlier when no stage pruned in between); asked for layer {layer}."
            )
        return self.adapter.layers[layer].self_attn, query, key, rotary, mask

    def _attention(
        self, stage: int, hidden: torch.Tensor, layer: int, queries: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """Rows of layer `layer`'s attention for a pruner running before layer `stage`."""
        if layer == stage:  # project the queries of the wanted rows only
            return attention_rows_of(*self._probe_inputs(stage, hidden, layer, queries), queries, temperature)
        return attention_rows(*self._probe_inputs(stage, hidden, layer), queries, temperature)

    def _sublayer(self, stage: int, layer: int, layout: Layout) -> torch.Tensor:
        """[B, 2, S]: the statistics `pruner.observe_sublayer` gave layer `layer`'s attention and MLP
        blocks, in the current slots (0 for tokens that layer did not see)."""
        observed = self._prefill.sublayer.get(layer)
        if layer not in self.sublayer_layers or layer >= stage or observed is None:
            raise ValueError(
                f"{self.pruner.name}: before layer {stage} the statistics of an earlier layer listed in "
                f"sublayer_layers() ({self.sublayer_layers}) can be read; asked for layer {layer}."
            )
        both = torch.stack([observed["attention"], observed["mlp"]], 1)  # [B, 2, S0]
        return torch.gather(both, 2, layout.index[:, None].expand(-1, 2, -1)).masked_fill(~layout.valid[:, None], 0.0)

    def _keys(self, stage: int, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """[B, H, S, hd] keys of layer `layer` as its attention uses them, for a pruner before layer `stage`."""
        attn, query, key, rotary, _ = self._probe_inputs(stage, hidden, layer)
        return rotated_keys(attn, key, rotary, query.shape[-1] // attn.head_dim)

    def _attention_received(
        self, stage: int, hidden: torch.Tensor, layer: int, weights: torch.Tensor, **options
    ) -> torch.Tensor:
        """Attention each key receives from weighted queries in layer `layer` (`attention_received`)."""
        return attention_received(*self._probe_inputs(stage, hidden, layer), weights, **options)

    # -- hooks: output ----------------------------------------------------------------------
    def _after_norm(self, _module, _inputs, output: torch.Tensor):
        state = self._prefill
        if state is None and self._decode is not None and self.revival is not None:
            self.revival.end_step()
            return output[:, -1:]  # the new token is the last row; revived prompt rows end here
        if state is None:
            return None
        self._finish_prefill(state)
        layout = state.layout
        if layout.length == state.original_length and bool(
            (layout.index == torch.arange(layout.length, device=layout.index.device)).all()
        ):
            return None
        batch, _, width = output.shape
        target = torch.where(layout.valid, layout.index, state.original_length)
        full = output.new_zeros(batch, state.original_length + 1, width)
        full = full.scatter(1, target[..., None].expand(-1, -1, width), output)
        return full[:, : state.original_length]

    def _finish_prefill(self, state: _Prefill) -> None:
        self._key_reuse.restore()
        for capture in self.captures.values():
            capture.armed = False
            capture.clear()
        if not self._vision_reused:  # kept for the next prefill on the same pre-encoded images (generate)
            self._clear_vision()
        state.embeds = None
        state.sublayer = {}
        layouts = [inputs.layout for inputs in state.layer_inputs]
        state.layouts, state.layer_inputs = layouts, []  # release masks; decode needs layouts only
        text = [present_text(lay, torch.gather(state.text, 1, lay.index)).sum(1) for lay in layouts]
        self.last_stats = PruningStats(
            text_tokens=torch.stack(text, 1).cpu(),
            num_text=state.text.sum(1).cpu(),
            kept_text=state.kept_text,
            visual_tokens=torch.stack([present_visual(lay).sum(1) for lay in layouts], 1).cpu(),
            tokens=torch.stack([lay.visible().sum(1) for lay in layouts], 1).cpu(),
            kept=state.kept,
            num_visual=(state.visual_index >= 0).sum(1).cpu(),
            input_tokens=state.input_tokens.cpu(),
            soft_visual_tokens=torch.stack([_soft_count(lay) for lay in layouts], 1).detach().cpu(),
            scoring_seconds=state.scoring_seconds,
            reused_seconds=state.reused_seconds,
            vision_tokens=state.vision_tokens,
            vision_input_tokens=None if self.tower is None else self.tower.layout.tokens,
            mode=self.mode,
            pruner=self.pruner.name,
        )
        self._last_prefill = state if state.cache is not None else None
        if state.aux is not None and state.cache is not None:
            self.revival = self._revival_decoder(state)
        self._prefill = None

    def _revival_decoder(self, state: _Prefill) -> RevivalDecoder:
        """The decode steps of a reviving pruner over this prefill's cache (`atp.runtime.revival`)."""
        position, rope = state.aux_position
        visual = state.visual_index >= 0
        candidates = state.prompt_text | visual
        prompt = state.protected != 2
        valid = state.text | visual | state.structural
        decoder = RevivalDecoder(
            self.pruner, self.adapter, state.aux, state.layouts, candidates, prompt & valid, position, rope
        )
        decoder.captures = self.captures
        return decoder


def _soft_count(layout: Layout) -> torch.Tensor:
    present = layout.visual_alive().float()
    if layout.weight is not None:
        present = present * layout.weight
    return present.sum(1)
