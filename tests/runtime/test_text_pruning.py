"""The runtime contract for pruners that prune prompt text tokens (`TokenPruner.prunes_text`).

A pruner that drops fixed original positions before layer l is checked against a plain-loop reference
built from the stock HF decoder layers (every layer below l over all tokens, every layer from l on over
the tokens kept; HF's own causal mask and rotary ids), in drop and mask mode, on a text-only Llama and on
LLaVA; the stats count per kind of token; rejecting the last prompt token or an answer token is an error.
"""

from __future__ import annotations

import pytest
import torch

import atp
from atp.metrics.accounting import cost_report
from atp.models import get_adapter
from atp.models.causal import tiny_causal_lm
from atp.runtime.pruner import TokenPruner
from tests.conftest import NUM_VISUAL, make_batch


class DropPositions(TokenPruner):
    """Drops the given original positions (text or visual) before `layer`; soft: weighs them `weight`."""

    name = "drop_positions"
    prunes_text = True

    def __init__(self, layer: int, positions: list[int], weight: float | None = None) -> None:
        super().__init__([layer])
        self.positions, self.weight = positions, weight

    def prune(self, ctx):
        hit = torch.isin(ctx.origin, torch.tensor(self.positions)) & ctx.real
        if self.weight is not None:
            return torch.where(hit, self.weight, 1.0)
        return ~hit


class VisualOnly(DropPositions):
    prunes_text = False


def text_lm(attn: str = "sdpa"):
    torch.manual_seed(0)
    return tiny_causal_lm(attn_implementation=attn, num_layers=3, initializer_range=0.3).eval()


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor, layer: int, dropped: list[int]) -> torch.Tensor:
    """[n, V] logits of one unpadded prompt at the positions kept, with stock layers in a plain loop."""
    adapter = get_adapter(model)
    n = input_ids.shape[1]
    hidden = model.get_input_embeddings()(input_ids)
    kept = [i for i in range(n) if i not in dropped]
    for index, block in enumerate(adapter.layers):
        if index == layer:
            hidden = hidden[:, kept]
        positions = torch.tensor(kept if index >= layer else list(range(n)))[None]
        causal = torch.full((hidden.shape[1], hidden.shape[1]), torch.finfo(hidden.dtype).min).triu(1)
        rotary = adapter.rotary_emb(hidden, positions)
        hidden = block(hidden, attention_mask=causal[None, None], position_ids=positions, position_embeddings=rotary)
    return model.get_output_embeddings()(adapter.final_norm(hidden))[0]


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_text_pruning_equals_plain_loop_reference(attn, mode):
    model = text_lm(attn)
    ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    dropped = [2, 5, 6]
    reference = reference_logits(model, ids, 1, dropped)
    atp.apply(model, DropPositions(layer=1, positions=dropped), mode=mode)
    logits = model(input_ids=ids).logits[0]
    kept = [i for i in range(10) if i not in dropped]
    torch.testing.assert_close(logits[kept], reference, atol=1e-4, rtol=1e-4)
    stats = atp.stats(model)
    assert stats.text_tokens.tolist() == [[10, 7, 7]] and stats.tokens.tolist() == [[10, 7, 7]]
    assert stats.visual_tokens.tolist() == [[0, 0, 0]] and stats.num_text.tolist() == [10]
    assert stats.kept_text[1][0].tolist() == kept[:-1]  # the last prompt token is never a candidate
    report = cost_report(model.config, stats)
    assert report.flops[0] < report.flops_unpruned[0] and report.kv_bytes[0] < report.kv_bytes_unpruned[0]


def test_text_and_visual_kinds_on_llava(model_factory):
    model = model_factory(num_layers=3).eval()
    batch = make_batch([(3, 4), (1, 2)], seed=0)  # [bos, 3 text, 16 image, 4 text] and a shorter padded one
    first_text, first_image = 1, 4  # sample 0 is unpadded: bos at 0
    dropped = [first_text, first_text + 1, first_image, first_image + 5]
    pruner = DropPositions(layer=1, positions=dropped)
    atp.apply(model, pruner, mode="drop")
    drop = model(**batch).logits
    stats = atp.stats(model)
    assert stats.text_tokens[0].tolist() == [8, 6, 6] and stats.visual_tokens[0].tolist() == [16, 14, 14]
    assert (stats.tokens == stats.text_tokens + stats.visual_tokens).all()
    assert stats.kept[1][0].tolist() == [i for i in range(NUM_VISUAL) if i not in (0, 5)]
    atp.apply(model, pruner, mode="mask")
    mask = model(**batch).logits
    kept = [i for i in range(batch["input_ids"].shape[1]) if i not in dropped]
    torch.testing.assert_close(drop[0, kept], mask[0, kept], atol=1e-4, rtol=1e-4)


def test_visual_only_pruner_ignores_text_rejections(model_factory):
    model = model_factory(num_layers=3).eval()
    batch = make_batch([(3, 4)], seed=0)
    atp.apply(model, VisualOnly(layer=1, positions=[1, 2, 4]))
    model(**batch)
    stats = atp.stats(model)
    assert stats.text_tokens[0].tolist() == [8, 8, 8] and stats.visual_tokens[0].tolist() == [16, 15, 15]
    assert stats.kept_text == {}


@pytest.mark.parametrize("mode,weight", [("drop", None), ("mask", None), ("mask", 0.5)])
def test_pruning_the_last_prompt_token_is_an_error(mode, weight):
    model = text_lm()
    ids = torch.randint(3, 500, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    atp.apply(model, DropPositions(layer=1, positions=[2, 8], weight=weight), mode=mode)
    with pytest.raises(ValueError, match=r"pruned the last prompt token .* at position 8 of sample 0"):
        model(input_ids=ids, attention_mask=mask)


def test_pruning_an_answer_token_is_an_error():
    model = text_lm()
    ids = torch.randint(3, 500, (1, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]  # the answer starts at position 6: position 5 is the last prompt token
    atp.apply(model, DropPositions(layer=1, positions=[2, 7]), mode="mask")
    with pytest.raises(ValueError, match=r"pruned an answer token \(labels != -100\) at position 7 of sample 0"):
        model(input_ids=ids, labels=labels)
    atp.apply(model, DropPositions(layer=1, positions=[2, 4]), mode="mask")
    loss = model(input_ids=ids, labels=labels).loss  # prompt text before the last prompt token: fine
    assert torch.isfinite(loss)
    assert atp.stats(model).kept_text[1][0].tolist() == [0, 1, 3]


def test_soft_weights_on_text_tokens():
    model = text_lm()
    ids = torch.randint(3, 500, (1, 8))
    stock = model(input_ids=ids).logits
    atp.apply(model, DropPositions(layer=1, positions=[3], weight=0.4), mode="mask")
    soft = model(input_ids=ids).logits
    assert atp.stats(model).text_tokens.tolist() == [[8, 7, 7]]  # weight < 0.5 counts as pruned
    torch.testing.assert_close(soft[0, :3], stock[0, :3])  # causal: positions before 3 see no change
    assert not torch.allclose(soft[0, 3:], stock[0, 3:])
