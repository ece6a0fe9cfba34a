"""`transprune` (Li et al., 2025, TransPrune): drop visual tokens in stages by token transition
variation plus instruction-guided attention.

Transition of a token through one block (attention or MLP) of a layer in `transition_layers`,
from the block's input x (the normed hidden state) to its output y (before the residual):

    T = ||y|| / ||x|| * exp(1 - cos(x, y)) / sum over the tokens present of exp(1 - cos(x, y))

summed over the two blocks. Before each stage layer l: accumulate T over the transition layers
before l and normalise it over the visual tokens present (sum + 1e-8); attention = layer l's
attention (on its input) from the instruction tokens to each visual token, averaged over heads
and then instruction tokens, normalised the same way; keep the top int(N x ratio) by the sum of
the two (N: the visual tokens at the LLM input; the last stage keeps `keep_tokens` when given).
Positions are compacted after each stage, as in the reference code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import check_keep_ratio, top_k_per_sample

STAGES = (7, 9, 12)  # [paper] the reference's pruning_layer_list, 1-based layers = "before" these 0-based layers
TRANSITIONS = (6, 7, 8, 9, 10, 11)  # [paper] accmulating_layer_list 7..12 (1-based)
RATIOS = (0.875, 0.625, 0.125)  # [paper] image_token_ratio_list


def transition(before: torch.Tensor, after: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B, S] float32 transition of each token through one block; 0 where `present` [B, S] is False.

    before, after: [B, S, d] the block's input and output.
    """
    x, y = before.float(), after.float()
    length_ratio = y.norm(dim=-1) / x.norm(dim=-1)
    turn = torch.exp(1 - F.cosine_similarity(x, y, dim=-1)).masked_fill(~present, 0.0)
    return torch.where(present, length_ratio * turn / turn.sum(1, keepdim=True), 0.0)


@register
class TransPrune(TokenPruner):
    name = "transprune"
    reference_position_ids = "compact"  # [paper] the reference renumbers positions after each stage

    def __init__(
        self,
        layers: list[int] = STAGES,
        transition_layers: list[int] = TRANSITIONS,
        keep_ratios: list[float] = RATIOS,
        keep_tokens: int | None = None,
        position_ids: str = "reference",
    ) -> None:
        super().__init__(list(layers), position_ids)
        if 0 in self.layers:
            raise ValueError("transprune: stages read the transitions of earlier layers, so layers must be >= 1.")
        ratios = [check_keep_ratio(self.name, r) for r in keep_ratios]
        if len(ratios) != len(self.layers) or any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(
                f"transprune: keep_ratios needs one non-increasing fraction per layer {list(self.layers)}, "
                f"got {ratios}."
            )
        transitions = sorted({int(t) for t in transition_layers})
        if not transitions or transitions[0] < 0 or transitions[0] >= self.layers[0]:
            raise ValueError(
                f"transprune: transition_layers must include a layer before the first stage {self.layers[0]} "
                f"(0-based, >= 0), got {list(transition_layers)}."
            )
        if transitions[-1] >= self.layers[-1]:
            raise ValueError(
                f"transprune: transition layer {transitions[-1]} runs after the last stage (before layer "
                f"{self.layers[-1]}), so no stage could read it. Give layers below {self.layers[-1]}."
            )
        if keep_tokens is not None and (isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int)):
            raise ValueError(f"transprune: keep_tokens must be a positive integer, got {keep_tokens!r}.")
        if keep_tokens is not None and keep_tokens < 1:
            raise ValueError(f"transprune: keep_tokens must be a positive integer, got {keep_tokens!r}.")
        self.transition_layers = tuple(transitions)
        self.keep_ratios = dict(zip(self.layers, ratios))
        self.keep_tokens = keep_tokens

    def sublayer_layers(self) -> set[int]:
        return set(self.transition_layers)

    def observe_sublayer(self, before: torch.Tensor, after: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return transition(before, after, present)

    def stage_counts(self, num_visual: torch.Tensor, present: torch.Tensor, layer: int) -> torch.Tensor:
        """[B] tokens kept before `layer`: int(N x ratio) of the N visual tokens at the LLM input [paper],
        `keep_tokens` at the last stage when given; num_visual, present: [B] visual tokens at the input, now."""
        if layer == self.layers[-1] and self.keep_tokens is not None:
            short = (num_visual > 0) & (present < self.keep_tokens)
            if bool(short.any()):
                raise ValueError(
                    f"transprune: keep_tokens={self.keep_tokens} is more than the {int(present[short].min())} visual "
                    "tokens the earlier stages kept. Lower keep_tokens or raise keep_ratios."
                )
            return torch.where(num_visual > 0, self.keep_tokens, 0).to(num_visual)
        return torch.floor(num_visual.double() * self.keep_ratios[layer]).long().clamp_max(present)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        visual = ctx.visual
        accumulated = sum(ctx.sublayer(t).sum(1) for t in self.transition_layers if t < ctx.layer)  # [B, S]
        accumulated = _normalise(accumulated, visual)
        queries = ctx.instruction.clone()
        none = queries.sum(1) == 0
        queries[none, ctx.last_prompt[none]] = True  # [ours] a prompt without instruction: its last token asks
        weights = (queries.float() / queries.sum(1, keepdim=True))[:, None]  # [B, 1, S] mean over queries
        attention = _normalise(ctx.attention_received(ctx.layer, weights)[:, 0], visual)
        keep = self.stage_counts(ctx.num_visual, ctx.visual_counts(), ctx.layer)
        return top_k_per_sample(accumulated + attention, visual, keep)


def _normalise(score: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """score [B, S] over the visual slots divided by its sum there + 1e-8 [paper]; 0 elsewhere."""
    score = torch.where(visual, score, 0.0)
    return score / (score.sum(1, keepdim=True) + 1e-8)
