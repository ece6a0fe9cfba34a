"""Shared pieces of the brute-force references of the vision-side pruners: HF's own eager CLIP
outputs for one unpadded sample, and the stock LLM's last logits on a kept subset of its tokens."""

from __future__ import annotations

import torch

import atp
from tests.conftest import IMAGE, NUM_VISUAL, single

RAGGED = [(2, 3), (6, 1), (1, 7)]  # three prompts of different lengths: a ragged, padded batch


def tower_outputs(model, sample):
    """HF's eager CLIP outputs (output_attentions, output_hidden_states) for one sample's image."""
    with torch.no_grad():
        return model.model.vision_tower(sample["pixel_values"], output_attentions=True, output_hidden_states=True)


def projected_features(model, sample) -> torch.Tensor:
    """[T, d] the image's projected tokens, as HF's LLaVA places them at the LLM input."""
    features = tower_outputs(model, sample).hidden_states[model.config.vision_feature_layer][0, 1:]
    with torch.no_grad():
        return model.model.multi_modal_projector(features)


def stock_logits(model, sample, visual: torch.Tensor) -> torch.Tensor:
    """[vocab] last-position logits of the stock LLM on the prompt with its image tokens replaced
    by the rows of visual [K, d] (positions compacted)."""
    with torch.no_grad():
        text = model.get_input_embeddings()(sample["input_ids"][0])
        image = (sample["input_ids"][0] == IMAGE).nonzero()[:, 0]
        embeds = torch.cat([text[: image[0]], visual, text[image[-1] + 1 :]])[None]
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        return model.lm_head(hidden)[0, -1]


def llava_without_cls():
    """A tiny LLaVA whose vision tower (SigLIP) has no [CLS] token."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
    )
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=127,
        image_seq_length=16,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config)


def check_kept_and_logits(model, batch, build, expected: list[list[int]], visual: list | None = None) -> None:
    """Run the pruner `build()` under sdpa and eager, drop and mask mode, on the ragged batch and on
    each sample alone: the kept image tokens equal `expected` (sorted indices per sample; slots
    holding a replaced token, as HoloV's zero padding, are not image tokens kept), the visual
    tokens reaching the LLM number K, and the last logits equal the stock LLM's on the visual
    rows `visual[b]` [K, d] (default: the kept tokens' projected features in original order)."""
    model = model.eval()
    samples = [single(batch, b) for b in range(len(expected))]
    if visual is None:
        visual = [projected_features(model, sample)[kept] for sample, kept in zip(samples, expected)]
    stock = [stock_logits(model, sample, rows) for sample, rows in zip(samples, visual)]
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            for rows in [list(range(len(expected)))] + [[b] for b in range(len(expected))]:
                sub = batch if len(rows) > 1 else single(batch, rows[0])
                model.set_attn_implementation(attn)
                atp.apply(model, build(), mode=mode)
                try:
                    with torch.no_grad():
                        logits = model(**sub).logits[:, -1]
                    stats = atp.stats(model)
                finally:
                    atp.remove(model)
                for row, b in enumerate(rows):
                    assert stats.kept[0][row].tolist() == expected[b], (attn, mode, rows, b)
                    assert stats.visual_tokens[row, -1] == len(visual[b])
                    torch.testing.assert_close(logits[row], stock[b], rtol=1e-4, atol=1e-5)


__all__ = [
    "NUM_VISUAL",
    "RAGGED",
    "check_kept_and_logits",
    "llava_without_cls",
    "projected_features",
    "tower_outputs",
]
