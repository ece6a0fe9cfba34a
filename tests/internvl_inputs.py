"""Inputs for tiny InternVL models, laid out as the model's processor lays them out.

A sample is `[bos, prefix..., (<img>, <IMG_CONTEXT> * tiles * 16, </img>) per image, suffix...]`,
with `pixel_values` [tiles, 3, 16, 16] (the tiles of every image in order; the processor puts an
image's thumbnail last when it has more than one tile). Each sample's content depends only on its
own spec and seed, so a batch and the batch-1 runs of its samples see the same tokens and pixels.
"""

from __future__ import annotations

import torch

from atp.models.tiny_internvl import tiny_internvl

VOCAB = 128
IMAGE, IMG_START, IMG_END = VOCAB - 1, VOCAB - 2, VOCAB - 3
TILE = 16  # px
SIDE = 8  # tower patches per side of a tile (patch 2)
PER_TILE = (SIDE // 2) ** 2  # visual tokens per tile after the 2x2 pixel shuffle
TEXTS = ("qwen2", "qwen3", "llama")


def internvl_model(text: str = "qwen2", attn: str = "sdpa", **kwargs):
    return tiny_internvl(text, vocab_size=VOCAB, image_size=TILE, patch_size=2, attn_implementation=attn, **kwargs)


def internvl_sample(prefix: int, images: list[int], suffix: int, seed: int):
    """(input_ids [S], pixel_values [tiles, 3, 16, 16]) of one sample; images: tiles per image."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1, *torch.randint(3, VOCAB - 3, (prefix,), generator=generator).tolist()]
    for tiles in images:
        ids += [IMG_START] + [IMAGE] * (tiles * PER_TILE) + [IMG_END]
    ids += torch.randint(3, VOCAB - 3, (suffix,), generator=generator).tolist()
    pixels = torch.randn(sum(images), 3, TILE, TILE, generator=generator)
    return torch.tensor(ids), pixels


def internvl_batch(specs: list, seeds: list[int] | None = None) -> dict:
    """A left-padded batch of samples (prefix, [tiles per image], suffix): input_ids, attention_mask and
    pixel_values when any sample has an image."""
    seeds = seeds if seeds is not None else list(range(len(specs)))
    samples = [internvl_sample(*spec, seed=seed) for spec, seed in zip(specs, seeds)]
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ids, _) in enumerate(samples):
        input_ids[b, length - len(ids) :] = ids
        attention_mask[b, length - len(ids) :] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if any(len(pixels) for _, pixels in samples):
        batch["pixel_values"] = torch.cat([pixels for _, pixels in samples])
    return batch


def token_places(batch, specs) -> list[list[tuple[int, int, int, int]]]:
    """Per sample, (image, tile over the batch, row, col) of every image token in input order, written
    as loops from the specs: images one after another, each its tiles, each tile 4 x 4 raster."""
    out, image, tile = [], 0, 0
    for _, images, _ in specs:
        places = []
        for tiles in images:
            for _ in range(tiles):
                places += [(image, tile, t // (SIDE // 2), t % (SIDE // 2)) for t in range(PER_TILE)]
                tile += 1
            image += 1
        out.append(places)
    return out
