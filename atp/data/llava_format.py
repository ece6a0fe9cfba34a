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


def processed_image(processor, image: Image.Image) -> tuple[dict[str, torch.Tensor], str]:
    """One image through the processor's own image path, as `processor(images=..., text=...)` runs it:
    the image processor with the processor's default image options (InternVL: crop_to_patches=True,
    1-12 tiles plus a thumbnail) and the processor's replacement text for the image's placeholder
    (`replace_image_token`: LLaVA-1.5 576 x <image>; LLaVA-NeXT / OneVision: per aspect ratio,
    newline tokens included; Qwen-VL: t * h * w / merge_size**2; InternVL: <img>, 256 x <IMG_CONTEXT>
    per tile, </img>).

    Returns (tensors, replacement): the image processor's model inputs, each with the image along
    dim 0 so that a batch concatenates them (pixel_values [1, 3, H, W] on LLaVA, [1, views, 3, H, W]
    on LLaVA-NeXT / OneVision, [tiles, 3, H, W] on InternVL, [patches, C] on Qwen-VL, and the family's
    extras: image_sizes [1, 2], batch_num_images [1], image_grid_thw [1, 3])."""
    # the two steps of ProcessorMixin.__call__ that handle images: merge the processor's defaults, process them
    options = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs, return_tensors="pt")
    out, replacements = processor._process_images([image], **options["images_kwargs"])
    if len(replacements) != 1:
        raise ValueError(
            f"{type(processor).__name__} names no image placeholder to expand (image_token="
            f"{getattr(processor, 'image_token', None)!r}); use the model's own multimodal processor."
        )
    names = processor.image_processor.model_input_names  # InternVL's num_patches only sizes the replacement
    tensors = {key: value for key, value in out.items() if key in names and isinstance(value, torch.Tensor)}
    return tensors, replacements[0]


class LlavaConversationDataset(Dataset):
    """Tokenised LLaVA conversations: input_ids [S], labels [S], images (the image processor's tensors
    of the record's image, see `processed_image`, or None) and, for processors that return them
    (Qwen-VL), mm_token_type_ids [S] (1 on image tokens)."""

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
        images = None
        replacement = ""  # the image placeholder's expansion (see `processed_image`)
        if has_image:
            image = Image.open(self.image_folder / record["image"]).convert("RGB")
            images, replacement = processed_image(self.processor, image)
        if index not in self._tokens:
            if self.prompt_only:
                first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
                ids = self._tokenize(messages[:first_answer], replacement, generation_prompt=True)
                self._tokens[index] = ids, [IGNORE_INDEX] * len(ids)
            else:
                self._tokens[index] = self._supervised(messages, replacement)
        ids, labels = self._tokens[index]
        answer = next((t["value"] for t in record["conversations"] if ROLES[t["from"]] == "assistant"), "")
        item = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "images": images,
            "answer": answer.strip(),
            "question_type": record.get("question_type", "all"),
            "num_objects": record.get("num_objects", -1),
            "id": record.get("id", str(index)),
        }
        if getattr(self.processor, "return_mm_token_type_ids", False):
            item["mm_token_type_ids"] = (item["input_ids"] == self.processor.image_token_id).long()
        return item

    def _tokenize(self, messages: list[dict], replacement: str, generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        text = text.replace(self.processor.image_token, replacement)  # where the chat template puts an image
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _supervised(self, messages: list[dict], replacement: str) -> tuple[list[int], list[int]]:
        ids = self._tokenize(messages, replacement, generation_prompt=False)
        labels = [IGNORE_INDEX] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._tokenize(messages[:turn], replacement, generation_prompt=True))
            end = len(self._tokenize(messages[: turn + 1], replacement, generation_prompt=False))
            labels[start:end] = ids[start:end]
        return ids, labels


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Left-pad a list of dataset items into a model batch (+ metadata lists); the image tensors of
    the batch's images are concatenated along dim 0, image after image (LLaVA: pixel_values
    [B_img, 3, H, W]; LLaVA-NeXT / OneVision: pixel_values [B_img, views, 3, H, W], views padded, and
    image_sizes [B_img, 2] (OneVision: batch_num_images [B_img], one image a sample); InternVL:
    pixel_values [sum of tiles, 3, H, W]; Qwen-VL: pixel_values [sum of patches, C] and image_grid_thw
    [B_img, 3])."""
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
    if "mm_token_type_ids" in batch[0]:
        token_types = torch.zeros(len(batch), length, dtype=torch.long)
        for b, item in enumerate(batch):
            token_types[b, length - len(item["mm_token_type_ids"]) :] = item["mm_token_type_ids"]
        out["mm_token_type_ids"] = token_types
    images = [item["images"] for item in batch if item["images"] is not None]
    for key in images[0] if images else ():
        out[key] = concat_padded([image[key] for image in images])
    for key in ("answer", "question_type", "num_objects", "id"):
        out[key] = [item[key] for item in batch]
    return out


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The images' tensors concatenated along dim 0; LLaVA-NeXT's pixel_values [1, views, 3, H, W] of
    differing view counts are first padded with zero views to the largest count, as its processor
    pads a batch (the model reads image_sizes to know how many views are real)."""
    if tensors[0].ndim == 5:
        most = max(t.shape[1] for t in tensors)
        tensors = [torch.cat([t, t.new_zeros(t.shape[0], most - t.shape[1], *t.shape[2:])], 1) for t in tensors]
    return torch.cat(tensors)


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
