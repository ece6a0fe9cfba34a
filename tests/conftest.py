"""Shared fixtures: tiny seeded LLaVA models and ragged, padded batches."""

from __future__ import annotations

import os

import pytest
import torch

from atp.models.tiny import tiny_llava

os.environ.setdefault("WANDB_MODE", "disabled")
# one torch thread per pytest-xdist worker (make test runs one worker per core), two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

GRID = 4  # 4x4 = 16 visual tokens per image in the tiny models
NUM_VISUAL = GRID * GRID
VOCAB = 128
IMAGE = VOCAB - 1
PAD = 0


def text_batch(lengths=(11, 8, 5), seed: int = 1) -> dict:
    """A left-padded text-only batch: input_ids / attention_mask [B, max(lengths)], random ids in [3, 500)."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, length - n :] = torch.randint(3, 500, (n,), generator=generator)
        mask[b, length - n :] = 1
    return dict(input_ids=ids, attention_mask=mask)


def make_batch(text_lengths, seed: int = 0, padding: str = "left", with_image=None):
    """A batch of prompts `[bos, prefix..., <image>*16, suffix...]`, padded to one length.

    text_lengths: list of (prefix, suffix) token counts per sample; with_image: list of
    bools (default all True). Returns dict(input_ids, attention_mask, pixel_values).
    """
    generator = torch.Generator().manual_seed(seed)
    with_image = with_image or [True] * len(text_lengths)
    rows = []
    for (prefix, suffix), has_image in zip(text_lengths, with_image):
        text = torch.randint(3, VOCAB - 1, (prefix + suffix,), generator=generator)
        image = torch.full((NUM_VISUAL if has_image else 0,), IMAGE)
        rows.append(torch.cat([torch.tensor([1]), text[:prefix], image, text[prefix:]]))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        input_ids[b, span] = row
        attention_mask[b, span] = 1
    pixel_values = torch.randn(sum(with_image), 3, GRID * 4, GRID * 4, generator=generator)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if sum(with_image):
        batch["pixel_values"] = pixel_values
    return batch


def single(batch, b: int):
    """Sample b of a batch made by make_batch, with its padding removed."""
    keep = batch["attention_mask"][b].bool()
    out = dict(input_ids=batch["input_ids"][b : b + 1, keep], attention_mask=batch["attention_mask"][b : b + 1, keep])
    if "pixel_values" in batch:
        image_index = int((batch["input_ids"][:b] == IMAGE).any(1).sum())
        if (batch["input_ids"][b] == IMAGE).any():
            out["pixel_values"] = batch["pixel_values"][image_index : image_index + 1]
    return out


def check_kept_everywhere(model, batch, build_pruner, layer: int, reference: list[torch.Tensor]) -> list:
    """Run `build_pruner()` under sdpa and eager, in drop and mask mode, and assert that the
    tokens kept at `layer` equal `reference` (one sorted index tensor per sample). Returns
    the PruningStats of the four runs."""
    import atp

    runs = []
    for attn in ("sdpa", "eager"):
        for mode in ("drop", "mask"):
            model.set_attn_implementation(attn)
            atp.apply(model, build_pruner(), mode=mode)
            with torch.no_grad():
                model(**batch)
            stats = atp.stats(model)
            for b, expected in enumerate(reference):
                assert torch.equal(stats.kept[layer][b], expected), (attn, mode, b)
            atp.remove(model)
            runs.append(stats)
    return runs


@pytest.fixture(params=["sdpa", "eager"])
def attn(request):
    return request.param


@pytest.fixture
def model_factory():
    def build(**kwargs):
        kwargs.setdefault("grid", GRID)
        kwargs.setdefault("vocab_size", VOCAB)
        return tiny_llava(**kwargs)

    return build


def tiny_testbed_model(processor, num_kv_heads: int = 1):
    """A small testbed LLaVA (the processor's geometry and vocabulary; GQA by default), eval mode."""
    from atp.models.build import build_testbed_llava

    return build_testbed_llava(
        processor,
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_heads=2,
        num_kv_heads=num_kv_heads,
        vision_hidden=32,
        vision_layers=1,
        calibration_images=8,
    ).eval()
