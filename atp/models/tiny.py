"""Tiny LLaVA models built from configs, for tests, benchmarks and the testbed.

No weights are downloaded: the model is randomly initialised (seeded) from an HF config.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_text_settings(
    vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, num_kv_heads: int
) -> dict:
    """The text-config settings every tiny VLM shares: the sizes given, ids 0/1/2 pad/bos/eos,
    4,096 positions, an LM head of its own."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_llava_config(
    text: str = "llama",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    grid: int = 4,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    attn_implementation: str = "sdpa",
) -> LlavaConfig:
    """A LLaVA config with a small CLIP tower (grid x grid visual tokens) and a small LLM.

    The image token is the last id of the vocabulary; ids 0/1/2 are pad/bos/eos.
    """
    if text not in TEXT_CONFIGS:
        raise ValueError(f"text backbone {text!r} is not one of {sorted(TEXT_CONFIGS)}")
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=grid * patch_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text_kwargs = tiny_text_settings(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    if text == "qwen2":
        text_kwargs["use_sliding_window"] = False
    if text == "mistral":
        text_kwargs["sliding_window"] = 4096
    text_config = TEXT_CONFIGS[text](**text_kwargs)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=vocab_size - 1,
        image_seq_length=grid * grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def tiny_llava(seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    """A seeded, randomly initialised tiny `LlavaForConditionalGeneration` in eval mode."""
    config = tiny_llava_config(**kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model.eval()
