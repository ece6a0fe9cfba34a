"""Where the image, the instruction and the answer are in each sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PromptParts:
    """All [B, S] in original positions, except `last_prompt` ([B]).

    visual:      image placeholder tokens with image content (real, not padding, not structural)
    instruction: real text tokens after the last image placeholder token and before the answer
    last_prompt: position of the last token before the answer (the query FastV and
                 PDrop score with); the last real token when there is no answer
    prompt:      real tokens before the answer (every real token when there is no answer)
    """

    visual: torch.Tensor
    instruction: torch.Tensor
    last_prompt: torch.Tensor
    prompt: torch.Tensor | None = None


def locate_prompt_parts(
    image_mask: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    structural: torch.Tensor | None = None,
) -> PromptParts:
    """Split every sample into image, instruction and answer.

    image_mask: [B, S] bool image placeholder tokens; valid: [B, S] bool real tokens;
    labels: [B, S] long or None; positions with a label other than -100 are answer tokens,
    and everything from the first of them on is excluded from every pruning score;
    structural: [B, S] bool placeholders without image content (newline tokens), neither
    visual nor instruction tokens, or None.
    """
    batch, length = valid.shape
    position = torch.arange(length, device=valid.device).expand(batch, length)
    if labels is not None and labels.shape == valid.shape:
        answer = (labels != IGNORE_INDEX) & valid
        first_answer = torch.where(answer.any(1), answer.float().argmax(1), length)
    else:
        first_answer = torch.full((batch,), length, device=valid.device)
    prompt = valid & (position < first_answer[:, None])
    placeholder = image_mask & valid
    visual = placeholder if structural is None else placeholder & ~structural
    last_image = torch.where(placeholder, position, -1).max(1).values
    instruction = prompt & ~placeholder & (position > last_image[:, None])
    last_prompt = torch.where(prompt, position, -1).max(1).values.clamp_min(0)
    return PromptParts(visual=visual, instruction=instruction, last_prompt=last_prompt, prompt=prompt)
