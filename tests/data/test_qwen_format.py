"""LLaVA-format records through the testbed's Qwen processor: the dataset's tokens, image tensors and
mm_token_type_ids equal what the HF processor's own call makes of the rendered prompt; labels cover
the answers and their <|im_end|>; a batch feeds a Qwen model the inputs it checks (image_grid_thw)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from atp.data.llava_format import LlavaConversationDataset, collate, to_messages
from atp.data.processor import build_qwen_processor, load_processor
from atp.data.shapes import vocabulary, write_dataset
from atp.models.adapter import MODEL_INPUT_KEYS
from atp.models.build import build_testbed_qwen


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), {"train": (3, 0, 2), "test": (3, 1, 1)})


@pytest.fixture(scope="module")
def processor():
    return build_qwen_processor(vocabulary())


def test_prompts_equal_the_processors_own_expansion(shapes_dir, processor):
    dataset = LlavaConversationDataset(shapes_dir / "test.json", shapes_dir / "images", processor, prompt_only=True)
    for index in range(len(dataset)):
        item, record = dataset[index], dataset.records[index]
        messages = to_messages(record["conversations"][:1], has_image=True)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = Image.open(shapes_dir / "images" / record["image"]).convert("RGB")
        reference = processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
        assert torch.equal(item["input_ids"], reference["input_ids"][0])
        assert torch.equal(item["mm_token_type_ids"], reference["mm_token_type_ids"][0].long())
        assert torch.equal(item["images"]["pixel_values"], reference["pixel_values"])
        assert item["images"]["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist() == [[1, 24, 24]]
        assert int(item["mm_token_type_ids"].sum()) == 144


def test_labels_cover_the_answers_and_their_turn_ends(shapes_dir, processor):
    dataset = LlavaConversationDataset(shapes_dir / "train.json", shapes_dir / "images", processor)
    for index in range(len(dataset)):
        item = dataset[index]
        answers = [t["value"] for t in dataset.records[index]["conversations"] if t["from"] == "gpt"]
        supervised = item["labels"][item["labels"] != -100].tolist()
        assert processor.tokenizer.convert_ids_to_tokens(supervised) == [w for a in answers for w in (a, "<|im_end|>")]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_collated_batch_runs_a_qwen_model(shapes_dir, processor, tmp_path, family):
    dataset = LlavaConversationDataset(shapes_dir / "test.json", shapes_dir / "images", processor, prompt_only=True)
    batch = collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2 * 576, 3 * 2 * 14 * 14) and batch["image_grid_thw"].shape == (2, 3)
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == processor.image_token_id).long())
    model = build_testbed_qwen(processor, family, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    processor.save_pretrained(tmp_path)  # the processor round-trips through disk
    assert load_processor(tmp_path).tokenizer.get_vocab() == processor.tokenizer.get_vocab()
