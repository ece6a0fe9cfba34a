"""LLaVA-format records -> InternVL inputs: token ids and tiles are exactly what the family's processor
(`InternVLProcessor.__call__`: crop_to_patches on, <img> <IMG_CONTEXT> * 36 per tile </img>) makes of the
rendered conversation and image, labels cover the answers only, and the collated batch runs the stock
model and the runtime alike."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import atp
from atp.data.llava_format import LlavaConversationDataset, collate, to_messages
from atp.data.processor import build_internvl_processor
from atp.lit.module import VLMTrainingModule
from atp.models.build import build_testbed_internvl

# (width, height) -> tiles: 2 x 1 + thumbnail, one tile (no thumbnail), 1 x 2 + thumbnail, 2 x 2 + thumbnail
SIZES = {(336, 168): 3, (168, 168): 1, (150, 330): 3, (336, 336): 5}
WORDS = ["what", "is", "here", "a", "shape", "and", "now", "two", "circles"]


@pytest.fixture(scope="module")
def processor():
    return build_internvl_processor(WORDS)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl_data")
    records = []
    for index, size in enumerate(SIZES):
        pixels = torch.randint(0, 255, (size[1], size[0], 3), generator=torch.Generator().manual_seed(index))
        Image.fromarray(pixels.byte().numpy()).save(root / f"{index}.png")
        conversation = [
            {"from": "human", "value": "<image>\nwhat is here"},
            {"from": "gpt", "value": "a shape"},
            {"from": "human", "value": "and now"},
            {"from": "gpt", "value": "two circles"},
        ]
        records.append({"id": str(index), "image": f"{index}.png", "conversations": conversation})
    (root / "data.json").write_text(json.dumps(records))
    return root


def processor_reference(processor, record: dict, folder, prompt_only: bool) -> dict:
    """The processor's own __call__ on the rendered conversation (up to the first answer when prompt_only)."""
    messages = to_messages(record["conversations"], has_image=True)
    text = processor.apply_chat_template(
        messages[:1] if prompt_only else messages, add_generation_prompt=prompt_only, tokenize=False
    )
    image = Image.open(folder / record["image"]).convert("RGB")
    return processor(images=[image], text=[text], return_tensors="pt")


@pytest.mark.parametrize("prompt_only", [False, True])
def test_items_are_what_the_internvl_processor_makes(processor, records, prompt_only):
    dataset = LlavaConversationDataset(records / "data.json", records, processor, prompt_only=prompt_only)
    tokenizer = processor.tokenizer
    for index, tiles in enumerate(SIZES.values()):
        item = dataset[index]
        reference = processor_reference(processor, dataset.records[index], records, prompt_only)
        assert torch.equal(item["input_ids"], reference["input_ids"][0])
        assert torch.equal(item["images"]["pixel_values"], reference["pixel_values"])
        assert item["images"].keys() == {"pixel_values"} and item["images"]["pixel_values"].shape[0] == tiles
        assert int((item["input_ids"] == processor.image_token_id).sum()) == 36 * tiles
        supervised = tokenizer.convert_ids_to_tokens(item["labels"][item["labels"] != -100].tolist())
        assert supervised == ([] if prompt_only else ["a", "shape", "<|im_end|>", "two", "circles", "<|im_end|>"])


def test_a_batch_runs_the_stock_model_and_the_runtime_alike(processor, records):
    dataset = LlavaConversationDataset(records / "data.json", records, processor, prompt_only=True)
    batch = collate([dataset[i] for i in range(len(SIZES))], pad_token_id=processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (sum(SIZES.values()), 3, 168, 168)
    model = build_testbed_internvl(processor, hidden_size=32, intermediate_size=64, num_layers=2, vision_layers=1)
    model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        stock = model(**inputs).logits
    image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert image_tokens.sum() == features.shape[0] * features.shape[1]  # the tower's tokens fill the placeholders
    module = VLMTrainingModule(model, atp.build_pruner("none"), train_parts="pruner")
    module.use_mode("drop")
    with torch.no_grad():
        ours = module(batch).logits
    real = batch["attention_mask"].bool()
    assert_close(ours[real], stock[real], rtol=0, atol=0)
    assert atp.stats(model).num_visual.tolist() == image_tokens.tolist() == [36 * t for t in SIZES.values()]


def test_a_processor_without_an_image_placeholder_is_refused(records):
    from atp.data.llava_format import processed_image

    processor = build_internvl_processor(WORDS)
    processor.image_token = None
    with pytest.raises(ValueError, match=r"InternVLImageProcessor names no image placeholder to expand"):
        processed_image(processor, Image.open(records / "0.png"))
