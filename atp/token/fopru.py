"""`fopru` (Jiang et al., 2024, "FoPru: Focal Pruning for Efficient Large Vision-Language Models",
arXiv 2411.14164): prune visual tokens before the LLM by a token significance read from the vision
encoder's attention, with a global (rank) or a local (row) strategy, then restore the original order.

No official code is published, and the paper's method section was not readable here (its abstract
was). The rule follows the abstract [paper] and, for what the abstract leaves open, the focal pruning
of HydraInfer (dongxianzhe/hydrainfer, `hydrainfer/layer/token_prunning.py`), a serving system by a
group including three of FoPru's authors [code]; what neither fixes is [ours] (docs/methods.md).

Per image (one image on a fixed grid of rows x cols tokens, LLaVA-1.5), with L the pre-softmax
attention logits q_i . k_j / sqrt(hd) of vision layer `vision_layer` (LLaVA's feature layer, -2)
between its N = rows x cols patch tokens ([CLS] left out), averaged over heads [code]:

    received[j] = mean_i L[i, j]        given[i] = mean_j L[i, j]
    significance = the one of the two with the larger variance (unbiased; `significance="auto"`,
                   [code]), or `"received"` / `"given"`

  rank [paper]: keep the k tokens of highest significance (ties: the earlier token [ours]).
  row  [paper]: rank the grid's rows by their summed significance (ties: the earlier row [ours]);
       keep the k // cols best rows whole [code], and when k is no multiple of cols the k % cols
       most significant tokens of the next row [ours: the budget is met exactly].

Kept tokens stay in their original order (the paper's reordering); positions compacted on LLaVA.
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, require_one_image_on_a_fixed_grid

STRATEGIES = ("rank", "row")
SIGNIFICANCES = ("auto", "received", "given")


def token_significance(logits: torch.Tensor, significance: str) -> torch.Tensor:
    """[N] significance of N patch tokens from their head-averaged attention logits [N, N] (query, key)."""
    received, given = logits.mean(0), logits.mean(1)
    if significance == "received":
        return received
    if significance == "given":
        return given
    return received if bool(received.var() > given.var()) else given  # [code] the more spread-out axis


def rank_selection(significance: torch.Tensor, keep: int) -> torch.Tensor:
    """[N] bool: the `keep` most significant tokens (stable: ties to the earlier token)."""
    order = torch.sort(significance, descending=True, stable=True).indices[:keep]
    chosen = torch.zeros(significance.shape[0], dtype=torch.bool, device=significance.device)
    chosen[order] = True
    return chosen


def row_selection(significance: torch.Tensor, row: torch.Tensor, rows: int, cols: int, keep: int) -> torch.Tensor:
    """[N] bool: the keep // cols rows of highest summed significance, then the keep % cols most
    significant tokens of the next row. significance, row: [N] (row: each token's grid row)."""
    row_score = torch.zeros(rows, dtype=significance.dtype, device=significance.device)
    row_score.index_add_(0, row, significance)
    ranked = torch.sort(row_score, descending=True, stable=True).indices
    full, rest = divmod(keep, cols)
    chosen = torch.isin(row, ranked[:full])
    if rest:
        partial = row == ranked[full]
        chosen |= rank_selection(significance.masked_fill(~partial, -torch.inf), rest) & partial
    return chosen


@register
class FoPru(TokenPruner):
    name = "fopru"
    reference_position_ids = "compact"  # [ours] the tokens are removed before the LLM, as FasterVLM's

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        strategy: str = "rank",
        significance: str = "auto",
        vision_layer: int = -2,
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        if strategy not in STRATEGIES:
            raise ValueError(f"fopru: strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if significance not in SIGNIFICANCES:
            raise ValueError(f"fopru: significance must be one of {SIGNIFICANCES}, got {significance!r}.")
        self.strategy = strategy
        self.significance = significance
        self.vision_layer = int(vision_layer)

    def vision_probe_layers(self) -> set[int]:
        return {self.vision_layer}

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        rows, cols = require_one_image_on_a_fixed_grid(self.name, ctx)
        counts = self.budget.count(ctx.visual_counts())
        query = ctx.vision_queries(self.vision_layer).double()  # [B, H, S, hd]
        key = ctx.vision_keys(self.vision_layer).double()
        keep = torch.zeros_like(ctx.visual)
        for b in range(ctx.visual.shape[0]):
            slots = ctx.visual[b].nonzero()[:, 0]  # the image's tokens, in order
            if slots.numel() == 0:
                continue
            q, k = query[b][:, slots], key[b][:, slots]  # [H, N, hd]
            logits = ((q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5).mean(0)  # [N, N] head mean
            significance = token_significance(logits, self.significance)
            if self.strategy == "rank":
                chosen = rank_selection(significance, int(counts[b]))
            else:
                chosen = row_selection(significance, ctx.geometry.row[b, slots], rows, cols, int(counts[b]))
            keep[b, slots[chosen]] = True
        return keep
