"""`aim` (Zhong et al., ICCV 2025, "AIM: adaptive inference of multi-modal LLMs via token merging
and pruning"): merge similar visual tokens before the LLM, then prune them by PageRank inside it.

Merge (before the LLM, on the image features at the projector input): bipartite soft matching,
once per entry of `merge_removals` (r, at most half the tokens): the tokens at even places are
sources, at odd places destinations; each source's most similar destination by the cosine of
their metric (the last vision layer's keys, heads concatenated); the r sources with the most
similar match are averaged into their destinations (scatter mean, the destination itself
included); the new sequence is the other sources, most similar first, then the destinations
in order. The metric is merged the same way. The merged features are then projected.
Prune (inside the LLM): after layer l >= `start_layer`, keep int(N' x max(0, 1 - (l - start + 1)
x step)) visual tokens (N' = visual tokens after the merge) by PageRank importance in layer l:
M = softmax(logits / temperature) per head, d_0 uniform over the tokens present, d <- d M
`iterations` times, importance = sqrt(mean over heads of d^2).
Positions: compact after the merge and original inside the LLM, as the reference (which builds
a shorter input and then masks).
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, register
from atp.token.selection import require_one_image_on_a_fixed_grid, top_k_per_sample

MERGE_REMOVALS = (288, 36)  # [paper] LLaVA-1.5: 576 -> 288 -> 252 tokens ("43.75 %")
START_LAYER, STEP = 13, 0.125  # [paper] LLaVA-1.5's schedule (32 layers)


def bipartite_merge(
    features: torch.Tensor, metric: torch.Tensor, removals: list[int]
) -> tuple[torch.Tensor, list[list[int]]]:
    """AIM's merge of one image's tokens: features [n, dv], metric [n, dm] in token order.

    Returns (merged [m, dv] in the final order, groups: for each merged token the input indices it
    holds, its host first: the destination, or the source itself when nothing joined it).
    """
    x, key = features.float(), metric.float()
    groups = [[i] for i in range(len(x))]
    for r in removals:
        t = len(x)
        r = min(int(r), t // 2)
        if r <= 0:
            continue
        unit = key / key.norm(dim=-1, keepdim=True)
        best, match = (unit[0::2] @ unit[1::2].T).max(-1)  # each source's best destination
        edge = torch.sort(best, descending=True, stable=True).indices
        kept_sources, merged_sources = edge[r:], edge[:r]
        destination = match[merged_sources]
        count = torch.ones(t // 2, device=x.device).index_add_(0, destination, torch.ones(r, device=x.device))
        sources, targets = groups[0::2], groups[1::2]
        for s, d in zip(merged_sources.tolist(), destination.tolist()):
            targets[d] = targets[d] + sources[s]
        groups = [sources[s] for s in kept_sources.tolist()] + targets
        x = _merge_step(x, kept_sources, merged_sources, destination, count)
        key = _merge_step(key, kept_sources, merged_sources, destination, count)
    return x.to(features.dtype), groups


def _merge_step(x, kept_sources, merged_sources, destination, count) -> torch.Tensor:
    """[kept sources..., destinations averaged with the sources merged into them]."""
    source, target = x[0::2], x[1::2]
    target = target.index_add(0, destination, source[merged_sources]) / count[:, None]
    return torch.cat([source[kept_sources], target])


def merged_count(num_visual: int, removals: list[int]) -> int:
    """Tokens left after merging `num_visual` tokens with `removals`."""
    for r in removals:
        num_visual -= max(0, min(int(r), num_visual // 2))
    return num_visual


def pagerank(probabilities: torch.Tensor, present: torch.Tensor, iterations: int) -> torch.Tensor:
    """[B, S] AIM importance: probabilities [B, H, S, S] (rows: queries), present [B, S] bool."""
    rows = torch.where(present[:, None, :, None], probabilities, 0.0)
    distribution = (present.float() / present.sum(1, keepdim=True))[:, None, None, :].expand(-1, rows.shape[1], 1, -1)
    for _ in range(iterations):
        distribution = distribution @ rows
    return distribution[:, :, 0].pow(2).mean(1).sqrt()


@register
class AIM(TokenPruner):
    name = "aim"
    reference_position_ids = "compact"  # [paper] compact after the merge (stage_position_policy: original later)
    needs_vision_features = True

    def __init__(
        self,
        merge_removals: list[int] = MERGE_REMOVALS,
        start_layer: int = START_LAYER,
        step: float = STEP,
        temperature: float = 0.1,
        iterations: int = 5,
        vision_layer: int = -1,
        position_ids: str = "reference",
    ) -> None:
        removals = [int(r) for r in merge_removals]
        if any(r < 0 for r in removals):
            raise ValueError(f"aim: merge_removals are token counts >= 0, got {list(merge_removals)}.")
        if not (isinstance(start_layer, int) and start_layer >= 0 and 0 < float(step) <= 1):
            raise ValueError(f"aim: start_layer must be >= 0 and step in (0, 1], got {start_layer!r}, {step!r}.")
        if not float(temperature) > 0 or int(iterations) < 1:
            raise ValueError(f"aim: temperature must be > 0 and iterations >= 1, got {temperature!r}, {iterations!r}.")
        stages, layer = [], start_layer  # before layer l + 1 for every l from start_layer to the first rate 0
        while True:
            stages.append(layer + 1)
            if self._rate_of(layer, start_layer, float(step)) == 0:
                break
            layer += 1
        super().__init__(([0] if any(removals) else []) + stages, position_ids)
        self.merge_removals = tuple(removals)
        self.start_layer, self.step = start_layer, float(step)
        self.temperature, self.iterations = float(temperature), int(iterations)
        self.vision_layer = int(vision_layer)

    @staticmethod
    def _rate_of(layer: int, start: int, step: float) -> float:
        return max(0.0, 1.0 - (layer - start + 1) * step) if layer >= start else 1.0

    def retain_rate(self, layer: int) -> float:
        """[paper] the share of the merged visual tokens kept after decoder layer `layer`."""
        return self._rate_of(layer, self.start_layer, self.step)

    def stage_position_policy(self, layer: int, policy: str) -> str:
        return policy if layer == 0 or self.position_ids != "reference" else "original"

    def vision_probe_layers(self) -> set[int]:
        return {self.vision_layer} if self.merge_removals else set()

    def probe_layers(self) -> set[int]:
        return {layer - 1 for layer in self.layers if layer > 0}

    def validate(self, num_layers: int) -> None:
        if self.layers[-1] >= num_layers:
            raise ValueError(
                f"aim: the schedule (start_layer={self.start_layer}, step={self.step}) prunes up to before layer "
                f"{self.layers[-1]}, at or past the model's {num_layers} decoder layers. Choose a smaller start_layer."
            )

    def prune(self, ctx: PruneContext) -> torch.Tensor | MergeDecision:
        return self._merge(ctx) if ctx.layer == 0 else self._pagerank_stage(ctx)

    def _pagerank_stage(self, ctx: PruneContext) -> torch.Tensor:
        slots = torch.arange(ctx.visual.shape[1], device=ctx.visual.device).expand_as(ctx.visual)
        probabilities = ctx.attention(ctx.layer - 1, slots, temperature=self.temperature)  # [B, H, S, S]
        pruned_before = (ctx.visual_index >= 0) & ~ctx.visual
        importance = pagerank(probabilities, ctx.real & ~pruned_before, self.iterations)
        after_merge = torch.tensor([merged_count(int(n), self.merge_removals) for n in ctx.num_visual])
        keep = torch.floor(after_merge.double() * self.retain_rate(ctx.layer - 1)).long().to(ctx.visual.device)
        return top_k_per_sample(importance, ctx.visual, keep.clamp_max(ctx.visual_counts()))

    def _merge(self, ctx: PruneContext) -> MergeDecision:
        require_one_image_on_a_fixed_grid("aim", ctx)
        keys = ctx.vision_keys(self.vision_layer)  # [B, H, S, hd]
        metric = keys.transpose(1, 2).flatten(2)  # [B, S, H * hd]: the k projection's output
        features = ctx.vision_features()  # [B, S, dv]
        keep = torch.zeros_like(ctx.visual)
        hidden, replaced = ctx.hidden.clone(), torch.zeros_like(ctx.visual)
        order = torch.arange(keep.shape[1], device=keep.device, dtype=torch.float64).expand(keep.shape).clone()
        for b in range(keep.shape[0]):
            slots = ctx.visual[b].nonzero()[:, 0]  # in token order
            if len(slots) == 0:
                continue
            merged, groups = bipartite_merge(features[b, slots], metric[b, slots], self.merge_removals)
            hosts = slots[torch.tensor([group[0] for group in groups], device=slots.device)]
            keep[b, hosts] = True
            order[b, hosts] = torch.arange(len(hosts), device=keep.device, dtype=torch.float64)
            joined = torch.tensor([len(group) > 1 for group in groups], device=slots.device)
            hidden[b, hosts[joined]] = ctx.project(merged[joined]).to(hidden.dtype)
            replaced[b, hosts[joined]] = True
        return MergeDecision(keep=keep, hidden=hidden, replaced=replaced, order=order)
