"""Bad input gets a clear error that names the value and the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import atp
from atp.models.hf_compat import cache_kwargs, output_cache
from tests.conftest import make_batch


def test_unsupported_model_class():
    llm = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel.*LlavaForConditionalGeneration.*LlamaForCausalLM"):
        atp.apply(llm, atp.build_pruner("none"))


def test_image_pruner_on_a_text_only_model():
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match=r"fastv prunes image tokens, and LlamaForCausalLM is a text-only model"):
        atp.apply(llm, atp.build_pruner("fastv", layer=1))
    atp.apply(llm, atp.build_pruner("none"))  # the unpruned runtime is fine


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, "half"])
def test_keep_ratio_outside_range(ratio):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        atp.build_pruner("fastv", layer=2, keep_ratio=ratio)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        atp.build_pruner("random", layers=[1, 2], keep_ratio=[0.5, ratio])


@pytest.mark.parametrize("name,kwargs", [("fastv", {"layer": 4}), ("random", {"layers": [1, 7]})])
def test_layer_at_or_past_depth(model_factory, name, kwargs):
    model = model_factory(num_layers=4)
    with pytest.raises(ValueError, match=r"at or past the model's depth \(4 decoder layers: valid layers are 0\.\.3\)"):
        atp.apply(model, atp.build_pruner(name, **kwargs))


def test_unknown_pruner_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown pruner 'fastvv'; available pruners: .*fastv.*none.*random"):
        atp.build_pruner("fastvv")


def test_fastv_needs_a_previous_layer():
    with pytest.raises(ValueError, match="layer K must be an integer >= 1"):
        atp.build_pruner("fastv", layer=0)


def test_bad_layer_lists():
    with pytest.raises(ValueError, match="strictly increasing"):
        atp.build_pruner("random", layers=[2, 1])
    with pytest.raises(ValueError, match=">= 0"):
        atp.build_pruner("random", layers=[-1])
    with pytest.raises(ValueError, match="2 keep ratios for 1 layers"):
        atp.build_pruner("random", layers=[1], keep_ratio=[0.5, 0.5])


def test_unknown_mode_and_non_pruner(model_factory):
    model = model_factory()
    with pytest.raises(ValueError, match=r"mode must be one of \('drop', 'mask'\)"):
        atp.apply(model, atp.build_pruner("none"), mode="prune")
    with pytest.raises(TypeError, match="expected a TokenPruner"):
        atp.apply(model, "fastv")


def test_unsupported_attention_implementation(model_factory):
    model = model_factory()
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        atp.apply(model, atp.build_pruner("none"))


def test_soft_decision_in_drop_mode(model_factory):
    from tests.runtime.test_gradients import LearnedSoftMask

    model = model_factory()
    atp.apply(model, LearnedSoftMask(layer=1, num_visual=16), mode="drop")
    with pytest.raises(ValueError, match="drop mode needs a hard bool decision"):
        model(**make_batch([(1, 1)]))


def test_decision_of_wrong_shape(model_factory):
    from atp.runtime.pruner import TokenPruner

    class Broken(TokenPruner):
        name = "broken"

        def prune(self, ctx):
            return torch.ones(3, dtype=torch.bool)

    model = model_factory()
    atp.apply(model, Broken([1]))
    with pytest.raises(ValueError, match=r"decision of shape torch.Size\(\[3\]\); expected a \[batch, slots\]"):
        model(**make_batch([(1, 1)]))


def test_foreign_cache_is_refused(model_factory):
    model = model_factory()
    batch = make_batch([(2, 2)])
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))  # filled by the stock model
        atp.apply(model, atp.build_pruner("random", layers=1, keep_ratio=0.5))
        with pytest.raises(RuntimeError, match="not filled by a prefill of the pruned model"):
            model(input_ids=torch.tensor([[5]]), **cache_kwargs(cache))


def test_layers_replaced_after_apply(model_factory):
    model = model_factory()
    atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.5))
    attn = model.model.language_model.layers[1].self_attn
    attn.k_proj = torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features)
    with pytest.raises(RuntimeError, match=r"replaced after atp.apply.*atp.apply\(...\) again"):
        model(**make_batch([(1, 1)]))


def test_sequence_longer_than_sliding_window(model_factory):
    model = model_factory(text="mistral")
    model.config.text_config.sliding_window = 8
    atp.apply(model, atp.build_pruner("none"))
    with pytest.raises(ValueError, match="exceeds the model's sliding window"):
        model(**make_batch([(2, 2)]))


def test_unknown_pruner_argument_names_the_accepted_ones():
    with pytest.raises(
        ValueError, match=r"pruner 'fastv' has no argument\(s\) \['ratio'\]; it accepts \['layer', 'keep_ratio'"
    ):
        atp.build_pruner("fastv", ratio=0.5)
