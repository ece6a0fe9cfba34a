"""Inputs for tiny LLaVA-NeXT and LLaVA-OneVision models, laid out as their processors lay them out.

A sample is `[bos, prefix..., <image> * n per image, suffix...]`; n (base view, unpadded anyres
grid, newline tokens) and the tower views per image come from the stock model's own
`get_image_features` and `image_size_to_num_patches`, so the layout is the model's, not ours.
`pixel_values` is [I, max views, 3, crop, crop] (padded, as the processors return it). Each
sample's content depends only on its own spec and seed, so a batch and the batch-1 runs of its
samples see the same tokens and pixels.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from atp.models.tiny_next import tiny_llava_next

VOCAB = 128
IMAGE = VOCAB - 1
GRID, PATCH = 4, 4
CROP = GRID * PATCH
FAMILIES = ("llava_next", "llava_onevision")
# image sizes (height, width) in pixels: a wide one (1 x 2 crops, unpadded to 2 of 4 rows), a tall
# one (2 x 1 crops, unpadded columns) and a square one (2 x 2 crops)
WIDE, TALL, SQUARE = (10, 50), (40, 14), (30, 30)


def next_model(family: str, attn: str = "sdpa", **kwargs):
    return tiny_llava_next(family, vocab_size=VOCAB, grid=GRID, patch_size=PATCH, attn_implementation=attn, **kwargs)


def views(model, size: tuple[int, int]) -> int:
    return image_size_to_num_patches(size, model.config.image_grid_pinpoints, CROP)


def image_tokens(model, size: tuple[int, int]) -> int:
    """Image placeholder tokens of one image, from the stock model's own features."""
    pixels = torch.zeros(1, views(model, size), 3, CROP, CROP)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([size]))
    return int(features.pooler_output[0].shape[0])


def next_sample(model, prefix: int, images: list[tuple[int, int]], suffix: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = [1, *torch.randint(3, VOCAB - 2, (prefix,), generator=generator).tolist()]
    pixels = []
    for size in images:
        ids += [IMAGE] * image_tokens(model, size)
        pixels.append(torch.randn(views(model, size), 3, CROP, CROP, generator=generator))
    ids += torch.randint(3, VOCAB - 2, (suffix,), generator=generator).tolist()
    return torch.tensor(ids), list(images), pixels


def next_batch(model, specs: list, seeds: list[int] | None = None) -> dict:
    """A left-padded batch of samples (prefix, [(height, width) per image], suffix): input_ids,
    attention_mask, and pixel_values / image_sizes when any sample has an image."""
    seeds = seeds if seeds is not None else list(range(len(specs)))
    samples = [next_sample(model, *spec, seed=seed) for spec, seed in zip(specs, seeds)]
    length = max(len(ids) for ids, _, _ in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ids, _, _) in enumerate(samples):
        input_ids[b, length - len(ids) :] = ids
        attention_mask[b, length - len(ids) :] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    pixels = [p for _, _, sample_pixels in samples for p in sample_pixels]
    if pixels:
        most = max(p.shape[0] for p in pixels)
        padded = torch.zeros(len(pixels), most, 3, CROP, CROP)
        for i, p in enumerate(pixels):
            padded[i, : p.shape[0]] = p
        batch["pixel_values"] = padded
        batch["image_sizes"] = torch.tensor([size for _, sizes, _ in samples for size in sizes])
    return batch


def stock_reference(model, batch: dict, vision_layer: int | None = None) -> dict:
    """What the stock model says about every image placeholder, without the atp adapter:
    embeds [B, S, d] (the LLM's input), newline [B, S] bool (the placeholder holds `image_newline`),
    content: per sample the positions of the other placeholders, and where: per sample for each
    content token (tower view, patch index) of the projected tower output it equals exactly
    ((-1, -1) when it equals none: resampled); views: [V, T, d] the projected tower outputs.
    batch may carry "views": the tower views per image, where the model takes fewer than anyres gives
    (OneVision's samples of several images: 1)."""
    seen = {}

    def record(_module, _args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "views"})
    handle.remove()
    embeds = seen["embeds"]
    image = batch["input_ids"] == IMAGE
    newline = image & (embeds == model.model.image_newline).all(-1)
    counts = batch.get("views") or [views(model, tuple(size)) for size in batch["image_sizes"].tolist()]
    pixels = torch.cat([batch["pixel_values"][i, :count] for i, count in enumerate(counts)])
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer
        ]
        if model.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        projected = model.model.multi_modal_projector(hidden)  # [V, T, d]
    flat = projected.reshape(-1, projected.shape[-1])
    content, where = [], []
    for b in range(embeds.shape[0]):
        positions = (image[b] & ~newline[b]).nonzero()[:, 0].tolist()
        content.append(positions)
        found = []
        for p in positions:
            match = (flat == embeds[b, p]).all(-1).nonzero()[:, 0].tolist()
            found.append(divmod(match[0], projected.shape[1]) if match else (-1, -1))
        where.append(found)
    return dict(embeds=embeds, newline=newline, content=content, where=where, views=projected, pixels=pixels)


def save_onevision_testbed(directory, num_layers: int = 4):
    """A tiny LLaVA-OneVision (SigLIP, no [CLS]; Qwen2 LLM) with the images-only OneVision processor
    (`atp.data.processor.build_onevision_processor`: 16 px views of 4 x 4 patches, the ShapesVQA words),
    saved to `directory` with `save_pretrained` as a downloaded checkpoint is; returns the directory."""
    from atp.data.processor import build_onevision_processor
    from atp.data.shapes import vocabulary

    processor = build_onevision_processor(vocabulary(), crop_size=CROP, patch_size=PATCH)
    tokenizer = processor.tokenizer
    model = tiny_llava_next(
        "llava_onevision", vocab_size=len(tokenizer), grid=GRID, patch_size=PATCH, num_layers=num_layers
    )
    model.config.image_token_id, model.config.video_token_id = processor.image_token_id, processor.video_token_id
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config.text_config, key, getattr(tokenizer, key))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
