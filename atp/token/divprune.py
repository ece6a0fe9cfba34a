"""`divprune` (Alvar et al., 2025): keep a maximally diverse subset at the LLM input.

Distance D = 1 - cosine similarity between the projected visual tokens of a sample. The
first token is the one farthest from its nearest neighbour; then repeatedly add the
token whose minimum distance to the chosen set is largest (max-min diversity). Acts
before the LLM (layer 0); positions are compacted, as in the reference code.
On M-RoPE families (Qwen-VL) the default (`position_ids="reference"`) keeps original ids [ours].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (in selection order) of `count` rows of features [N, d] by greedy max-min distance."""
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.T  # [N, N]
    nearest = distance.masked_fill(torch.eye(len(unit), dtype=torch.bool, device=unit.device), float("inf"))
    chosen = [int(nearest.min(1).values.argmax())]
    closest = distance[chosen[0]].clone()  # distance of every token to the chosen set
    for _ in range(count - 1):
        closest[chosen] = -1.0
        chosen.append(int(closest.argmax()))
        closest = torch.minimum(closest, distance[chosen[-1]])
    return torch.tensor(chosen, device=features.device)


@register
class DivPrune(TokenPruner):
    name = "divprune"
    reference_position_ids = "compact"  # [paper] the reference code compacts positions

    def __init__(
        self, keep_ratio: float = 0.098, keep_tokens: int | None = None, position_ids: str = "reference"
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio, keep_tokens)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        keep = torch.zeros_like(ctx.visual)
        counts = self.budget.count(ctx.visual_counts())
        for b in range(keep.shape[0]):
            slots = ctx.visual[b].nonzero()[:, 0]
            if len(slots):
                keep[b, slots[max_min_diverse(ctx.hidden[b, slots], int(counts[b]))]] = True
        return keep
