"""Revival of pruned prompt tokens in decode steps: LazyLLM's Aux Cache (arXiv 2407.14057, section 3.3),
for a pruner with `revives` in drop mode.

Every generation step selects its prompt tokens afresh, layer by layer (`pruner.select`, the same rule
as the prefill's stages), and a layer computes each token at most once over the whole generation:

  * Prefill: the runtime's drop mode. A token pruned before layer l leaves its hidden state entering l
    in the Aux Cache (`AuxCache.store`); layer l and the later layers never compute it.
  * Decode step t (one new token, original slot S0 + t): the rows the decoder runs are the new token
    plus the prompt tokens being revived. Before a pruning layer l the new token's attention at layer
    l-1 (its q_proj output and that layer's cached keys, `probe.cached_attention_rows`) scores the
    prompt tokens still selected; the rule keeps some. A selected token that layer l never computed is
    revived: its hidden state comes out of the Aux Cache and joins the rows; a revived row that the
    rule drops goes back into the Aux Cache at its new layer. The rows' keys and values are appended to
    each layer's KV cache as the layer runs (out of original order: each layer's cache entries keep
    their original slot in `entries[l]`, as `A2SFLayer.slots` does for A2SF).
  * Attention at layer l in step t: a row at slot s sees the cache entries and rows whose slot is
    <= s and selected in step t (prompt tokens: kept by this step's stages so far; generated tokens:
    always). Rotary ids are the tokens' original ones. Fill rows of a ragged batch see only themselves.

The paper keeps one Aux Cache per layer; a token sits in at most one of them at a time (the layer it was
last pruned before, `frontier`), so one row per token holds them all: aux [B, S0, d] with frontier [B, S0].
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from atp.runtime.layout import Layout, left_filled_slots
from atp.runtime.probe import cached_attention_rows


class AuxCache:
    """The hidden states of pruned prompt tokens, by original position.

    frontier: [B, S0] long, the first decoder layer that has not computed the token (num_layers: all have)
    hidden:   [B, S0, d], the token's hidden state entering layer `frontier` (where frontier < num_layers)
    """

    def __init__(self, batch: int, length: int, width: int, num_layers: int, dtype, device) -> None:
        self.num_layers = num_layers
        self.frontier = torch.full((batch, length), num_layers, dtype=torch.long, device=device)
        self.hidden = torch.zeros(batch, length, width, dtype=dtype, device=device)

    def store(self, layer: int, layout: Layout, hidden: torch.Tensor, removed: torch.Tensor) -> None:
        """Keep the hidden states [B, S, d] of the slots `removed` [B, S] (bool, in `layout`'s slots),
        which stop before `layer`."""
        rows, slots = (removed & layout.valid).nonzero(as_tuple=True)
        position = layout.index[rows, slots]
        self.hidden[rows, position] = hidden[rows, slots].to(self.hidden.dtype)
        self.frontier[rows, position] = layer


class RevivalDecoder:
    """Decode steps with revival over the KV cache a drop-mode prefill filled (see the module docstring).

    pruner:      the reviving pruner (`layers`, `probe_layers`, `select(layer, score, candidates)`)
    adapter:     the model adapter (`layers`, `rotary`)
    aux:         the prefill's `AuxCache`
    layouts:     the prefill's layout of every decoder layer (what each layer's cache holds, in order)
    candidates:  [B, S0] bool original positions the rule may prune (prompt tokens before the last one)
    prompt:      [B, S0] bool real prompt positions
    position:    [B, S0] long original position ids; rope: [B, S0, R] rotary ids or None
    captures:    {layer: ProjectionCapture} of the probe layers (q_proj outputs of this step's rows)
    steps:       per decode step {layer: [B, S0] bool prunable prompt tokens kept by the stage before layer}
    revived:     per decode step {layer: [B] long tokens revived before that layer}
    computed:    per decode step [B, L] long tokens each decoder layer ran (the new token and revived ones):
                 the `n` of a decode step's cost; `cache_tokens()` the KV entries each layer holds
    """

    def __init__(self, pruner, adapter, aux: AuxCache, layouts: list[Layout], candidates, prompt, position, rope):
        self.pruner, self.adapter, self.aux = pruner, adapter, aux
        self.entries = [torch.where(layout.valid, layout.index, -1) for layout in layouts]  # [B, K_l]
        self.candidates, self.prompt = candidates, prompt
        self.position, self.rope = position, rope
        self.length = prompt.shape[1]
        self.captures: dict = {}
        self.steps: list[dict[int, torch.Tensor]] = []
        self.revived: list[dict[int, torch.Tensor]] = []
        self.computed: list[torch.Tensor] = []
        self._inputs: dict[int, tuple] = {}

    def begin_step(self, position: torch.Tensor, rope: torch.Tensor | None, new_valid: torch.Tensor) -> None:
        """Start a decode step for one new token per sample: position [B, 1], rope [B, 1, R] or None,
        new_valid [B, T] validity of every token appended after the prompt (this one last)."""
        if position.shape[1] != 1:
            raise ValueError(
                f"{self.pruner.name}: decode steps with revival take one new token per sample, got "
                f"{position.shape[1]}. Generate token by token (model.generate does)."
            )
        batch = position.shape[0]
        if batch != self.prompt.shape[0]:
            raise ValueError(
                f"{self.pruner.name}: this decode step has {batch} rows, the prefill had {self.prompt.shape[0]}; "
                "revival follows each row's own tokens (no beam search or reordered caches). Use greedy or sampling."
            )
        slot = self.length + new_valid.shape[1] - 1
        self.selected = torch.cat([self.prompt, new_valid.bool()], 1)  # [B, S0 + T] over all original slots
        self.rows = torch.full((batch, 1), slot, dtype=torch.long, device=position.device)  # [B, R], -1: fill
        self.new_position, self.new_rope = position, rope
        self._inputs = {}
        self.steps.append({})
        self.revived.append({})
        self.computed.append(torch.zeros(batch, len(self.entries), dtype=torch.long))
        for capture in self.captures.values():
            capture.clear()
            capture.armed = True

    def end_step(self) -> None:
        for capture in self.captures.values():
            capture.armed = False
            capture.clear()

    def before_layer(self, index: int, hidden: torch.Tensor, cache) -> tuple[torch.Tensor, tuple]:
        """Hidden states [B, R, d] for decoder layer `index` and its (mask, rotary, position ids)."""
        layer_cache = cache.layers[index] if cache is not None else None
        if type(layer_cache) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(
                f"{self.pruner.name}: revival appends revived tokens to each layer's KV cache and needs transformers' "
                f"default dynamic cache; this decode step got {type(layer_cache).__name__} at layer {index} "
                "(an A2SFCache, a static or quantized cache?). Generate without a custom cache, or build the pruner "
                "with revival=False."
            )
        if index in self.pruner.layers:
            hidden = self._stage(index, hidden, cache)
        rows = self.rows
        keys = torch.cat([self.entries[index], rows], 1)  # [B, K + R] slots, -1: fill
        window = getattr(layer_cache, "sliding_window", None)
        if window is not None and keys.shape[1] > window - 1:  # the layer would crop its oldest entries
            raise ValueError(
                f"{self.pruner.name}: layer {index}'s sliding-window cache keeps {window - 1} entries, and with the "
                f"revived tokens it would hold {keys.shape[1]}; revival needs every entry. Generate fewer tokens "
                "or use a model without sliding-window attention."
            )
        seen = torch.gather(self.selected, 1, keys.clamp_min(0)) & (keys >= 0)
        visible = seen[:, None, :] & (keys[:, None, :] <= rows[:, :, None])  # [B, R, K + R]
        own = torch.zeros_like(visible)
        own[:, :, -rows.shape[1] :] = torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
        visible = torch.where((rows < 0)[..., None], own, visible)  # fill rows see only themselves
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[:, None]
        position, rope = self._row_positions(rows)
        rotary = self.adapter.rotary(hidden, position, rope)
        self.entries[index] = keys
        self.computed[-1][:, index] = (rows >= 0).sum(1).cpu()
        prompt_rows = (rows >= 0) & (rows < self.length)
        b, r = prompt_rows.nonzero(as_tuple=True)
        self.aux.frontier[b, rows[b, r]] = index + 1
        self._inputs[index] = (mask, rotary)
        return hidden, (mask, rotary, position)

    def cache_tokens(self) -> torch.Tensor:
        """[B, L] long: real entries (tokens) each decoder layer's KV cache holds now."""
        return torch.stack([(entries >= 0).sum(1) for entries in self.entries], 1).cpu()

    def _row_positions(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Original position ids [B, R] (and rotary ids [B, R, R'] or None) of the rows."""
        prompt = rows.clamp(0, self.length - 1)
        position = torch.where(rows >= self.length, self.new_position, torch.gather(self.position, 1, prompt))
        if self.rope is None:
            return position, None
        rope = torch.gather(self.rope, 1, prompt[..., None].expand(-1, -1, self.rope.shape[-1]))
        return position, torch.where((rows >= self.length)[..., None], self.new_rope, rope)

    def _score(self, layer: int, cache) -> torch.Tensor:
        """[B, S0] the new token's attention at decoder layer `layer` (mean over heads) per prompt token."""
        capture = self.captures[layer]
        if capture.query is None:
            raise RuntimeError(f"layer {layer}'s q projection was not captured in this decode step.")
        mask, (cos, sin) = self._inputs[layer]
        attn = self.adapter.layers[layer].self_attn
        keys = cache.layers[layer].keys
        probs = cached_attention_rows(attn, capture.query[:, -1:], keys, (cos[:, -1:], sin[:, -1:]), mask[:, :, -1:])
        entries = self.entries[layer]  # [B, K] slots of the cache entries, this step's rows last
        score = probs.mean(1)[:, 0]  # [B, K]
        full = score.new_zeros(score.shape[0], self.selected.shape[1] + 1)
        full.scatter_add_(1, torch.where(entries >= 0, entries, full.shape[1] - 1), score)
        return full[:, : self.length]

    def _stage(self, layer: int, hidden: torch.Tensor, cache) -> torch.Tensor:
        """Select before `layer`; drop the rows the rule rejects into the Aux Cache, revive the selected
        tokens that layer never computed, and return the new rows' hidden states [B, R', d]."""
        prompt_selected = self.selected[:, : self.length]
        candidates = prompt_selected & self.candidates
        keep = self.pruner.select(layer, self._score(layer - 1, cache), candidates)
        prompt_selected = prompt_selected & keep
        self.selected[:, : self.length] = prompt_selected
        rows = self.rows
        b, r = ((rows >= 0) & (rows < self.length)).nonzero(as_tuple=True)  # the prompt rows in flight
        position = rows[b, r]
        in_flight = torch.zeros_like(prompt_selected)
        in_flight[b, position] = True
        dropped = ~prompt_selected[b, position]
        self.aux.hidden[b[dropped], position[dropped]] = hidden[b[dropped], r[dropped]].to(self.aux.hidden.dtype)
        self.aux.frontier[b[dropped], position[dropped]] = layer
        revived = prompt_selected & (self.aux.frontier == layer) & ~in_flight
        slot, filled = left_filled_slots((in_flight & prompt_selected) | revived)
        prompt_hidden = torch.gather(self.aux.hidden, 1, slot[..., None].expand(-1, -1, hidden.shape[-1]))
        prompt_hidden = prompt_hidden.to(hidden.dtype).masked_fill(~filled[..., None], 0.0)
        new_row = torch.full((slot.shape[0], self.length + 1), -1, dtype=torch.long, device=slot.device)
        order = torch.arange(slot.shape[1], device=slot.device).expand_as(slot)
        new_row.scatter_(1, torch.where(filled, slot, self.length), order)  # fill rows write the dump column
        kept = ~dropped
        prompt_hidden[b[kept], new_row[b[kept], position[kept]]] = hidden[b[kept], r[kept]]
        self.rows = torch.cat([torch.where(filled, slot, -1), rows[:, -1:]], 1)
        self.steps[-1][layer] = prompt_selected & self.candidates
        self.revived[-1][layer] = revived.sum(1)
        return torch.cat([prompt_hidden, hidden[:, -1:]], 1)
