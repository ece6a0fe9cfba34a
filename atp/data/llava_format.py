"""LLaVA conversation JSON -> model inputs, through the model's own HF processor.

A record is `{"image": "file.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}` (LLaVA-665K's format; extra keys are kept as metadata).
The conversation is rendered with the processor's chat template; only assistant turns are
supervised. Their spans are found by rendering the template up to each turn, so any
template works (ours, LLaVA-1.5's, Vicuna's).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from atp.runtime.prompt import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def load_records(json_path: str | Path, image_folder: str | Path) -> list[dict]:
    """Read a LLaVA-format JSON list and check that every image file exists."""
    json_path, image_folder = Path(json_path), Path(image_folder)
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA-format JSON {json_path} does not exist; check the data path.")
    records = json.loads(json_path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{json_path} must hold a JSON list of conversation records.")
    missing = [r["image"] for r in records if "image" in r and not (image_folder / r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) named in {json_path} are missing from {image_folder}, e.g. "
            f"{image_folder / missing[0]}. Fix the image folder (data.image_folder) or the JSON."
        )
    return records


def to_messages(conversations: list[dict], has_image: bool) -> list[dict]:
    """LLaVA turns -> HF chat messages (the image becomes a content part of its turn)."""
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversations)
    if placeholders != int(has_image):
        raise ValueError(
            f"conversation has {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {int(has_image)} image(s); "
            "a LLaVA record needs exactly one placeholder when it names an image and none otherwise."
        )
    messages = []
    for turn in conversations:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown conversation role {turn['from']!r}; expected one of {sorted(ROLES)}.")
        text = turn["value"]
        content = []
        if IMAGE_PLACEHOLDER in text:
            content.append({"type": "image"})
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def encode_image(processor, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
    """({"pixel_values": ..., and "image_sizes" where the family has them}, image tokens) of one image,
    from the model's own processor run on its image token alone, so the count is the processor's
    (576 for LLaVA-1.5; per aspect ratio for LLaVA-NeXT / OneVision, newline tokens included)."""
    encoded = processor(images=image, text=processor.image_token, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    tensors = {key: encoded[key][0] for key in ("pixel_values", "image_sizes") if key in encoded}
    return tensors, int((encoded["input_ids"] == image_id).sum())


class LlavaConversationDataset(Dataset):
    """Tokenised LLaVA conversations: input_ids [S], labels [S], pixel_values [3, H, W] (LLaVA-NeXT:
    [views, 3, H, W] and image_sizes [2])."""

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        processor,
        max_samples: int | None = None,
        prompt_only: bool = False,
    ) -> None:
        self.records = load_records(json_path, image_folder)[:max_samples]
        self.image_folder = Path(image_folder)
        self.processor = processor
        self.prompt_only = prompt_only  # evaluation: the prompt up to the first answer
        self._tokens: dict[int, tuple[list[int], list[int]]] = {}  # index -> (ids, labels), computed once

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        has_image = "image" in record
        messages = to_messages(record["conversations"], has_image)
        images: dict[str, torch.Tensor] = {}
        image_tokens = 0
        if has_image:
            image = Image.open(self.image_folder / record["image"]).convert("RGB")
            images, image_tokens = encode_image(self.processor, image)
        if index not in self._tokens:
            if self.prompt_only:
                first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
                ids = self._tokenize(messages[:first_answer], image_tokens, generation_prompt=True)
                self._tokens[index] = ids, [IGNORE_INDEX] * len(ids)
            else:
                self._tokens[index] = self._supervised(messages, image_tokens)
        ids, labels = self._tokens[index]
        answer = next((t["value"] for t in record["conversations"] if ROLES[t["from"]] == "assistant"), "")
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "pixel_values": images.get("pixel_values"),
            "image_sizes": images.get("image_sizes"),
            "answer": answer.strip(),
            "question_type": record.get("question_type", "all"),
            "num_objects": record.get("num_objects", -1),
            "id": record.get("id", str(index)),
        }

    def _tokenize(self, messages: list[dict], image_tokens: int, generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        text = text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * image_tokens)
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _supervised(self, messages: list[dict], image_tokens: int) -> tuple[list[int], list[int]]:
        ids = self._tokenize(messages, image_tokens, generation_prompt=False)
        labels = [IGNORE_INDEX] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._tokenize(messages[:turn], image_tokens, generation_prompt=True))
            end = len(self._tokenize(messages[: turn + 1], image_tokens, generation_prompt=False))
            labels[start:end] = ids[start:end]
        return ids, labels


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Left-pad a list of dataset items into a model batch (+ metadata lists)."""
    length = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
    for b, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[b, length - n :] = item["input_ids"]
        labels[b, length - n :] = item["labels"]
        attention_mask[b, length - n :] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    images = [item["pixel_values"] for item in batch if item["pixel_values"] is not None]
    if images:
        out["pixel_values"] = stack_padded(images)
    sizes = [item["image_sizes"] for item in batch if item.get("image_sizes") is not None]
    if sizes:
        out["image_sizes"] = torch.stack(sizes)
    for key in ("answer", "question_type", "num_objects", "id"):
        out[key] = [item[key] for item in batch]
    return out


def stack_padded(images: list[torch.Tensor]) -> torch.Tensor:
    """[N, ...] the images stacked; LLaVA-NeXT's [views, 3, H, W] of differing view counts are padded
    with zero views to the largest count, as its processor pads a batch (the model reads
    image_sizes to know how many views are real)."""
    most = max(image.shape[0] for image in images)
    padded = [torch.cat([image, image.new_zeros(most - image.shape[0], *image.shape[1:])]) for image in images]
    return torch.stack(padded)


def prompt_loader(
    json_path: str | Path, image_folder: str | Path, processor, max_samples: int | None = None, batch_size: int = 50
) -> DataLoader:
    """Evaluation batches: prompts without their answers (`prompt_only`), left-padded, in file order."""
    dataset = LlavaConversationDataset(json_path, image_folder, processor, max_samples=max_samples, prompt_only=True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id),
    )
