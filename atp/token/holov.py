"""`holov` (NeurIPS 2025, arXiv 2510.02912, "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting
Visual Holistic Context Retention"; official code obananas/HoloV): share the budget among crops of
the image by a holistic score, then keep each crop's most attended tokens, before the LLM.

Per sample, one image of N tokens (on its own grid), for a budget of T (`keep_tokens`, or `keep_ratio`
of the visual tokens):
- attention a (`score`): "cls", the [CLS] row of vision layer -2 (`[:, :, 0, 1:]`), averaged over
  heads (the LLaVA-1.5 code); "received", the attention each token receives in vision layer -1,
  averaged over heads and all queries of the image, summed over the tower patches it covers (the
  Qwen2.5-VL code, which averages over the 4 patches: the rule below is unchanged by the scale);
  "auto" (default): "cls" where the tower has a [CLS] token, else "received";
- crops: `num_patches` runs of consecutive tokens in raster order, the first N % P of size
  N // P + 1, the others N // P (the reference's split; a run is not a 2-D square); by default
  the rule of the reference port whose score is used: 16 (LLaVA code), max(1, int(1024 / 576 * N / T))
  (Qwen code);
- crop score: for a crop of n > 1 tokens with projected features f (the LLM input), S = cosine
  similarities (f / (|f| + 1e-6)) with a zero diagonal, m_i = sum_j S_ij / (n - 1),
  v_i = sum_j (S_ij - m_i)^2 / (n - 1) (the zeroed diagonal included, as the reference), a'
  = 1000 a, token score = a' + beta * v * mean|a'| / (mean|v| + 1e-6); the crop's score is the
  mean token score. A crop of one token scores its attention a (unscaled, as the reference);
- allocation: w = scores / (sum + 1e-6); floor(w * T) each; the remaining tokens go one each
  to the crops of largest w. A crop keeps its top-allocated tokens by a (in descending a),
  or all its tokens (in order) when its allocation reaches its size;
- the LLM sees the crops in order, then, when full crops left the budget short, zero vectors
  up to T (the reference pads with zeros); positions compacted on LLaVA, original M-RoPE ids on
  Qwen-VL (as its Qwen code; the zero vectors take the ids of the slots they fill [ours], the Qwen
  code gives them the ids of the image's last token).
The Qwen2.5-VL code ranks each merged token by the scores of the tower patches at its place in the
window order, not its own; here each token gets its own patches' scores [ours].
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, require_one_image_per_sample

EPS = 1e-6  # [paper code] in the normalisation, the variance scaling and the crop weights
ATTENTION_SCALE = 1e3  # [paper code]
SCORES = ("auto", "cls", "received")
LLAVA_CROPS = 16  # [paper code] LLaVA-1.5
QWEN_CROP_RATE = 1024 / 576  # [paper code] Qwen2.5-VL: crops = max(1, int(rate * N / T))


def crop_bounds(tokens: int, crops: int) -> list[tuple[int, int]]:
    """[start, end) of each non-empty crop: runs of consecutive tokens, the first tokens % crops one longer."""
    size, extra = divmod(tokens, crops)
    bounds, start = [], 0
    for crop in range(crops):
        end = start + size + (1 if crop < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def crop_score(features: torch.Tensor, attention: torch.Tensor, beta: float) -> torch.Tensor:
    """HoloV's holistic score of one crop: features [n, d], attention [n] -> scalar."""
    n = features.shape[0]
    if n <= 1:
        return attention.mean()
    unit = features / (features.norm(dim=1, keepdim=True) + EPS)
    similarity = (unit @ unit.T) * (1 - torch.eye(n, device=features.device))
    mean = similarity.sum(1) / (n - 1)
    variance = ((similarity - mean[:, None]) ** 2).sum(1) / (n - 1)
    scaled = attention * ATTENTION_SCALE
    variance = variance * scaled.abs().mean() / (variance.abs().mean() + EPS)
    return (scaled + beta * variance).mean()


def allocate(scores: torch.Tensor, total: int) -> list[int]:
    """Tokens per crop: floor of the score shares of `total`, the rest one each to the largest shares."""
    weights = scores / (scores.sum() + EPS)
    counts = (weights * total).floor().long()
    remaining = total - int(counts.sum())
    if remaining > 0:
        counts[torch.sort(weights, descending=True, stable=True).indices[:remaining]] += 1
    return counts.tolist()


def holov_selection(features: torch.Tensor, attention: torch.Tensor, total: int, crops: int, beta: float) -> list[int]:
    """Indices of the kept tokens in the order the LLM sees them (zero padding not included).
    features: [N, d] projected tokens; attention: [N] their [CLS] attention."""
    bounds = crop_bounds(features.shape[0], crops)
    scores = torch.stack([crop_score(features[s:e], attention[s:e], beta) for s, e in bounds])
    chosen: list[int] = []
    for (start, end), count in zip(bounds, allocate(scores, total)):
        if count >= end - start:
            chosen += range(start, end)
        elif count > 0:
            ranked = torch.sort(attention[start:end], descending=True, stable=True).indices[:count]
            chosen += (ranked + start).tolist()
    return chosen[:total]


@register
class HoloV(TokenPruner):
    name = "holov"
    reference_position_ids = "compact"  # [paper] the reference replaces the image by the kept tokens

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        num_patches: int | None = None,
        beta: float = 0.09,
        vision_layer: int | None = None,
        score: str = "auto",
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        if num_patches is not None and (
            isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1
        ):
            raise ValueError(
                f"holov: num_patches must be a positive integer (crops per image) or None, got {num_patches!r}."
            )
        if score not in SCORES:
            raise ValueError(f"holov: score must be one of {SCORES}, got {score!r}.")
        self.num_patches = num_patches
        self.beta = float(beta)
        self.vision_layer = None if vision_layer is None else int(vision_layer)
        self.score = score

    def layer_for(self, score: str) -> int:
        """The vision layer the score reads: `vision_layer`, else the reference's (-2 for cls, -1 for received)."""
        return self.vision_layer if self.vision_layer is not None else (-2 if score == "cls" else -1)

    def vision_probe_layers(self) -> set[int]:
        scores = ("cls", "received") if self.score == "auto" else (self.score,)
        return {self.layer_for(score) for score in scores}

    def crops(self, score: str, tokens: int, total: int) -> int:
        if self.num_patches is not None:
            return self.num_patches
        return LLAVA_CROPS if score == "cls" else max(1, int(QWEN_CROP_RATE * tokens / total))

    def prune(self, ctx: PruneContext) -> MergeDecision:
        require_one_image_per_sample("holov", ctx)
        counts = self.budget.count(ctx.visual_counts())
        score = self.score if self.score != "auto" else ("cls" if ctx.vision_cls else "received")
        if score == "cls":
            attention = ctx.vision_cls_attention(self.layer_for(score)).mean(1)  # [B, S]
        else:
            attention = ctx.vision_attention_received(self.layer_for(score)).mean(1)  # [B, S]
        keep = torch.zeros_like(ctx.visual)
        replaced = torch.zeros_like(ctx.visual)
        hidden = ctx.hidden.clone()
        order = torch.zeros(keep.shape, dtype=torch.float64, device=keep.device)
        for b, total in enumerate(counts.tolist()):
            slots = ctx.visual[b].nonzero()[:, 0]
            if total == 0:
                continue
            crops = self.crops(score, len(slots), total)
            chosen = holov_selection(ctx.hidden[b, slots].float(), attention[b, slots], total, crops, self.beta)
            chosen_slots = slots[chosen]
            keep[b, chosen_slots] = True
            order[b, chosen_slots] = torch.arange(len(chosen), device=keep.device, dtype=torch.float64)
            pads = slots[~keep[b, slots]][: total - len(chosen)]  # zero vectors live in the first free slots
            keep[b, pads] = replaced[b, pads] = True
            hidden[b, pads] = 0.0
            order[b, pads] = len(chosen) + torch.arange(len(pads), device=keep.device, dtype=torch.float64)
        return MergeDecision(keep=keep, hidden=hidden, replaced=replaced, order=order)
