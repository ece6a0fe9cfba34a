"""The text-only causal-LM adapter: the runtime with no pruning is the stock model (logits and greedy generate,
a ragged left-padded batch, sdpa and eager), for every text family atp builds tiny models of."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.models import TextLMAdapter, get_adapter
from atp.models.causal import tiny_causal_lm
from tests.runtime.family_checks import check_none_equals_stock


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_none_equals_stock(family, attn):
    torch.manual_seed(0)
    model = tiny_causal_lm(family, attn_implementation=attn, num_layers=2).eval()
    assert isinstance(get_adapter(model), TextLMAdapter)
    ids = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :6] = 0
    counted = check_none_equals_stock(model, dict(input_ids=ids, attention_mask=mask))
    assert counted == [0, 0, 0]
    stats = atp.stats(model)
    assert stats.text_tokens[:, 0].tolist() == [9, 6, 3] and stats.num_text.tolist() == [9, 6, 3]


def test_inputs_embeds_and_ids_together_are_an_error():
    model = tiny_causal_lm(num_layers=1).eval()
    atp.apply(model, atp.build_pruner("none"))
    ids = torch.randint(3, 500, (1, 4))
    model(inputs_embeds=model.get_input_embeddings()(ids))  # embeddings alone are fine
    with pytest.raises(ValueError, match=r"give input_ids or inputs_embeds, not both"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))
