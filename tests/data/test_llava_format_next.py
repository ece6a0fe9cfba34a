"""LLaVA-format records -> LLaVA-NeXT inputs: the image token count is the NeXT processor's own (per
aspect ratio), views are padded in a batch as the processor pads them, image_sizes travel along, and
the batch runs the stock model and the runtime alike."""

from __future__ import annotations

import json

import torch
from PIL import Image
from torch.testing import assert_close
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import atp
from atp.data.llava_format import LlavaConversationDataset, collate
from atp.data.processor import CHAT_TEMPLATE, build_tokenizer
from atp.lit.module import VLMTrainingModule
from atp.models.tiny_next import tiny_llava_next
from tests.next_inputs import CROP, GRID, PATCH

SIZES = [(60, 20), (40, 40)]  # (width, height): 1 x 2 crops (rows unpadded) and 2 x 2 crops


def tiny_next_processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=[[CROP, 2 * CROP], [2 * CROP, CROP], [2 * CROP, 2 * CROP]],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(["what", "is", "here", "a", "shape"]),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def test_next_records_become_model_inputs(tmp_path):
    records = []
    for index, size in enumerate(SIZES):
        pixels = torch.randint(0, 255, (size[1], size[0], 3), generator=torch.Generator().manual_seed(index))
        Image.fromarray(pixels.byte().numpy()).save(tmp_path / f"{index}.png")
        conversation = [{"from": "human", "value": "<image>\nwhat is here"}, {"from": "gpt", "value": "a shape"}]
        records.append({"id": str(index), "image": f"{index}.png", "conversations": conversation})
    (tmp_path / "data.json").write_text(json.dumps(records))
    processor = tiny_next_processor()
    dataset = LlavaConversationDataset(tmp_path / "data.json", tmp_path, processor)
    items = [dataset[0], dataset[1]]
    assert [item["images"]["image_sizes"].tolist() for item in items] == [[[h, w]] for w, h in SIZES]
    assert [item["images"]["pixel_values"].shape[1] for item in items] == [3, 5]  # base view + crops
    batch = collate(items, pad_token_id=processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 5, 3, CROP, CROP) and (batch["pixel_values"][0, 3:] == 0).all()

    model = tiny_llava_next("llava_next", vocab_size=len(processor.tokenizer), grid=GRID, patch_size=PATCH)
    model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    assert image_tokens == [len(f) for f in features.pooler_output]  # the model's own count per image
    module = VLMTrainingModule(model, atp.build_pruner("none"), train_parts="pruner")
    with torch.no_grad():
        stock = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}).logits
        module.use_mode("drop")
        ours = module(batch).logits  # the module passes image_sizes on
    real = batch["attention_mask"].bool()
    assert_close(ours[real], stock[real], rtol=0, atol=0)
    newlines = [2, 8]  # one per row of the unpadded anyres grid: 2 of 4 rows (60 x 20), 8 (40 x 40)
    assert atp.stats(model).num_visual.tolist() == [n - k for n, k in zip(image_tokens, newlines)]


def test_blank_control_keeps_the_anyres_layout(tmp_path):
    """evaluate's blind=blank control on LLaVA-NeXT: black images of each image's real size, so the views
    and image tokens match the prompt (the stock model accepts the batch) and every view is black."""
    from atp.evaluation import _model_inputs

    processor = tiny_next_processor()
    images = [Image.new("RGB", size, (200, 30, 30)) for size in SIZES]
    batch = dict(processor(images=images, text=["<image> what", "<image> what"], return_tensors="pt", padding=True))
    batch["id"] = ["0", "1"]
    blank = _model_inputs(batch, "cpu", processor, blind="blank")
    assert blank["pixel_values"].shape == batch["pixel_values"].shape
    black = processor.image_processor(Image.new("RGB", (CROP, CROP)), return_tensors="pt")["pixel_values"][0, 0]
    for i, views in enumerate([3, 5]):
        assert torch.equal(blank["pixel_values"][i, :views], black.expand(views, *black.shape))
    model = tiny_llava_next("llava_next", vocab_size=len(processor.tokenizer), grid=GRID, patch_size=PATCH)
    model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    with torch.no_grad():
        model(**{k: blank[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")})
