"""What the last forward (or generate's prefill) did to the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruningStats:
    """Per-sample token counts of one prefill.

    visual_tokens: [B, L] long, visual tokens each decoder layer processed (mask mode:
                   tokens still visible as keys; soft masks count weight >= 0.5)
    tokens:        [B, L] long, all real (non-padding) tokens each layer processed, by the
                   same rule: the `n` of the FLOPs and KV-cache accounting
    kept:          {layer: [LongTensor per sample]}: `layer` is the first decoder layer that
                   no longer sees the pruned tokens (0 = before the LLM); each tensor holds
                   the sorted indices of the visual tokens that remain, counting a sample's
                   image tokens in input order from 0
    num_visual:    [B] long, visual tokens at the LLM input (before any pruning)
    input_tokens:  [B] long, real tokens at the LLM input (what every layer would process
                   without pruning)
    soft_visual_tokens: [B, L] float, sum of soft keep weights per layer (mask mode)
    scoring_seconds: wall time spent inside the pruner (scores and probes), this prefill
    reused_seconds: the part of scoring_seconds that projected keys a layer then reused instead of
                   projecting them itself (drop mode, no gradients: `key_reuse`), counted for the
                   rows that layer received; scoring_seconds - reused_seconds is the pruner's overhead
    vision_tokens: [I, Lv] long, real tokens each vision-tower layer ran on, per image, when the
                   pruner cuts inside the tower (None otherwise: the tower ran unpruned)
    vision_input_tokens: tokens per image at the tower input (what every tower layer runs on
                   unpruned), set with vision_tokens
    text_tokens:   [B, L] long, real non-visual tokens (text, the answer, structural placeholders)
                   each decoder layer processed, by the rule of `visual_tokens` (with hard decisions,
                   tokens = visual_tokens + text_tokens)
    num_text:      [B] long, those tokens at the LLM input
    kept_text:     {layer: [LongTensor per sample]}: for a pruner that prunes prompt text
                   (`prunes_text`), the sorted original positions of the prunable prompt text tokens
                   that remain after the stage before `layer`; empty otherwise
    """

    visual_tokens: torch.Tensor
    tokens: torch.Tensor
    kept: dict[int, list[torch.Tensor]]
    num_visual: torch.Tensor
    input_tokens: torch.Tensor
    soft_visual_tokens: torch.Tensor
    scoring_seconds: float = 0.0
    reused_seconds: float = 0.0
    vision_tokens: torch.Tensor | None = None
    vision_input_tokens: int | None = None
    mode: str = "drop"
    pruner: str = ""
    extras: dict = field(default_factory=dict)
    text_tokens: torch.Tensor | None = None
    num_text: torch.Tensor | None = None
    kept_text: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def average_visual_tokens(self) -> torch.Tensor:
        """[B] float: mean over decoder layers of the visual tokens processed (the paper's "144*")."""
        return self.visual_tokens.double().mean(1)
