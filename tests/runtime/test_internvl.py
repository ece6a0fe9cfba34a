"""The runtime on tiny InternVL models (tiles + thumbnail, 2x2 pixel shuffle): stock parity, drop
against mask, ragged batches against batch-1 runs, FastV and DivPrune against brute force."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.selection import kept_count
from tests.internvl_inputs import IMAGE, PER_TILE, TEXTS, internvl_batch, internvl_model, token_places
from tests.runtime.family_checks import (
    check_generate_identical_across_modes_and_cache,
    check_none_equals_stock,
    check_ragged_equals_batch_of_one,
    divprune_by_loops,
    random_pruner,
)

TWO_TILINGS = [(2, [3], 3), (4, [1], 5)]  # two prompts, images of 3 tiles (2 + thumbnail) and 1 tile
RAGGED = [(2, [3], 3), (3, [], 6), (1, [2], 2)]  # 48, 0 and 32 image tokens


@pytest.mark.parametrize("text", TEXTS)
def test_none_equals_stock_forward_and_generate(text, attn):
    model = internvl_model(text, attn)
    batch = internvl_batch(TWO_TILINGS)
    assert check_none_equals_stock(model, batch) == [3 * PER_TILE, PER_TILE]


def test_none_runs_through_the_runtime():
    """Guard against a parity test that passes because nothing was patched."""
    model = internvl_model()
    batch = internvl_batch(TWO_TILINGS)
    atp.apply(model, atp.build_pruner("none"))
    seen = []
    atp.runtime_of(model).adapter.layers[1].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    length = batch["input_ids"].shape[1]
    assert seen[0].dtype == torch.float32 and seen[0].shape == (2, 1, length, length)


def kept_positions(batch, stats) -> torch.Tensor:
    """[B, S] bool: real positions every layer saw (text + the visual tokens kept to the end)."""
    real = batch["attention_mask"].bool()
    keep = real & (batch["input_ids"] != IMAGE)
    for b in range(real.shape[0]):
        visual = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0]
        keep[b, visual[stats.kept[max(stats.kept)][b]]] = True
    return keep


def test_random_drop_equals_mask_at_every_kept_position(attn):
    model = internvl_model("qwen2", attn)
    batch = internvl_batch(RAGGED)
    logits, stats = {}, {}
    with torch.no_grad():
        for mode in ("drop", "mask"):
            atp.apply(model, random_pruner(), mode=mode)
            logits[mode] = model(**batch).logits
            stats[mode] = atp.stats(model)
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    assert stats["drop"].visual_tokens.tolist() == [[48, 24, 24, 12], [0, 0, 0, 0], [32, 16, 16, 8]]
    keep = kept_positions(batch, stats["drop"])
    assert_close(logits["drop"][keep], logits["mask"][keep], rtol=1e-4, atol=1e-5)


def test_random_greedy_generate_identical_across_modes_and_cache(attn):
    check_generate_identical_across_modes_and_cache(internvl_model("qwen2", attn), internvl_batch(RAGGED))


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_random_ragged_batch_equals_batch_of_one(mode):
    singles = [internvl_batch([spec], seeds=[b]) for b, spec in enumerate(RAGGED)]
    check_ragged_equals_batch_of_one(internvl_model(), internvl_batch(RAGGED), singles, mode)


def top_numbers(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` largest scores, ties to the earlier index, in ascending order."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count])


def brute_force_fastv(model, batch, layer: int, keep_ratio: float) -> list[list[int]]:
    """FastV from the stock model's eager `output_attentions`, as loops: layer K-1's attention from the
    last prompt token (the last slot, left padding) to each image token, mean over heads."""
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions[layer - 1]  # [B, H, S, S]
    model.set_attn_implementation(implementation)
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        visual = (batch["input_ids"][b] == IMAGE).nonzero()[:, 0].tolist()
        row = attentions[b, :, -1].mean(0)
        count = int(kept_count(torch.tensor([len(visual)]), keep_ratio)[0])
        kept.append(top_numbers([float(row[position]) for position in visual], count))
    return kept


@pytest.mark.parametrize("text", ["qwen2", "qwen3"])
def test_fastv_keeps_what_eager_attentions_say(text):
    model = internvl_model(text)
    batch = internvl_batch(RAGGED)
    reference = brute_force_fastv(model, batch, layer=2, keep_ratio=0.25)
    assert [len(k) for k in reference] == [12, 0, 8]
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            model.set_attn_implementation(attn)
            atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), mode=mode)
            with torch.no_grad():
                model(**batch)
            for b, expected in enumerate(reference):
                assert atp.stats(model).kept[2][b].tolist() == expected, (attn, mode, b)
            atp.remove(model)


def brute_force_divprune(model, batch, keep_ratio: float) -> list[list[int]]:
    """DivPrune's max-min rule (`divprune_by_loops`) over the stock model's LLM input embeddings
    (hidden_states[0]) of each sample's image tokens; keep round(N * ratio)."""
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    kept = []
    for b in range(batch["input_ids"].shape[0]):
        tokens = [embeds[b, p].double().tolist() for p in (batch["input_ids"][b] == IMAGE).nonzero()[:, 0].tolist()]
        kept.append(divprune_by_loops(tokens, int(kept_count(torch.tensor([len(tokens)]), keep_ratio)[0])))
    return kept


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_divprune_keeps_what_the_brute_force_keeps(mode):
    model = internvl_model()
    batch = internvl_batch(RAGGED)
    reference = brute_force_divprune(model, batch, 0.2)
    assert [len(k) for k in reference] == [10, 0, 6]
    atp.apply(model, atp.build_pruner("divprune", keep_ratio=0.2), mode=mode)
    with torch.no_grad():
        model(**batch)
    kept = atp.stats(model).kept[0]
    assert [kept[b].tolist() for b in range(len(RAGGED))] == reference


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_spatial_keeps_a_uniform_grid_on_every_tile(mode):
    """On each 4 x 4 tile at keep_ratio 0.25 (budget 4): stride 2, rows and columns 0 and 2."""
    model = internvl_model()
    batch = internvl_batch(RAGGED)
    atp.apply(model, atp.build_pruner("spatial", layer=0, keep_ratio=0.25), mode=mode)
    with torch.no_grad():
        model(**batch)
    kept = atp.stats(model).kept[0]
    for b, places in enumerate(token_places(batch, RAGGED)):
        expected = [number for number, (_, _, row, col) in enumerate(places) if row % 2 == 0 and col % 2 == 0]
        assert kept[b].tolist() == expected
    assert [len(k) for k in kept] == [3 * 4, 0, 2 * 4]
