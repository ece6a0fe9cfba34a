"""`catp` (Li et al., AAAI 2026, "CATP"): two-stage pruning for multimodal in-context learning, prompts
with several images: in-context demonstrations (ICDs: an image and the text up to the next image) and a
query sample (the last image and the text after it). R = 1 - keep_ratio is the share of image tokens pruned.

Stage 1, before the LLM, per image i with S_i tokens: keep floor(S_i (1 - R/2)) tokens Y chosen greedily
(largest marginal gain, ties to the earlier token) for

    F(Y) = sum_{x in image} max_{y in Y} s(y, x) + lambda1 * sum_{y in Y} s(y, v_i)

s = (cosine + 1) / 2 on the LLM input embeddings, v_i = mean embedding of image i's paired text.
Stage 2a, after decoder layer K: the ICDs' image tokens, ranked together, keep round((1 - R) x their
count at the input) by

    score(c) = max(0, A_K[last, c] - A_{K-1}[last, c]) + lambda2 * cos(h_c, mean of h over the query sample)

A_l: layer l's attention averaged over heads, `last`: the last prompt token; h: the hidden states leaving
layer K. Stage 2b, after layer K + 1: the query image's tokens keep round((1 - R) x their count at the
input) by cos(h_q, mean of h over the ICDs' remaining tokens), h leaving layer K + 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import check_keep_ratio, kept_count, top_k_per_sample


def greedy_selection(tokens: torch.Tensor, text: torch.Tensor, count: int, weight: float) -> torch.Tensor:
    """[count] long indices into tokens [n, d] maximising facility location + weight x alignment to text [d]
    (similarities rescaled to [0, 1]), by the greedy algorithm in selection order."""
    unit = F.normalize(tokens.float(), dim=-1)
    similarity = (unit @ unit.T + 1) / 2  # [candidate, covered token]
    alignment = (F.cosine_similarity(tokens.float(), text.float()[None], dim=-1) + 1) / 2
    covered = torch.zeros(len(tokens), device=tokens.device)
    taken = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
    chosen = []
    for _ in range(count):
        gain = (similarity - covered[None]).clamp_min(0).sum(1) + weight * alignment
        best = int(gain.masked_fill(taken, -math.inf).argmax())  # argmax: the first of equal gains
        chosen.append(best)
        taken[best] = True
        covered = torch.maximum(covered, similarity[best])
    return torch.tensor(chosen, dtype=torch.long, device=tokens.device)


def icl_parts(image: torch.Tensor, last_prompt: torch.Tensor, structural: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S0] long: the in-context sample (numbered by its image) of each prompt token at original positions:
    an image's tokens and the text after it up to the next image; -1 before the first image and after the
    prompt. image: [B, S0] long image number of each image token (-1 elsewhere); last_prompt: [B] position of
    the last prompt token; structural: [B, S0] bool placeholders without content (newline tokens inside an
    image's block) or None. Raises when an image's tokens (with the structural ones among them) are not one
    contiguous block."""
    sample = torch.full_like(image, -1)
    structural = torch.zeros_like(image, dtype=torch.bool) if structural is None else structural
    for b in range(image.shape[0]):
        for number in image[b][image[b] >= 0].unique().tolist():
            positions = (image[b] == number).nonzero()[:, 0]
            span = slice(int(positions[0]), int(positions[-1]) + 1)
            if not bool(((image[b, span] == number) | structural[b, span]).all()):
                raise ValueError(
                    f"catp: the tokens of image {number} of sample {b} are not one contiguous block; CATP needs each "
                    "image as one run of tokens followed by its paired text (interleaved in-context prompts), which "
                    "this input does not give."
                )
        current = -1
        for position in range(int(last_prompt[b]) + 1):
            if int(image[b, position]) >= 0:
                current = int(image[b, position])
            sample[b, position] = current
    return sample


@register
class CATP(TokenPruner):
    """keep_ratio: 1 - R, the share of all image tokens kept (paper: R = 77.8 %); layer: K, after which the
    ICD image tokens are pruned (the query's after K + 1); lambda1, lambda2: the score weights."""

    name = "catp"

    def __init__(
        self,
        keep_ratio: float = 1 - 0.778,
        layer: int = 6,
        lambda1: float = 0.7,
        lambda2: float = 0.6,
        position_ids: str = "original",
    ) -> None:
        if not isinstance(layer, int) or layer < 1:
            raise ValueError(
                f"catp: layer K must be an integer >= 1 (it reads layer K - 1's attention), got {layer!r}."
            )
        super().__init__([0, layer + 1, layer + 2], position_ids)
        self.keep_ratio = check_keep_ratio(self.name, keep_ratio)
        self.layer, self.lambda1, self.lambda2 = layer, float(lambda1), float(lambda2)

    def probe_layers(self) -> set[int]:
        return {self.layer - 1, self.layer}

    def validate(self, num_layers: int) -> None:
        if self.layer + 2 >= num_layers:
            raise ValueError(
                f"catp: layer K = {self.layer} needs decoder layers K and K + 1 before the last one; the model has "
                f"{num_layers} layers, so K must be at most {num_layers - 3}."
            )

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        image = torch.where(ctx.input_visual, ctx.input_geometry.image, -1)  # [B, S0]
        images = [int(image[b][image[b] >= 0].unique().numel()) for b in range(image.shape[0])]
        if 1 in images:
            raise ValueError(
                f"catp: every prompt with images needs at least two (in-context demonstrations and a query); images "
                f"per sample: {images}. Use a single-image method for single-image prompts."
            )
        last_prompt = torch.gather(ctx.origin, 1, ctx.last_prompt[:, None])[:, 0]
        sample = icl_parts(image, last_prompt, ctx.input_structural)  # [B, S0]
        query = sample.max(1).values[:, None]  # [B, 1] the query sample's number (its image's)
        if ctx.layer == 0:
            return self._stage1(ctx, image, sample)
        alive = ctx.real & ((ctx.visual_index < 0) | ctx.visual)  # mask mode: pruned image tokens are not alive
        here = torch.gather(sample, 1, ctx.origin).masked_fill(~alive, -1)  # [B, S] sample of each present token
        if ctx.layer == self.layer + 1:  # after layer K: the ICDs' image tokens, ranked together
            candidates = ctx.visual & (here >= 0) & (here != query)
            at_input = (ctx.input_visual & (sample >= 0) & (sample != query)).sum(1)
            last = ctx.last_prompt[:, None]
            growth = (ctx.attention(self.layer, last) - ctx.attention(self.layer - 1, last)).mean(1)[:, 0].clamp_min(0)
            focus = self._mean(ctx.hidden, here == query)  # the query sample's tokens
            score = growth + self.lambda2 * F.cosine_similarity(ctx.hidden.float(), focus[:, None], dim=-1)
        else:  # after layer K + 1: the query image's tokens, by relevance to the distilled context
            candidates = ctx.visual & (here == query)
            at_input = (ctx.input_visual & (sample == query)).sum(1)
            context = self._mean(ctx.hidden, (here >= 0) & (here != query))
            score = F.cosine_similarity(ctx.hidden.float(), context[:, None], dim=-1)
        count = kept_count(at_input, self.keep_ratio).clamp_max(candidates.sum(1))
        return top_k_per_sample(score, candidates, count) | ~candidates

    @staticmethod
    def _mean(hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """[B, d] mean of hidden [B, S, d] over the slots `where` [B, S]."""
        weights = where.float()
        return (hidden.float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)

    def _stage1(self, ctx: PruneContext, image: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Per image: the greedy facility-location + alignment selection on the input embeddings."""
        chosen = torch.zeros_like(image, dtype=torch.bool)  # [B, S0] at original positions
        for b in range(image.shape[0]):
            for number in image[b][image[b] >= 0].unique().tolist():
                tokens = (image[b] == number).nonzero()[:, 0]
                text = (sample[b] == number) & (image[b] < 0)  # the paired text
                count = math.floor(len(tokens) * (1 - (1 - self.keep_ratio) / 2))
                embeds = ctx.input_embeds[b]
                paired = embeds[text].mean(0) if bool(text.any()) else embeds.new_zeros(embeds.shape[-1])  # none: 0.5
                picked = greedy_selection(embeds[tokens], paired, count, self.lambda1)
                chosen[b, tokens[picked]] = True
        return torch.gather(chosen, 1, ctx.origin) | ~ctx.visual
