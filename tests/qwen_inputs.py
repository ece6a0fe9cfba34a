"""Inputs for tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, laid out as the model's processor lays them out.

A sample is `[bos, prefix..., (<|vision_start|>, <|image_pad|> * h*w/4, <|vision_end|>) per image,
suffix...]`, with `image_grid_thw` rows (1, h, w) in tower patches and `pixel_values`
[sum h*w, 3 * 2 * p * p]. Each sample's content depends only on its own spec and seed, so a
batch and the batch-1 runs of its samples see the same tokens and pixels.
"""

from __future__ import annotations

import torch

from atp.models.tiny_qwen import tiny_qwen_vl

VOCAB = 128
IMAGE, VIDEO, VISION_START, VISION_END = VOCAB - 1, VOCAB - 2, VOCAB - 3, VOCAB - 4
PATCH = 2
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def qwen_model(family: str, attn: str = "sdpa", **kwargs):
    return tiny_qwen_vl(family, vocab_size=VOCAB, patch_size=PATCH, attn_implementation=attn, **kwargs)


def qwen_sample(prefix: int, images: list[tuple[int, int]], suffix: int, seed: int):
    """(input_ids [S], image_grid_thw [I, 3], pixel_values [P, C]) of one sample."""
    generator = torch.Generator().manual_seed(seed)
    ids = [1, *torch.randint(3, VOCAB - 4, (prefix,), generator=generator).tolist()]
    grids, pixels = [], []
    for h, w in images:
        ids += [VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END]
        grids.append([1, h, w])
        pixels.append(torch.randn(h * w, 3 * 2 * PATCH * PATCH, generator=generator))
    ids += torch.randint(3, VOCAB - 4, (suffix,), generator=generator).tolist()
    return torch.tensor(ids), grids, pixels


def qwen_batch(specs: list, seeds: list[int] | None = None) -> dict:
    """A left-padded batch of samples (prefix, [(h, w) per image], suffix): input_ids, attention_mask,
    mm_token_type_ids, and pixel_values / image_grid_thw when any sample has an image."""
    seeds = seeds if seeds is not None else list(range(len(specs)))
    samples = [qwen_sample(*spec, seed=seed) for spec, seed in zip(specs, seeds)]
    length = max(len(ids) for ids, _, _ in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ids, _, _) in enumerate(samples):
        input_ids[b, length - len(ids) :] = ids
        attention_mask[b, length - len(ids) :] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=(input_ids == IMAGE).int())
    grids = [grid for _, sample_grids, _ in samples for grid in sample_grids]
    if grids:
        batch["image_grid_thw"] = torch.tensor(grids)
        batch["pixel_values"] = torch.cat([p for _, _, sample_pixels in samples for p in sample_pixels])
    return batch
