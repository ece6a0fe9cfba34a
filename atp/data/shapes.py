"""ShapesVQA: a small, honest, offline testbed on LLaVA-1.5's geometry.

Images are 336 x 336 (24 x 24 patches of 14 px) with 1 to 8 solid coloured shapes placed in
the cells of a 4 x 4 layout grid, so the visual information per image varies. Every
question has a one-word answer and is written in LLaVA's conversation JSON format:

    count     how many shapes are there ?            -> one .. eight
    count     how many red shapes are there ?        -> zero .. eight
    color     what color is the circle ?             -> red        (the only circle)
    shape     what shape is the blue object ?        -> square     (the only blue object)
    presence  is there a green triangle ?            -> yes / no
    position  is the red shape on the left or right ?  -> left / right (the only red object)

`generate_split` is seeded and deterministic; `write_dataset` writes PNGs and JSON files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 336
LAYOUT_CELLS = 4
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
QUESTION_TYPES = ("count", "color", "shape", "presence", "position")
MAX_OBJECTS = 8


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    cell: int  # 0..15, row-major in the 4 x 4 layout grid
    size: int  # pixels
    center: tuple[int, int]


def sample_scene(rng: random.Random) -> list[ShapeObject]:
    """1..8 non-overlapping objects, one per layout cell."""
    count = rng.randint(1, MAX_OBJECTS)
    cell_size = IMAGE_SIZE // LAYOUT_CELLS
    objects = []
    for cell in rng.sample(range(LAYOUT_CELLS**2), count):
        size = rng.randint(40, 64)
        slack = (cell_size - size) // 2
        row, col = divmod(cell, LAYOUT_CELLS)
        cx = col * cell_size + cell_size // 2 + rng.randint(-slack, slack)
        cy = row * cell_size + cell_size // 2 + rng.randint(-slack, slack)
        objects.append(ShapeObject(rng.choice(list(COLORS)), rng.choice(SHAPES), cell, size, (cx, cy)))
    return objects


def render(objects: list[ShapeObject]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        (cx, cy), half, fill = obj.center, obj.size // 2, COLORS[obj.color]
        box = (cx - half, cy - half, cx + half, cy + half)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def ask(objects: list[ShapeObject], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, one-word answer) of the given kind, or None if the scene cannot pose it."""
    if kind == "count":
        if rng.random() < 0.5:
            return "how many shapes are there ?", NUMBERS[len(objects)]
        color = rng.choice(list(COLORS))
        return f"how many {color} shapes are there ?", NUMBERS[sum(o.color == color for o in objects)]
    if kind == "color":
        unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        return f"what color is the {target.shape} ?", target.color
    if kind == "shape":
        unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        return f"what shape is the {target.color} object ?", target.shape
    if kind == "presence":
        present = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = rng.choice(absent)
        return f"is there a {color} {shape} ?", "yes" if (color, shape) in present else "no"
    if kind == "position":
        unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        side = "left" if target.center[0] < IMAGE_SIZE // 2 else "right"
        return f"is the {target.color} shape on the left or right ?", side
    raise ValueError(f"unknown question type {kind!r}; choose from {QUESTION_TYPES}")


def generate_split(
    num_samples: int, seed: int, image_prefix: str = "", questions_per_image: int = 1
) -> tuple[list[dict], list[Image.Image]]:
    """`num_samples` LLaVA-format records (one image each) and their images.

    questions_per_image = 1: a single question (types in rotation): for evaluation and for
    training pruners, whose scores read exactly one instruction. > 1: a multi-turn
    conversation with that many questions of different types (as in LLaVA-665K): more
    supervision per image for training the base model.
    """
    rng = random.Random(seed)
    records, images = [], []
    while len(records) < num_samples:
        objects = sample_scene(rng)
        first = len(records) % len(QUESTION_TYPES)
        kinds = [QUESTION_TYPES[(first + i) % len(QUESTION_TYPES)] for i in range(questions_per_image)]
        if questions_per_image > 1:
            rng.shuffle(kinds)
        turns = [qa for qa in (ask(objects, kind, rng) for kind in kinds) if qa is not None]
        if not turns or (questions_per_image == 1 and len(turns) != 1):
            continue
        index = len(records)
        conversations = []
        for number, (question, answer) in enumerate(turns):
            prefix = "<image>\n" if number == 0 else ""
            conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        records.append(
            {
                "id": f"{image_prefix}{index:06d}",
                "image": f"{image_prefix}{index:06d}.png",
                "conversations": conversations,
                "question_type": kinds[0] if questions_per_image == 1 else "mixed",
                "num_objects": len(objects),
            }
        )
        images.append(render(objects))
    return records, images


def vocabulary() -> list[str]:
    """Every word a ShapesVQA question or answer uses (for the word-level tokenizer)."""
    words = {
        "how",
        "many",
        "shapes",
        "are",
        "there",
        "?",
        "what",
        "color",
        "is",
        "the",
        "shape",
        "object",
        "a",
        "on",
        "left",
        "or",
        "right",
        "yes",
        "no",
    }
    words |= set(COLORS) | set(SHAPES) | set(NUMBERS)
    return sorted(words)


def write_dataset(root: str | Path, splits: dict[str, tuple[int, int, int]]) -> Path:
    """Write `root/images/*.png` and `root/<split>.json` for {split: (samples, seed, questions per image)}."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, (num_samples, seed, questions) in splits.items():
        records, images = generate_split(num_samples, seed, image_prefix=f"{split}_", questions_per_image=questions)
        for record, image in zip(records, images):
            image.save(root / "images" / record["image"])
        tmp = root / f".{split}.json.tmp"
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(root / f"{split}.json")
    return root
