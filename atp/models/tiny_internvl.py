"""Tiny InternVL (InternVL3 layout) models built from configs, for tests and benchmarks.

No weights are downloaded: the model is randomly initialised (seeded) from an HF config.
A tile of `image_size` px with `patch_size` px patches gives (image_size / patch_size)^2
tower patches, and after the 2x2 pixel shuffle a quarter as many visual tokens (16 for
the defaults, 256 for InternVL3's 448 px tiles of 14 px patches). Token ids at the top of
the vocabulary: <IMG_CONTEXT> (vocab-1), <img> (vocab-2), </img> (vocab-3); ids 0/1/2 are
pad/bos/eos.
"""

from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from atp.models.tiny import tiny_text_settings

TEXT_FAMILIES = ("qwen2", "qwen3", "llama")


def tiny_internvl_config(
    text: str = "qwen2",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    image_size: int = 16,
    patch_size: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    use_qk_norm: bool = False,
    attn_implementation: str = "sdpa",
) -> InternVLConfig:
    """An InternVL config with a small InternViT tower ([CLS] token, 2x2 pixel shuffle) and a small
    language model of `text` family ("qwen2" as InternVL3, "qwen3" as InternVL3.5, or "llama")."""
    if text not in TEXT_FAMILIES:
        raise ValueError(f"text {text!r} is not one of {TEXT_FAMILIES}")
    text_config = dict(
        model_type=text,
        **tiny_text_settings(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads),
    )
    if text == "qwen3":
        text_config["head_dim"] = hidden_size // num_heads
    vision_config = dict(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        intermediate_size=2 * vision_hidden,
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
        use_qk_norm=use_qk_norm,
        norm_type="rms_norm" if use_qk_norm else "layer_norm",
    )
    config = InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=vocab_size - 1,
        image_seq_length=(image_size // patch_size) ** 2 // 4,
        tie_word_embeddings=False,
    )
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn_implementation
    return config


def tiny_internvl(text: str = "qwen2", seed: int = 0, **kwargs) -> InternVLForConditionalGeneration:
    """A seeded, randomly initialised tiny InternVL model in eval mode."""
    config = tiny_internvl_config(text, **kwargs)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    randomise_zero_inits(model)
    return model


@torch.no_grad()
def randomise_zero_inits(model: InternVLForConditionalGeneration) -> None:
    """Redraw what HF initialises to zeros and random models then ignore: the tower's [CLS] token (N(0, 1):
    an informative [CLS] attention) and Qwen2's q/k biases (N(0, 0.1^2))."""
    model.model.vision_tower.embeddings.cls_token.normal_()
    for layer in model.model.language_model.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            if projection.bias is not None:
                projection.bias.normal_(std=0.1)
