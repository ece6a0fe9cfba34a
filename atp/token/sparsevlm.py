"""`sparsevlm` (Zhang et al., ICML 2025, SparseVLM v1.5): text-guided visual token
sparsification inside the LLM, with recycling of deleted tokens.

Raters, once from the LLM input embeddings: relevance of instruction token t =
mean over visual tokens v of softmax_t(V T^T) (softmax over the instruction tokens);
the raters are the instruction tokens whose relevance exceeds the mean relevance.
At each pruning layer l: score(v) = layer l's attention from the raters to v, averaged
over heads, then over raters; keep the top min(k_l, V - 1) visual tokens present (V
counts merged tokens of earlier stages). The reference prunes layer l's *output*, so the
tokens leave before layer l + 1: the runtime stage runs there and reads layer l's
attention through its probe.
Recycling (v1.5): of the deleted tokens, the top int(0.3 D) + 1 by score are clustered
with DPC-kNN into int(m / 10) + 1 tokens (each the mean of its cluster's hidden states
leaving layer l), placed after the kept visual tokens. Positions are compacted.
On M-RoPE families (Qwen-VL) the default (`position_ids="reference"`) keeps original ids [ours].

Deviations from the reference code, both deterministic choices where it is random or
undefined: DPC-kNN's densities get no random jitter (exact ties keep the maximal parent
distance), and a prompt without raters (all instruction tokens equally relevant) is
scored by all its instruction tokens.
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, register
from atp.token.selection import top_k_per_sample

SCORE_LAYERS = (2, 6, 15)  # LLaVA-1.5-7B: layers whose attention scores each stage
SCHEDULES = {  # visual tokens kept after each of those layers, per published budget
    "192": (300, 200, 110),
    "128": (303, 110, 36),
    "64": (66, 30, 17),
}
RECYCLE_SHARE = 0.3  # of the deleted tokens, the top 30 % by score are recycled
CLUSTER_SHARE = 10  # into one merged token per 10 of them (+ 1)


def rater_mask(embeds: torch.Tensor, visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """[B, S0] bool: SparseVLM's raters among the instruction tokens.

    embeds: [B, S0, d] LLM input embeddings; visual, instruction: [B, S0] bool.
    """
    raters = torch.zeros_like(instruction)
    for b in range(embeds.shape[0]):
        text = instruction[b].nonzero()[:, 0]
        if len(text) == 0:
            continue
        relevance = torch.softmax(embeds[b, visual[b]].float() @ embeds[b, text].float().T, dim=1).mean(0)
        chosen = text[relevance > relevance.mean()]
        raters[b, chosen if len(chosen) else text] = True
    return raters


def dpc_knn_merge(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering and merging of tokens [N, C] into `clusters` tokens.

    Density of a token: exp(-mean squared distance to its `clusters` nearest tokens, itself
    included), distances scaled by 1 / sqrt(C). Its parent distance: the distance to the
    nearest denser token (the largest distance of all if none). Centres: the `clusters`
    largest density x parent distance, in that order (ties: the earlier token, which is the
    better-scored one for recycling [ours]); every token joins its nearest centre.
    Returns (merged [clusters, C]: the mean of each cluster, centres [clusters] long).
    """
    x = tokens.float()
    distance = (x[:, None] - x[None]).norm(dim=-1) / x.shape[1] ** 0.5  # [N, N]
    density = torch.exp(-(distance.topk(clusters, dim=-1, largest=False).values ** 2).mean(-1))
    denser = density[None, :] > density[:, None]  # [i, j]: token j is denser than token i
    parent = torch.where(denser, distance, distance.max()).min(-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]  # ties: earlier token
    cluster = distance[centres].argmin(0)
    cluster[centres] = torch.arange(clusters, device=x.device)
    sizes = torch.bincount(cluster, minlength=clusters).to(x.dtype)
    merged = torch.zeros(clusters, x.shape[1], device=x.device).index_add_(0, cluster, x)
    return (merged / (sizes[:, None] + 1e-6)).to(tokens.dtype), centres


@register
class SparseVLM(TokenPruner):
    name = "sparsevlm"
    reference_position_ids = "compact"  # [paper] the reference code compacts positions

    def __init__(
        self,
        layers: list[int] = SCORE_LAYERS,
        schedule: str | int | None = "192",
        keep_tokens: list[int] | None = None,
        recycle: bool = True,
        position_ids: str = "reference",
    ) -> None:
        score_layers = [int(layer) for layer in layers]
        super().__init__([layer + 1 for layer in score_layers], position_ids)
        if keep_tokens is None:
            if str(schedule) not in SCHEDULES:
                raise ValueError(
                    f"sparsevlm: schedule must be one of {sorted(SCHEDULES)} (the published budgets), got "
                    f"{schedule!r}; or give keep_tokens, one count per layer."
                )
            keep_tokens = SCHEDULES[str(schedule)]
        counts = [int(k) for k in keep_tokens]
        if len(counts) != len(score_layers) or min(counts) < 1:
            raise ValueError(
                f"sparsevlm: keep_tokens needs one positive count per layer {score_layers}, got {list(keep_tokens)}."
            )
        self.score_layers = tuple(score_layers)
        self.keep_tokens = dict(zip(self.layers, counts))
        self.recycle = bool(recycle)

    def probe_layers(self) -> set[int]:
        return set(self.score_layers)

    def validate(self, num_layers: int) -> None:
        for layer in self.score_layers:
            if layer + 1 >= num_layers:
                raise ValueError(
                    f"sparsevlm: layer {layer} is past what a model with {num_layers} decoder layers allows: tokens "
                    f"leave after the scoring layer, so layers must be at most {num_layers - 2}."
                )

    def prune(self, ctx: PruneContext) -> torch.Tensor | MergeDecision:
        raters = torch.gather(rater_mask(ctx.input_embeds, ctx.input_visual, ctx.input_instruction), 1, ctx.origin)
        raters &= ctx.instruction
        none = raters.sum(1) == 0
        raters[none, ctx.last_prompt[none]] = True  # a prompt without instruction: its last token rates
        count = raters.sum(1)
        queries = torch.sort(raters.long(), dim=1, descending=True, stable=True).indices[:, : int(count.max())]
        valid = torch.arange(queries.shape[1], device=queries.device)[None] < count[:, None]  # [B, Q]
        rows = ctx.attention(ctx.layer - 1, queries).mean(1)  # [B, Q, S]
        score = (rows * valid[..., None]).sum(1) / count[:, None]
        present = ctx.visual_counts()
        keep = top_k_per_sample(score, ctx.visual, (present - 1).clamp_max(self.keep_tokens[ctx.layer]).clamp_min(0))
        if not self.recycle:
            return keep
        return self._recycle(ctx, score, keep)

    def _recycle(self, ctx: PruneContext, score: torch.Tensor, keep: torch.Tensor) -> MergeDecision:
        """Merge the best-scored deleted tokens into a few tokens placed after the kept ones."""
        hidden = ctx.hidden.clone()
        replaced = torch.zeros_like(keep)
        order = torch.arange(keep.shape[1], device=keep.device, dtype=torch.float64).expand(keep.shape).clone()
        for b in range(keep.shape[0]):
            deleted = (ctx.visual[b] & ~keep[b]).nonzero()[:, 0]
            if len(deleted) == 0:
                continue
            recycled = int(len(deleted) * RECYCLE_SHARE) + 1
            chosen = deleted[torch.topk(score[b, deleted], recycled).indices]
            merged, centres = dpc_knn_merge(ctx.hidden[b, chosen], recycled // CLUSTER_SHARE + 1)
            hosts = chosen[centres]  # a merged token lives in its centre's slot
            hidden[b, hosts] = merged
            replaced[b, hosts] = True
            order[b, hosts] = keep.shape[1] + torch.arange(len(hosts), device=keep.device, dtype=torch.float64)
        return MergeDecision(keep=keep | replaced, hidden=hidden, replaced=replaced, order=order)
