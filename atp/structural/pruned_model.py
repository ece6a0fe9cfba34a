"""Config and model classes of a structurally pruned Llama / Mistral / Qwen2 decoder.

Self-contained (torch and transformers only): atp registers these classes with the Auto
classes, and every exported checkpoint carries a copy of this file, so it also loads
without atp through `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.
A pruned config adds two per-layer lists to the stock one: `kv_heads_per_layer` (key/value
heads kept, each with all of its query heads) and `intermediate_size_per_layer`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)


class _BuiltNarrow:
    """Builds the stock model, then gives every layer fresh projections of the config's
    per-layer widths (from_pretrained then loads the weights into them, meta device included).
    Mixed into causal LMs (layers at `model.layers`) and base decoders (layers at `layers`, the
    language model a VLM builds)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        layers = self.model.layers if hasattr(self, "model") else self.layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_group = config.num_attention_heads // config.num_key_value_heads
        widths = zip(config.kv_heads_per_layer, config.intermediate_size_per_layer)
        for layer, (kv_heads, channels) in zip(layers, widths):
            attn, mlp = layer.self_attn, layer.mlp
            q_width, kv_width = kv_heads * per_group * head_dim, kv_heads * head_dim
            attn.q_proj = _resized(attn.q_proj, out_features=q_width)
            attn.k_proj = _resized(attn.k_proj, out_features=kv_width)
            attn.v_proj = _resized(attn.v_proj, out_features=kv_width)
            attn.o_proj = _resized(attn.o_proj, in_features=q_width)
            mlp.gate_proj = _resized(mlp.gate_proj, out_features=channels)
            mlp.up_proj = _resized(mlp.up_proj, out_features=channels)
            mlp.down_proj = _resized(mlp.down_proj, in_features=channels)
            mlp.intermediate_size = channels


def _resized(linear: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    """A new, uninitialised linear layer like `linear` with other sizes."""
    return nn.Linear(
        in_features or linear.in_features,
        out_features or linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


class PrunedLlamaConfig(LlamaConfig):
    model_type = "atp_pruned_llama"
    kv_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None


class PrunedMistralConfig(MistralConfig):
    model_type = "atp_pruned_mistral"
    kv_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None


class PrunedQwen2Config(Qwen2Config):
    model_type = "atp_pruned_qwen2"
    kv_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None


class PrunedLlamaForCausalLM(_BuiltNarrow, LlamaForCausalLM):
    config_class = PrunedLlamaConfig


class PrunedMistralForCausalLM(_BuiltNarrow, MistralForCausalLM):
    config_class = PrunedMistralConfig


class PrunedQwen2ForCausalLM(_BuiltNarrow, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config


class PrunedLlamaModel(_BuiltNarrow, LlamaModel):
    config_class = PrunedLlamaConfig


class PrunedMistralModel(_BuiltNarrow, MistralModel):
    config_class = PrunedMistralConfig


class PrunedQwen2Model(_BuiltNarrow, Qwen2Model):
    config_class = PrunedQwen2Config


class PrunedClasses(NamedTuple):
    """The classes of one pruned family: its config, its causal LM, and its base decoder (the
    language model of a VLM whose LLM was pruned)."""

    config: type
    causal_lm: type
    decoder: type


PRUNED = {
    "llama": PrunedClasses(PrunedLlamaConfig, PrunedLlamaForCausalLM, PrunedLlamaModel),
    "mistral": PrunedClasses(PrunedMistralConfig, PrunedMistralForCausalLM, PrunedMistralModel),
    "qwen2": PrunedClasses(PrunedQwen2Config, PrunedQwen2ForCausalLM, PrunedQwen2Model),
}
