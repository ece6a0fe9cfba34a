"""FastV keeps exactly the tokens a brute-force recomputation from HF's own attentions keeps."""

from __future__ import annotations

import pytest
import torch

import atp
from tests.conftest import IMAGE, check_kept_everywhere, make_batch, single

RAGGED = [(2, 3), (6, 1), (1, 7)]


def brute_force_fastv(model, batch, layer: int, keep_ratio: float) -> list[torch.Tensor]:
    """Top round(N * ratio) visual tokens by layer K-1 attention from the last prompt token."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].nonzero()[:, 0]
        last = int(real[-1])
        visual = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0]
        score = attentions[layer - 1][b, :, last, visual].mean(0)
        count = int(len(visual) * keep_ratio + 0.5)
        kept.append(torch.sort(torch.topk(score, count).indices).values)
    return kept


@pytest.mark.parametrize("samples", [RAGGED, RAGGED[:1]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("layer,keep_ratio", [(1, 0.25), (2, 0.5)])
def test_fastv_matches_brute_force_under_sdpa_and_eager(model_factory, samples, layer, keep_ratio):
    batch = make_batch(samples, seed=1)
    model = model_factory(attn_implementation="eager")
    reference = brute_force_fastv(model, batch, layer, keep_ratio)
    pruner = lambda: atp.build_pruner("fastv", layer=layer, keep_ratio=keep_ratio)  # noqa: E731
    check_kept_everywhere(model, batch, pruner, layer, reference)


def test_answer_tokens_never_enter_the_score(model_factory):
    """With labels, FastV scores from the last prompt token; the answer text is irrelevant."""
    model = model_factory()
    batch = make_batch(RAGGED[:1], padding="right")
    prompt_kept = None
    atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25))
    with torch.no_grad():
        model(**batch)
        prompt_kept = atp.stats(model).kept[2][0]
        for seed in range(3):
            answer = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(seed))
            ids = torch.cat([batch["input_ids"], answer], 1)
            labels = torch.cat([torch.full_like(batch["input_ids"], -100), answer], 1)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"], labels=labels)
            assert torch.equal(atp.stats(model).kept[2][0], prompt_kept)
        # without labels the last token (an answer token) becomes the query: decisions may change
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"])
        assert atp.stats(model).kept[2][0].numel() == 4


def test_fastv_keep_count_rounds_per_sample(model_factory):
    model = model_factory()
    batch = make_batch(RAGGED)
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.1))
    with torch.no_grad():
        model(**batch)
    assert atp.stats(model).visual_tokens[:, 1].tolist() == [2, 2, 2]  # round(1.6) = 2
    alone = single(batch, 0)
    with torch.no_grad():
        model(**alone)
    assert atp.stats(model).visual_tokens.tolist() == [[16, 2, 2, 2]]
