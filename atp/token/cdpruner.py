"""`cdpruner` (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs"; official code Theia-4869/CDPruner): keep the visual tokens
a conditional determinantal point process picks, before the LLM.

Per sample, for a budget of T tokens (`keep_tokens`, or `keep_ratio` of the visual tokens):
- similarity S_ij: cosine of the projected visual tokens i, j (the LLM input);
- relevance r_i [ours, see below]: cosine of token i with the mean input embedding of the
  instruction tokens (negated when `negate_relevance`), then min-max normalised over the
  sample's visual tokens: (r - min + 1e-6) / (max - min);
- kernel L = diag(r) S diag(r); greedy MAP inference (Chen et al., 2018): T times pick the token
  with the largest conditional variance d_j^2 (initially L_jj), then for every token
  e = (L_j - sum_k c_k[j] c_k) / d_j, append e to the c vectors, d^2 -= e^2, and exclude j;
- keep the picked tokens in original order; positions compacted, as the reference (original
  M-RoPE ids where compaction has no defined rule [ours]).
The reference takes relevance from CLIP's text tower (the question's pooled embedding) and
CLIP's visual projection, which an HF LLaVA model does not contain; here the instruction's own
LLM input embeddings stand in for it [ours]. A prompt without instruction tokens gets r = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget

EPS = 1e-6  # [paper code] in the min-max normalisation of the relevance
RANK_TOLERANCE = 1e-5  # [ours] a conditional variance below this share of the largest L_jj counts as spent


def relevance(visual: torch.Tensor, instruction: torch.Tensor, negate: bool) -> torch.Tensor:
    """[N] min-max normalised relevance of visual tokens [N, d] to instruction embeddings [M, d]."""
    if instruction.shape[0] == 0:
        return visual.new_ones(visual.shape[0])
    score = F.cosine_similarity(visual, instruction.mean(0, keepdim=True), dim=-1)
    score = -score if negate else score
    return (score - score.min() + EPS) / (score.max() - score.min())


def greedy_dpp(kernel: torch.Tensor, count: int) -> list[int]:
    """Indices (in pick order) of `count` items of a DPP with kernel [N, N] by greedy MAP inference.

    When no item has a conditional variance above RANK_TOLERANCE x max L_jj left (the kernel's
    rank is spent: count above the feature width; what is left is rounding noise), the rest
    follow in descending L_jj (ties: earlier first) [ours]."""
    vectors = kernel.new_zeros(count, kernel.shape[0])  # the incremental Cholesky rows c_k
    variance = kernel.diagonal().clone()  # d_j^2
    picked: list[int] = []
    floor = RANK_TOLERANCE * float(variance.max())
    for step in range(count):
        j = int(variance.argmax())
        if not variance[j] > floor:
            taken = set(picked)
            by_diagonal = torch.sort(kernel.diagonal(), descending=True, stable=True).indices.tolist()
            return picked + [i for i in by_diagonal if i not in taken][: count - step]
        picked.append(j)
        row = (kernel[j] - vectors[:step, j] @ vectors[:step]) / variance[j].sqrt()
        vectors[step] = row
        variance = variance - row**2
        variance[j] = -torch.inf
    return picked


@register
class CDPruner(TokenPruner):
    name = "cdpruner"
    reference_position_ids = "compact"  # [paper] the reference removes the tokens before the LLM

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        negate_relevance: bool = False,
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        self.negate_relevance = bool(negate_relevance)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        counts = self.budget.count(ctx.visual_counts())
        keep = torch.zeros_like(ctx.visual)
        for b, total in enumerate(counts.tolist()):
            slots = ctx.visual[b].nonzero()[:, 0]
            if total == 0:
                continue
            visual = ctx.hidden[b, slots].float()
            unit = F.normalize(visual, dim=-1)
            weight = relevance(visual, ctx.hidden[b, ctx.instruction[b]].float(), self.negate_relevance)
            kernel = weight[:, None] * (unit @ unit.T) * weight[None, :]
            keep[b, slots[greedy_dpp(kernel, total)]] = True
        return keep
