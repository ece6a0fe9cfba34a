"""`lazyllm` (Fu et al., 2024, arXiv 2407.14057): progressive pruning of prompt tokens by the last token's
attention, with revival of pruned tokens in later decode steps through an auxiliary cache.

Rule, at every generation step (the prefill, whose query is the last prompt token, and each decode
step, whose query is the new token), starting from every prompt token:

    before layer l in `layers`:  s_i = mean over heads of A^{l-1}[query, i]         [paper]
                                 keep the round(r_l * n) highest s_i among the n prunable prompt
                                 tokens still selected at this step (ties: the earlier token)  [ours: rounding]

A^{l-1} is layer l-1's post-softmax attention (over the tokens that layer holds at this step). The
last prompt token, generated tokens and answer tokens are never pruned. With `revival` (the paper's
method), each decode step selects again from every prompt token; a token selected before layer l
that layer l never computed is revived from the Aux Cache: its hidden state entering l, stored when
it was pruned, runs through layers l.. once, and its keys / values join those layers' caches
(`atp.runtime.revival`). Without revival, decode steps attend to what the prefill kept (static
pruning, the runtime's ordinary drop / mask decode).

Usage (text LM or VLM; drop mode for revival):

    model = atp.apply(model, atp.build_pruner("lazyllm", layers=[8, 16, 24], keep_ratios=[0.7, 0.7, 0.7]))
    out = model.generate(**inputs, max_new_tokens=32)
    atp.stats(model).text_tokens          # prompt tokens each layer processed in the prefill
    atp.runtime_of(model).revival.steps   # per decode step and pruning layer, the prompt tokens selected
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import check_keep_ratio, kept_count, top_k_per_sample


@register
class LazyLLM(TokenPruner):
    name = "lazyllm"
    prunes_text = True

    def __init__(
        self,
        layers: list[int] | tuple[int, ...] = (8, 16, 24),
        keep_ratios: list[float] | tuple[float, ...] = (0.7, 0.7, 0.7),
        revival: bool = True,
        position_ids: str = "original",
    ) -> None:
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        ratios = [keep_ratios] if isinstance(keep_ratios, (int, float)) else list(keep_ratios)
        if any((not isinstance(layer, int)) or layer < 1 for layer in layer_list):
            raise ValueError(
                f"lazyllm: layers must be integers >= 1 (pruning before layer l scores with layer l-1's attention), "
                f"got {layer_list}."
            )
        if len(ratios) != len(layer_list):
            raise ValueError(
                f"lazyllm: give one keep ratio per pruning layer; got {len(ratios)} ratios for layers {layer_list}."
            )
        if position_ids != "original":
            raise ValueError(
                f"lazyllm: position_ids must be 'original' (revived tokens and cached keys keep their positions), "
                f"got {position_ids!r}."
            )
        super().__init__(layer_list, position_ids)
        self.keep_ratios = tuple(check_keep_ratio(self.name, ratio) for ratio in ratios)
        self.revives = bool(revival)

    def probe_layers(self) -> set[int]:
        return {layer - 1 for layer in self.layers}

    def select(self, layer: int, score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B, S] bool keep mask before `layer`: the rule above over score [B, S] (the query's attention,
        mean over heads) and candidates [B, S] bool (the prunable prompt tokens still selected); slots
        outside candidates are True."""
        ratio = self.keep_ratios[self.layers.index(layer)]
        keep = top_k_per_sample(score, candidates, kept_count(candidates.sum(1), ratio))
        return keep | ~candidates

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        rows = ctx.attention(ctx.layer - 1, ctx.last_prompt[:, None])  # [B, H, 1, S]
        return self.select(ctx.layer, rows.mean(1)[:, 0], ctx.prunable)
