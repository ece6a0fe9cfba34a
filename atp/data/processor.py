"""Word-level HF tokenizers and processors for the ShapesVQA testbed, built offline: a
`LlavaProcessor` (LLaVA-1.5's layout), a `Qwen2VLProcessor` (Qwen-VL's layout and chat
markers) and an `InternVLProcessor` (InternVL's tiles and image markers), each with a chat
template of the same shape as its family's."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoProcessor,
    InternVLProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE_WORDS = ("user", "assistant", ":")

# user : <image> {question} assistant : {answer} </s>
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}"
    "{% else %}assistant : {% for part in message['content'] %}{{ part['text'] }} {% endfor %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


# Qwen-VL's markers (the real tokenizers' names), one word each
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<unk>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
)
QWEN_TEMPLATE_WORDS = ("user", "assistant")

# <|im_start|> user <|vision_start|> <|image_pad|> <|vision_end|> {question} <|im_end|>
# <|im_start|> assistant {answer} <|im_end|>   (Qwen-VL's layout, word-separated)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def word_level_tokenizer(
    words: list[str],
    special: tuple[str, ...],
    template_words: tuple[str, ...],
    named: dict[str, str] | None = None,
    **roles: str,
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `special` first (ids 0, 1, ...), then the template words and `words`.

    roles: the special-token roles (bos_token, eos_token, pad_token, unk_token) and
    image_token, which is registered as a special token so that runs of it split.
    named: further named special tokens the family's processor reads from its tokenizer (InternVL:
    start_image_token, end_image_token, context_image_token, video_token), each then an attribute
    with its `_id`."""
    vocab = {token: i for i, token in enumerate([*special, *template_words, *sorted(set(words))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=roles["unk_token"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {**(named or {}), **({"image_token": roles.pop("image_token")} if "image_token" in roles else {})}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        extra_special_tokens=named,
        padding_side="left",
        **roles,
    )
    markers = [t for t in special if t not in roles.values()]  # image, video and vision markers
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: special tokens first (<pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4)."""
    return word_level_tokenizer(
        words,
        SPECIAL_TOKENS,
        TEMPLATE_WORDS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        image_token="<image>",
    )


def build_processor(words: list[str], image_size: int = 336, patch_size: int = 14) -> LlavaProcessor:
    """LlavaProcessor: CLIP preprocessing at `image_size`, the word-level tokenizer, our chat template."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


class QwenImageProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor for images only: the same image token expansion, chat template and
    `mm_token_type_ids`, without the video processor. transformers' video processors need
    torchvision; a testbed that never sees a video should not (a real Qwen checkpoint loads its
    own processor through `AutoProcessor`, with torchvision installed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = "<|video_pad|>"
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class InternVLImageProcessor(InternVLProcessor):
    """InternVLProcessor for images only (as `QwenImageProcessor`: transformers' video processors need
    torchvision): the same tiles, `<img> <IMG_CONTEXT> * image_seq_length * tiles </img>` expansion and
    chat template. The attributes a processor saves and loads are the modality arguments of its
    `__init__` (image_processor, tokenizer here), so InternVLProcessor's video_processor slot, passed
    None, is not one of them."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        InternVLProcessor.__init__(
            self, image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template
        )


class OnevisionImageProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor for images only (see `InternVLImageProcessor`): anyres_max views, newline
    tokens and the multi-image layout of the stock processor, without its video processor. Its settings
    are named in `__init__`, as the stock one's: a processor saves the arguments its `__init__` names."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template=None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs,
    ):
        LlavaOnevisionProcessor.__init__(
            self,
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
        )


TESTBED_PROCESSORS = {
    "QwenImageProcessor": QwenImageProcessor,
    "InternVLImageProcessor": InternVLImageProcessor,
    "OnevisionImageProcessor": OnevisionImageProcessor,
}


def load_processor(path: str | Path):
    """The processor saved in a model directory: atp's testbed processors by the class name in
    processor_config.json, any other through `AutoProcessor` (offline)."""
    config = Path(path, "processor_config.json")
    name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    if name in TESTBED_PROCESSORS:
        return TESTBED_PROCESSORS[name].from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def build_qwen_processor(
    words: list[str], image_size: int = 336, patch_size: int = 14, merge_size: int = 2
) -> QwenImageProcessor:
    """A Qwen2VLProcessor (images only) for the testbed: Qwen-VL's image processing (dynamic resolution, `merge_size`
    x `merge_size` patches per visual token: a 336 px image becomes 12 x 12 tokens), a word-level
    tokenizer with Qwen's markers (<|endoftext|> pads and starts, <|im_end|> ends a turn) and a chat
    template with Qwen's layout. Works for Qwen2-VL, Qwen2.5-VL and Qwen3-VL testbeds alike."""
    factor = patch_size * merge_size
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size x merge_size = {factor}.")
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        min_pixels=factor * factor,
        max_pixels=image_size * image_size,
    )
    tokenizer = word_level_tokenizer(
        words,
        QWEN_SPECIAL_TOKENS,
        QWEN_TEMPLATE_WORDS,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        image_token="<|image_pad|>",
    )
    return QwenImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


# InternVL's markers (the real tokenizers' names; <IMG_CONTEXT> is the image token), one word each
INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<unk>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)

# <|im_start|> user <IMG_CONTEXT> {question} <|im_end|> <|im_start|> assistant {answer} <|im_end|>
# (InternVL-hf's layout, word-separated; the processor expands <IMG_CONTEXT> to <img> ... </img>)
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|> <|image_pad|> <|vision_end|> ", "<IMG_CONTEXT> ")


def build_internvl_processor(
    words: list[str], tile_size: int = 168, patch_size: int = 14, max_tiles: int = 4
) -> InternVLImageProcessor:
    """An InternVLProcessor (images only) for the testbed: InternVL's tiling (GotOcr2's image processor, PIL
    path: an image becomes up to `max_tiles` tiles of `tile_size` px at its aspect ratio, plus a
    thumbnail when it has more than one), (tile_size / patch_size / 2)^2 visual tokens per tile after
    the 2 x 2 pixel shuffle (a 336 px ShapesVQA image: 2 x 2 tiles + thumbnail of 6 x 6 tokens), a
    word-level tokenizer with InternVL's markers (<|endoftext|> pads and starts, <|im_end|> ends a turn)
    and a chat template with InternVL's layout."""
    if tile_size % (2 * patch_size):
        raise ValueError(
            f"tile_size {tile_size} must be a multiple of 2 x patch_size = {2 * patch_size} (pixel shuffle)."
        )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )
    tokenizer = word_level_tokenizer(
        words,
        INTERNVL_SPECIAL_TOKENS,
        QWEN_TEMPLATE_WORDS,
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    return InternVLImageProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=(tile_size // patch_size // 2) ** 2,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def build_onevision_processor(
    words: list[str],
    crop_size: int = 16,
    patch_size: int = 4,
    pinpoints: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2)),
) -> OnevisionImageProcessor:
    """A LlavaOnevisionProcessor (images only) for tiny OneVision models (`atp.models.tiny_next`): a base view of
    `crop_size` px plus anyres crops at the `pinpoints` layouts (rows, cols of crops), unpadded, a newline token
    closing each row, SigLIP geometry (no [CLS]: vision_feature_select_strategy "full"), the word-level tokenizer
    (with a <video> token) and chat template of `build_processor`."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": crop_size, "width": crop_size},
        image_grid_pinpoints=[[rows * crop_size, cols * crop_size] for rows, cols in pinpoints],
    )
    tokenizer = word_level_tokenizer(  # build_tokenizer's, and a <video> token (else unknown words would be videos)
        words,
        (*SPECIAL_TOKENS, "<video>"),
        TEMPLATE_WORDS,
        named={"video_token": "<video>"},
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        image_token="<image>",
    )
    return OnevisionImageProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(crop_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        vision_aspect_ratio="anyres_max_9",
    )
