"""LLaVA-format records -> model inputs: labels cover the answers only; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from atp.data.llava_format import LlavaConversationDataset, collate
from atp.data.processor import build_processor
from atp.data.shapes import vocabulary, write_dataset


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), {"train": (6, 0, 3), "test": (4, 1, 1)})


@pytest.fixture(scope="module")
def processor():
    return build_processor(vocabulary())


def test_labels_supervise_exactly_the_answers(shapes_dir, processor):
    dataset = LlavaConversationDataset(shapes_dir / "train.json", shapes_dir / "images", processor)
    tokenizer = processor.tokenizer
    for index in range(len(dataset)):
        item = dataset[index]
        record = dataset.records[index]
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        supervised = item["labels"][item["labels"] != -100].tolist()
        assert tokenizer.convert_ids_to_tokens(supervised) == [w for a in answers for w in (a, "</s>")]
        assert int((item["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 576
        assert item["images"]["pixel_values"].shape == (1, 3, 336, 336)


def test_prompt_only_ends_at_the_generation_prompt(shapes_dir, processor):
    dataset = LlavaConversationDataset(shapes_dir / "test.json", shapes_dir / "images", processor, prompt_only=True)
    item = dataset[0]
    tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    assert tokens[-2:] == ["assistant", ":"] and item["answer"] not in tokens[-3:]
    assert (item["labels"] == -100).all()


def test_collate_left_pads(shapes_dir, processor):
    dataset = LlavaConversationDataset(shapes_dir / "train.json", shapes_dir / "images", processor)
    items = [dataset[0], dataset[1]]
    batch = collate(items, pad_token_id=0)
    length = max(len(i["input_ids"]) for i in items)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][b, length - n :], item["input_ids"])
        assert batch["attention_mask"][b].tolist() == [0] * (length - n) + [1] * n
        assert (batch["labels"][b, : length - n] == -100).all()
    assert batch["pixel_values"].shape == (2, 3, 336, 336)


def test_missing_image_is_named(tmp_path, shapes_dir, processor):
    records = json.loads((shapes_dir / "test.json").read_text())
    records[1]["image"] = "does_not_exist.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError, match=r"does_not_exist\.png.*data\.image_folder"):
        LlavaConversationDataset(bad, shapes_dir / "images", processor)


def test_image_placeholder_mismatch(tmp_path, shapes_dir, processor):
    records = json.loads((shapes_dir / "test.json").read_text())
    first = records[0]["conversations"][0]
    first["value"] = first["value"].replace("<image>\n", "<image>\n<image>\n")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    dataset = LlavaConversationDataset(bad, shapes_dir / "images", processor)
    with pytest.raises(ValueError, match=r"2 '<image>' placeholder\(s\) but 1 image"):
        dataset[0]
