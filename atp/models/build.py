"""Build or load the VLMs the entry points train and evaluate."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
)

from atp.models.tiny import tiny_llava_config
from atp.models.tiny_internvl import randomise_zero_inits, tiny_internvl_config
from atp.models.tiny_qwen import QWEN_FAMILIES, tiny_qwen_vl_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed position code (MAE-style): a quarter of the dims each for
    sin/cos of the row and of the column at geometric frequencies; row-major patch order."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos code needs a width divisible by 4, got {dim}.")
    quarter = dim // 4
    frequency = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angle = coordinate[:, None].float() * frequency[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1)


def build_testbed_llava(
    processor,
    text: str = "llama",
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_positions: str = "sincos",
    projector_init: str = "standardised",
    calibration_images: int = 64,
    text_init_std: float | None = None,
) -> LlavaForConditionalGeneration:
    """A small LLaVA on LLaVA-1.5's geometry (336 px, patch 14: 24 x 24 visual tokens) for the
    testbed's processor, randomly initialised (seeded) for training from scratch.

    vision_positions: "sincos" replaces the CLIP tower's patch position embeddings by a 2-D
    sine-cosine code of (row, column) at the scale of the patch embeddings; "random" keeps
    HF's initialisation (std 0.02), which the pre-LayerNorm drowns: on frozen random towers a
    linear probe then reads an image token's column (left/right half) at chance, 50 %, against
    99 % with the sin-cos code. Real CLIP towers carry strong learned positions.

    projector_init: "standardised" rescales the projector's last layer so that its outputs
    have zero mean and unit variance per dimension over the visual tokens of
    `calibration_images` seeded ShapesVQA scenes (see `standardise_projector`); "random"
    keeps HF's initialisation.

    text_init_std: the standard deviation of the LLM's linear and embedding weights (None:
    HF's `initializer_range`, 0.02, tuned for 4096-wide models). At the testbed's width a
    query-key product starts near zero at 0.02 and content-based attention is slow to
    appear; 1/sqrt(hidden_size) keeps each matrix's gain near 1.
    """
    tokenizer = processor.tokenizer
    crop = processor.image_processor.crop_size["height"]
    config = tiny_llava_config(
        text=text,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        grid=crop // processor.patch_size,
        patch_size=processor.patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        attn_implementation=attn_implementation,
    )
    config.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if text_init_std is not None:
        init_language_model(model, text_init_std)
        # recorded after construction: set before, HF's Llava init would apply it to the projector too
        config.text_config.initializer_range = text_init_std
    if vision_positions == "sincos":
        embedding = model.model.vision_tower.embeddings.position_embedding.weight
        with torch.no_grad():
            embedding[0] = 0.0  # [CLS]
            embedding[1:] = sincos_2d(
                config.vision_config.image_size // config.vision_config.patch_size, embedding.shape[1]
            )
    elif vision_positions != "random":
        raise ValueError(f"vision_positions must be 'sincos' or 'random', got {vision_positions!r}.")
    if projector_init == "standardised":
        standardise_projector(model, shapes_pixel_values(processor, calibration_images, seed=seed))
    elif projector_init != "random":
        raise ValueError(f"projector_init must be 'standardised' or 'random', got {projector_init!r}.")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@torch.no_grad()
def init_language_model(model: LlavaForConditionalGeneration, std: float) -> None:
    """Redraw the LLM's linear and embedding weights (and the LM head) from N(0, std^2);
    biases and norms keep HF's zeros and ones. The vision tower and projector are untouched."""
    if std <= 0:
        raise ValueError(f"text_init_std must be positive, got {std}.")
    for module in [*model.model.language_model.modules(), model.lm_head]:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
    padding = model.config.text_config.pad_token_id
    if padding is not None:
        model.model.language_model.get_input_embeddings().weight[padding].zero_()


def shapes_pixel_values(processor, count: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, H, W] processed images of `count` seeded ShapesVQA scenes."""
    from atp.data.shapes import render, sample_scene

    rng = random.Random(seed)
    images = [render(sample_scene(rng)) for _ in range(count)]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def standardise_projector(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> None:
    """Fold a per-dimension standardisation of the projector's outputs into its last layer.

    pixel_values: [N, 3, H, W] calibration images. Afterwards the image features the LLM
    receives have zero mean and unit variance per dimension over these images' visual
    tokens (a data-dependent initialisation, as LSUV). Why: a random frozen tower and
    projector give features whose mean over all tokens (mostly the black background) is
    twice as large as their variation between tokens; RMSNorm does not centre, so the LLM
    sees near-identical visual tokens. On such features a single attention head trained to
    answer the position question stays at chance for 500 steps; on standardised ones it
    reaches 99.8 % within 125 (`benchmarks/testbed/projector_probe.py`). A trained LLaVA projector
    does this mapping into the LLM's input space itself.
    """
    features = torch.cat(model.get_image_features(pixel_values=pixel_values).pooler_output).float()  # [N*576, D]
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    last = model.model.multi_modal_projector.linear_2
    last.weight.div_(std[:, None].to(last.weight.dtype))
    last.bias.sub_(mean.to(last.bias.dtype)).div_(std.to(last.bias.dtype))


def build_testbed_qwen(
    processor,
    family: str = "qwen2_5_vl",
    hidden_size: int = 96,
    intermediate_size: int = 192,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A small Qwen2-VL / Qwen2.5-VL / Qwen3-VL for the testbed's Qwen processor
    (`atp.data.processor.build_qwen_processor`), randomly initialised (seeded) from the family's own
    config class: the processor's patch and merge sizes, its tokenizer's vocabulary and marker ids, and
    M-RoPE sections in Qwen2.5-VL-7B's proportions (temporal 1/4, height and width 3/8 each of the
    head's rotary frequencies). No projector standardisation or sin-cos positions (the LLaVA testbed's
    initialisation aids) [ours]."""
    if family not in QWEN_FAMILIES:
        raise ValueError(f"model.family {family!r} is not one of {sorted(QWEN_FAMILIES)}.")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of an even width.")
    tokenizer = processor.tokenizer
    half = hidden_size // num_heads // 2  # rotary frequencies per head
    spatial = 3 * half // 8
    config = tiny_qwen_vl_config(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        mrope_section=(half - 2 * spatial, spatial, spatial),
        patch_size=processor.image_processor.patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        attn_implementation=attn_implementation,
    )
    if processor.image_processor.merge_size != config.vision_config.spatial_merge_size:
        raise ValueError(
            f"the processor merges {processor.image_processor.merge_size}x{processor.image_processor.merge_size} "
            f"patches, the tower {config.vision_config.spatial_merge_size}x{config.vision_config.spatial_merge_size}."
        )
    markers = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    for key, token in markers.items():
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    torch.manual_seed(seed)
    model = QWEN_FAMILIES[family][1](config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_testbed_internvl(
    processor,
    text: str = "qwen2",
    hidden_size: int = 96,
    intermediate_size: int = 192,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    patch_size: int = 14,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A small InternVL (InternVL3 layout: InternViT tower with [CLS], 2 x 2 pixel shuffle, MLP projector,
    Qwen2 LLM; `text="qwen3"` as InternVL3.5) for the testbed's InternVL processor
    (`atp.data.processor.build_internvl_processor`), randomly initialised (seeded) from the family's own
    config class: the processor's tile and patch sizes, its tokenizer's vocabulary and <IMG_CONTEXT> id.
    The tower's [CLS] token and the q/k biases are drawn at random (HF: zeros); no projector
    standardisation or sin-cos positions (the LLaVA testbed's initialisation aids) [ours]."""
    tokenizer = processor.tokenizer
    tile = processor.image_processor.size["height"]
    if tile % (2 * patch_size) or (tile // patch_size // 2) ** 2 != processor.image_seq_length:
        raise ValueError(
            f"the processor expands a {tile} px tile to {processor.image_seq_length} tokens, but {patch_size} px "
            f"patches after the 2 x 2 pixel shuffle give ({tile} / {patch_size} / 2)^2; build both with one patch_size."
        )
    config = tiny_internvl_config(
        text,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        image_size=tile,
        patch_size=patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        attn_implementation=attn_implementation,
    )
    config.image_token_id = processor.image_token_id
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    randomise_zero_inits(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_llava(path: str, dtype: str = "float32", attn_implementation: str = "sdpa", setting: str = "model.path"):
    """(model, processor) of a LLaVA-family VLM (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision; the class
    comes from its config.json) from a local directory written by `save_pretrained` (offline).

    setting: the option that names `path` where the caller reads it (train.py's model.path,
    evaluate.py's model_path, a benchmark's --base), quoted in the error when it is missing.
    """
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no HF model at {path!r} (config.json missing). Set {setting} to a local LLaVA checkpoint "
            "directory (e.g. a llava-hf/llava-1.5-7b-hf download) or train the testbed model first."
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    model = AutoModelForImageTextToText.from_pretrained(  # LLaVA-1.5, LLaVA-NeXT, OneVision, ...
        path, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
    from atp.models import get_adapter

    get_adapter(model)  # a clear error for a family atp has no adapter for
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def load_vlm(
    path: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    with_processor: bool = True,
    setting: str | None = None,
):
    """(model, processor or None) of any supported family (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
    InternVL) from a local `save_pretrained` directory (offline); the class comes from its config.json.

    setting: the option that names `path` where the caller reads it (train.py's model.path,
    evaluate.py's model_path), quoted in the error when the directory is missing. The processor
    comes from `AutoProcessor`; atp's testbed processors load with `atp.data.processor.load_processor`
    (callers pass with_processor=False and load it themselves)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        where = f"Set {setting} to a" if setting else "Give a"
        raise FileNotFoundError(
            f"no HF model at {path!r} (config.json missing). {where} local model directory written by "
            "save_pretrained (e.g. a llava-hf/llava-1.5-7b-hf or Qwen/Qwen2.5-VL-7B-Instruct download), "
            "or train the testbed model first."
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
    from atp.models import get_adapter

    get_adapter(model)  # a clear error for a family atp has no adapter for
    processor = AutoProcessor.from_pretrained(path) if with_processor else None
    return model, processor


def resolve_device(device: str = "auto") -> torch.device:
    """The device for a name: "auto" = the first GPU if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
