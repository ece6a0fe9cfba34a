"""Pruning inside the vision tower: tokens cut between tower layers never reach the projector or the LLM.

Per-instance hooks on one model's tower, as for the LLM (nothing forked or patched globally):

  * a pre-hook on the tower starts a pass (every image: its prefix ([CLS]) and all patches);
  * a pre-hook on every encoder layer: before the layers the pruner names
    (`vision_prune_layers`) it builds a `TowerContext`, calls `pruner.prune_vision` and gathers
    the survivors; every layer then gets the current sequence and, when images keep different
    counts, an additive key mask hiding the padding;
  * forward hooks on q/k/v of the layer before each cut (`ctx.attention`, `ctx.values`);
  * a forward hook on the tower scatters every returned hidden state (and attention map) back to
    the full token grid, zeros where a token was cut, so HF's feature selection
    (`hidden_states[vision_feature_layer][:, 1:]`) runs unchanged;
  * a pre-hook / forward hook pair on the projector projects only the survivors and puts the
    projected rows back on the grid, zeros elsewhere.

Ragged batches: images of a batch may keep different counts (e.g. FlowCut's entropy-driven cut
sizes). The survivors of each image are left-aligned (prefix first, patches in original order)
and padded to the widest image; the padding is hidden from every key by an additive mask, so each
image attends to exactly its own survivors, as if it ran alone. Padding keeps one batched tower
call (per-image calls would re-run the tower's layers outside HF's own loop); its cost is the
padded rows, which the token counts and FLOPs do not count. When all images keep the same count
no mask is passed, exactly as stock HF.

Placeholders: the caller's `input_ids` keep one image placeholder per patch, as the processor
emits them, so HF's own check (placeholders == features) and `masked_scatter` run unchanged on the
full grid; the LLM runtime then removes the cut positions before decoder layer 0 (drop: gathered
out; mask: hidden as keys), records them in `kept[0]`, and returns logits at the caller's positions
(cut positions get a zero hidden state, as for any dropped token). Rewriting `input_ids` instead
would need the survivor counts before the tower has run, and would move labels, attention masks
and `generate`'s length bookkeeping away from what the caller passed.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from atp.models.adapter import TowerLayout, VLMAdapter
from atp.runtime.probe import ProjectionCapture
from atp.runtime.pruner import TokenPruner, TowerContext


class _TowerPass:
    """Scratch state of one tower forward. index / valid: [I, T] of the current slots."""

    def __init__(self, images: int, tokens: int, device: torch.device) -> None:
        self.index = torch.arange(tokens, device=device).expand(images, tokens)
        self.valid = torch.ones(images, tokens, dtype=torch.bool, device=device)
        self.mask: torch.Tensor | None = None  # [I, 1, T, T] additive key mask, None when nothing is padded
        self.layer_index: list[torch.Tensor] = []  # per layer run: the index of its input slots
        self.layer_valid: list[torch.Tensor] = []
        self.scratch: dict[str, Any] = {}
        self.scoring_seconds = 0.0  # wall time inside prune_vision (its scores and probes)


class TowerPruning:
    """The in-tower stages of one pruner on one model instance."""

    def __init__(self, adapter: VLMAdapter, pruner: TokenPruner) -> None:
        self.adapter = adapter
        self.pruner = pruner
        self.layout: TowerLayout = adapter.tower_layout()  # raises for towers that cannot be cut
        self.stages = tuple(pruner.vision_prune_layers(self.layout))
        self._check_stages()
        self.captures = {stage - 1: ProjectionCapture() for stage in self.stages if stage >= 1}
        self._pass: _TowerPass | None = None
        self.survivors: torch.Tensor | None = None  # [I, image_tokens] bool, the last tower pass
        self.vision_tokens: torch.Tensor | None = None  # [I, depth] real tokens each tower layer ran on
        self.scoring_seconds = 0.0  # of the last tower pass
        self._projector_slots: torch.Tensor | None = None

    def _check_stages(self) -> None:
        name, layout = self.pruner.name, self.layout
        if not self.stages:
            raise ValueError(f"{name}: prunes inside the vision tower but names no tower layer to cut before.")
        if list(self.stages) != sorted(set(self.stages)):
            raise ValueError(f"{name}: vision tower layers must be strictly increasing, got {list(self.stages)}.")
        for stage in self.stages:
            if not isinstance(stage, int) or stage < 0 or stage >= layout.depth:
                raise ValueError(
                    f"{name}: vision tower layer {stage} is past the tower's depth ({layout.depth} layers: "
                    f"valid cuts are before layers 0..{layout.depth - 1}). Choose a smaller layer."
                )
        for stage in self.stages:
            if stage > layout.feature_layers:
                raise ValueError(
                    f"{name}: a cut before vision layer {stage} cannot change what the projector reads (the "
                    f"output of layer {layout.feature_layers - 1}); cut before layers 0..{layout.feature_layers}."
                )

    # -- install ------------------------------------------------------------------------
    def install(self) -> list[torch.utils.hooks.RemovableHandle]:
        adapter, handles = self.adapter, []
        tower, projector = adapter.vision_tower, adapter.projector
        handles.append(tower.register_forward_pre_hook(self._begin, with_kwargs=True))
        handles.append(tower.register_forward_hook(self._end))
        for index, layer in enumerate(adapter.vision_layers):
            handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        for index, capture in self.captures.items():
            attn = adapter.vision_layers[index].self_attn
            for which, module in (("query", attn.q_proj), ("key", attn.k_proj), ("value", attn.v_proj)):
                handles.append(module.register_forward_hook(capture.hook(which)))
        handles.append(projector.register_forward_pre_hook(self._before_projector))
        handles.append(projector.register_forward_hook(self._after_projector))
        return handles

    # -- hooks ----------------------------------------------------------------------------
    def _begin(self, _module, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        if pixel_values is None:
            raise ValueError(f"{self.pruner.name}: the vision tower was called without pixel_values.")
        self._pass = _TowerPass(pixel_values.shape[0], self.layout.tokens, pixel_values.device)
        self.survivors = self.vision_tokens = None
        for capture in self.captures.values():
            capture.clear()
            capture.armed = True
        return None

    def _layer_hook(self, index: int):
        def before_layer(_module, args, kwargs):
            state = self._pass
            if state is None:
                raise RuntimeError("atp runtime: a vision tower layer ran outside the tower's forward.")
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if hidden.shape[:2] != state.index.shape:
                raise RuntimeError(
                    f"vision layer {index} received {tuple(hidden.shape[:2])} tokens, the runtime expected "
                    f"{tuple(state.index.shape)}: the tower's sequence is not one row per image as the adapter says."
                )
            if index in self.stages:
                hidden = self._run_stage(index, hidden)
            state.layer_index.append(state.index)
            state.layer_valid.append(state.valid)
            rest = args[2:] if len(args) > 2 else ()
            kwargs.pop("attention_mask", None)
            return (hidden, state.mask, *rest), kwargs

        return before_layer

    def _run_stage(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        state, layout = self._pass, self.layout
        prunable = state.valid & (state.index >= layout.prefix)
        ctx = TowerContext(
            layer=index,
            hidden=hidden,
            valid=state.valid,
            prunable=prunable,
            index=torch.where(state.valid, state.index, -1),
            tower=layout,
            attention=lambda rows=None: self._attention(index, rows),
            keys=lambda: self._projection(index, "key"),
            values=lambda: self._projection(index, "value"),
            scratch=state.scratch,
        )
        start = time.perf_counter()
        keep = self.pruner.prune_vision(ctx)
        if hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        state.scoring_seconds += time.perf_counter() - start
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != state.valid.shape:
            shape = getattr(keep, "shape", type(keep).__name__)
            raise ValueError(
                f"pruner {self.pruner.name!r}: prune_vision returned {shape}; expected a bool keep mask of shape "
                f"{tuple(state.valid.shape)} (images x tower slots)."
            )
        keep = state.valid & (keep | ~prunable)
        counts = keep.sum(1)
        width = int(counts.max())
        # survivors left-aligned in slot order (prefix first, patches in original order), padding after
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        state.valid = torch.arange(width, device=keep.device)[None] < counts[:, None]
        state.index = torch.where(state.valid, torch.gather(state.index, 1, order), 0)
        hidden = torch.gather(hidden, 1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        state.mask = None
        if not bool(state.valid.all()):
            bias = torch.zeros(state.valid.shape, dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(~state.valid, torch.finfo(hidden.dtype).min)
            state.mask = bias[:, None, None, :].expand(-1, 1, width, -1)
        return hidden

    def _capture(self, stage: int) -> tuple[ProjectionCapture, nn.Module]:
        if stage - 1 not in self.captures:
            raise ValueError(
                f"{self.pruner.name}: a cut before vision layer {stage} has no previous layer to read attention from."
            )
        capture = self.captures[stage - 1]
        if capture.query is None or capture.key is None or capture.value is None:
            raise RuntimeError(f"vision layer {stage - 1}'s q/k/v were not captured in this tower forward.")
        return capture, self.adapter.vision_layers[stage - 1].self_attn

    def _attention(self, stage: int, rows: int | None) -> torch.Tensor:
        """[I, H, R, T]: softmax(q k^T * scale + padding bias) of layer stage - 1 for the first R query
        rows (all when rows is None), 0 on padding."""
        capture, attn = self._capture(stage)
        valid = self._pass.valid
        query = capture.query if rows is None else capture.query[:, :rows]
        query = query.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2).float()
        key = capture.key.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2).float()
        scores = (query @ key.transpose(2, 3)) * attn.scale
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return probs.masked_fill(~valid[:, None, : probs.shape[2], None], 0.0)

    def _projection(self, stage: int, which: str) -> torch.Tensor:
        """[I, H, T, hd]: the k_proj ("key") or v_proj ("value") output of layer stage - 1 split in heads,
        0 on padding."""
        capture, attn = self._capture(stage)
        projected = getattr(capture, which).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
        return projected.masked_fill(~self._pass.valid[:, None, :, None], 0.0)

    def _end(self, _module, _args, output):
        state, layout = self._pass, self.layout
        self._pass = None
        for capture in self.captures.values():
            capture.armed = False
            capture.clear()
        if state is None:
            return None
        runs = len(state.layer_index)
        if runs != layout.depth:
            raise RuntimeError(f"the vision tower ran {runs} of its {layout.depth} layers; expected all of them.")
        # the tokens entering layer feature_layers: those of the features the projector reads, less a
        # cut made on those features (before layer feature_layers, when the tower has that layer)
        final = min(layout.feature_layers, layout.depth - 1)
        final_index, final_valid = state.layer_index[final], state.layer_valid[final]
        images = final_index.shape[0]
        kept = torch.zeros(images, layout.tokens, dtype=torch.bool, device=final_index.device)
        kept.scatter_(1, torch.where(final_valid, final_index, 0), final_valid)
        self.survivors = kept[:, layout.image_offset :]
        self.vision_tokens = torch.stack([valid.sum(1) for valid in state.layer_valid], 1).cpu()
        self.scoring_seconds = state.scoring_seconds
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None:
            # entry 0: the input of layer 0; entry j >= 1: the output of layer j - 1
            output.hidden_states = tuple(
                None if h is None else self._to_grid(h, state, max(j - 1, 0)) for j, h in enumerate(hidden_states)
            )
        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = self._to_grid(output.last_hidden_state, state, layout.depth - 1)
        attentions = getattr(output, "attentions", None)
        if attentions is not None:
            output.attentions = tuple(self._attention_to_grid(a, state, j) for j, a in enumerate(attentions))
        return output

    def _to_grid(self, values: torch.Tensor, state: _TowerPass, layer: int) -> torch.Tensor:
        """[I, T', d] in the slots layer `layer` ran on -> [I, tokens, d], zeros where a token was cut."""
        index, valid = state.layer_index[layer], state.layer_valid[layer]
        target = torch.where(valid, index, self.layout.tokens)  # padding goes to a spare column
        full = values.new_zeros(values.shape[0], self.layout.tokens + 1, values.shape[-1])
        full.scatter_(1, target[..., None].expand(-1, -1, values.shape[-1]), values)
        return full[:, : self.layout.tokens]

    def _attention_to_grid(self, attention: torch.Tensor, state: _TowerPass, layer: int) -> torch.Tensor:
        """[I, H, T', T'] -> [I, H, tokens, tokens], zeros in the rows and columns of cut tokens."""
        index, valid = state.layer_index[layer], state.layer_valid[layer]
        tokens = self.layout.tokens
        target = torch.where(valid, index, tokens)
        images, heads, width = attention.shape[:3]
        full = attention.new_zeros(images, heads, tokens + 1, width)
        full.scatter_(2, target[:, None, :, None].expand(-1, heads, -1, width), attention)
        grid = attention.new_zeros(images, heads, tokens + 1, tokens + 1)
        grid.scatter_(3, target[:, None, None, :].expand(-1, heads, tokens + 1, -1), full)
        return grid[:, :, :tokens, :tokens]

    def _before_projector(self, _module, args):
        survivors = self.survivors
        if survivors is None:
            return None
        features = args[0]
        if features.shape[:2] != survivors.shape:
            raise RuntimeError(
                f"the projector received features of shape {tuple(features.shape)}; the tower's survivors cover "
                f"{tuple(survivors.shape)} image tokens."
            )
        counts = survivors.sum(1)
        width = int(counts.max())
        slots = torch.sort((~survivors).to(torch.int8), dim=1, stable=True).indices[:, :width]
        filled = torch.arange(width, device=slots.device)[None] < counts[:, None]
        self._projector_slots = torch.where(filled, slots, survivors.shape[1])
        gathered = torch.gather(features, 1, slots[..., None].expand(-1, -1, features.shape[-1]))
        return (gathered, *args[1:])

    def _after_projector(self, _module, _args, output: torch.Tensor):
        slots, self._projector_slots = self._projector_slots, None
        if slots is None:
            return None
        images, tokens = self.survivors.shape
        full = output.new_zeros(images, tokens + 1, output.shape[-1])
        full.scatter_(1, slots[..., None].expand(-1, -1, output.shape[-1]), output)
        return full[:, :tokens]

    def take_survivors(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(survivors [I, image_tokens] bool, tokens per tower layer [I, depth], seconds spent in
        `prune_vision`) of the last tower pass,
        handed to the next LLM prefill, then forgotten. The pass may run outside the model's forward:
        `generate` encodes the images first and hands the features over as `mm_encoder_outputs`."""
        survivors, tokens, seconds = self.survivors, self.vision_tokens, self.scoring_seconds
        self.survivors = self.vision_tokens = None
        self.scoring_seconds = 0.0
        return survivors, tokens, seconds
