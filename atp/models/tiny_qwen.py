"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built from configs, for tests and benchmarks.

No weights are downloaded: the model is randomly initialised (seeded) from an HF config.
Token ids at the top of the vocabulary: image (vocab-1), video (vocab-2), vision start
(vocab-3), vision end (vocab-4); ids 0/1/2 are pad/bos/eos.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from atp.models.tiny import tiny_text_settings

QWEN_FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def tiny_qwen_vl_config(
    family: str = "qwen2_vl",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    patch_size: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    attn_implementation: str = "sdpa",
) -> Qwen2VLConfig | Qwen2_5_VLConfig | Qwen3VLConfig:
    """A Qwen2(.5)-VL config with a small vision tower (2x2 merger) and a small language model.

    mrope_section splits the rotary frequencies of a head (head_dim / 2 = sum) between the
    temporal, height and width position ids.
    """
    if family not in QWEN_FAMILIES:
        raise ValueError(f"family {family!r} is not one of {sorted(QWEN_FAMILIES)}")
    head_dim = hidden_size // num_heads
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}.")
    text = dict(
        **tiny_text_settings(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
    )
    vision = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        num_heads=2,
        in_channels=3,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_hidden, hidden_size=hidden_size, mlp_ratio=2)
    elif family == "qwen3_vl":  # deepstack: tower layers 0 and 1 feed LM layers 0 and 1
        vision.update(
            intermediate_size=2 * vision_hidden,
            out_hidden_size=hidden_size,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(range(min(2, vision_layers))),
        )
        text.update(head_dim=head_dim)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    else:
        vision.update(
            intermediate_size=2 * vision_hidden,
            out_hidden_size=hidden_size,
            window_size=4 * patch_size,  # 2x2 merged tokens per window: windowed blocks really window
            fullatt_block_indexes=[vision_layers - 1],
        )
    config_class = QWEN_FAMILIES[family][0]
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 3,
        vision_end_token_id=vocab_size - 4,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def tiny_qwen_vl(family: str = "qwen2_vl", seed: int = 0, **kwargs):
    """A seeded, randomly initialised tiny Qwen2(.5)-VL model in eval mode."""
    config = tiny_qwen_vl_config(family, **kwargs)
    torch.manual_seed(seed)
    return QWEN_FAMILIES[family][1](config).eval()
