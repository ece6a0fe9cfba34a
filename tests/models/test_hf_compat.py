"""The cache keyword of the installed transformers, read and passed in one place."""

from __future__ import annotations

import inspect

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from atp.models import hf_compat
from tests.conftest import make_batch


def test_cache_of_reads_either_keyword():
    marker = object()
    assert hf_compat.cache_of({"cache": marker}) is marker
    assert hf_compat.cache_of({"past_key_values": marker}) is marker
    assert hf_compat.cache_of({"past_key_values": None, "cache": marker}) is marker
    assert hf_compat.cache_of({}) is None


def test_the_keyword_is_the_one_the_installed_decoder_takes():
    for forward in (LlamaModel.forward, LlamaDecoderLayer.forward):
        assert hf_compat.CACHE_KEYWORD in inspect.signature(forward).parameters


def test_a_model_called_with_cache_kwargs_continues_its_cache(model_factory):
    model = model_factory()
    batch = make_batch([(2, 2)])
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
        cache = hf_compat.output_cache(prefill)
        length = cache.get_seq_length()
        step = model(
            input_ids=torch.tensor([[5]]),
            attention_mask=torch.ones(1, length + 1, dtype=torch.long),
            **hf_compat.cache_kwargs(cache),
        )
        full = model(
            input_ids=torch.cat([batch["input_ids"], torch.tensor([[5]])], 1),
            attention_mask=torch.ones(1, length + 1, dtype=torch.long),
            pixel_values=batch["pixel_values"],
        )
    assert cache.get_seq_length() == length + 1  # the step was appended to the cache it was given
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)
