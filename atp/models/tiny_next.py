"""Tiny LLaVA-NeXT / LLaVA-OneVision models built from configs, for tests and benchmarks.

No weights are downloaded: the model is randomly initialised (seeded) from an HF config. A crop
is `grid x grid` tower patches of `patch_size` pixels; `pinpoints` are the anyres resolutions
(height, width) in pixels, multiples of the crop size. Token ids: image (vocab-1); 0/1/2 are
pad/bos/eos.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from atp.models.tiny import tiny_text_settings

NEXT_FAMILIES = {
    "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
}


def tiny_llava_next_config(
    family: str = "llava_next",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    grid: int = 4,
    patch_size: int = 4,
    pinpoints: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2)),
    vision_hidden: int = 32,
    vision_layers: int = 2,
    attn_implementation: str = "sdpa",
    vision_aspect_ratio: str = "anyres_max_9",
):
    """A LLaVA-NeXT (CLIP tower, Llama text) or LLaVA-OneVision (SigLIP tower, Qwen2 text) config.

    pinpoints: the anyres layouts in crops, (rows, cols) each; converted to pixels.
    """
    if family not in NEXT_FAMILIES:
        raise ValueError(f"family {family!r} is not one of {sorted(NEXT_FAMILIES)}")
    crop = grid * patch_size
    vision_kwargs = dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=crop,
        patch_size=patch_size,
    )
    text_kwargs = tiny_text_settings(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    common = dict(
        image_token_id=vocab_size - 1,
        image_grid_pinpoints=[[rows * crop, cols * crop] for rows, cols in pinpoints],
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    if family == "llava_next":
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(projection_dim=vision_hidden, **vision_kwargs),
            text_config=LlamaConfig(**text_kwargs),
            vision_feature_select_strategy="default",
            **common,
        )
    else:
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision_kwargs),
            text_config=Qwen2Config(use_sliding_window=False, **text_kwargs),
            vision_feature_select_strategy="full",
            vision_aspect_ratio=vision_aspect_ratio,
            video_token_id=vocab_size - 2,
            **common,
        )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def tiny_llava_next(family: str = "llava_next", seed: int = 0, **kwargs):
    """A seeded, randomly initialised tiny LLaVA-NeXT or LLaVA-OneVision model in eval mode."""
    config = tiny_llava_next_config(family, **kwargs)
    torch.manual_seed(seed)
    return NEXT_FAMILIES[family][1](config).eval()
