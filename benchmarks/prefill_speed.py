"""Prefill speed of the drop-mode runtime: measured vs analytic speedup, side by side.

Three language stacks with a 7B model's layer shapes and fewer layers (the CPU), each run
through the real model path (HF forward: vision tower, projector or merger, language model)
with random weights. The vision towers are tiny (a few percent of the prefill; their time is
printed with each table): the analytic speedup counts the decoder stack only, so the tower
is in the measured numbers and not in the analytic ones, which errs against the runtime.

  llava15     LlavaForConditionalGeneration, Vicuna-7B's layer shapes (hidden 4096, MLP 11008,
              32 heads), a 336 px image: 24 x 24 = 576 visual tokens, LLaVA-1.5's template
  llava_next  LlavaNextForConditionalGeneration, LLaVA-NeXT-7B's layer shapes (Vicuna-7B) and its
              anyres settings (CLIP crops of 336 px, patch 14, pinpoints 1x2, 2x1, 2x2, 3x1, 1x3
              crops), one 640 x 480 image (a COCO photo's size): a base view of 24 x 24 tokens and
              a 2 x 2 crop grid of 48 x 48 unpadded to 36 x 48, each row closed by an
              image_newline token: 576 + 1,728 content tokens and 36 newline tokens (structural:
              never pruned, not counted as visual tokens), 2,340 image tokens, counted by the
              model's own get_image_features; LLaVA-NeXT's template (as LLaVA-1.5's)
  qwen2_5_vl  Qwen2_5_VLForConditionalGeneration, Qwen2.5-VL-7B's layer shapes (hidden 3584,
              MLP 18944, 28 query / 4 KV heads, M-RoPE), one image of 72 x 72 tower patches:
              36 x 36 = 1,296 visual tokens after the 2x2 merger, Qwen's chat template

Rows, at 25 % of the visual tokens kept (papers' convention: what the method keeps after its
cut): stock HF; the runtime with nothing pruned; FastV (K=2) in atp (SDPA, a probe reads
layer K-1's last-token row); FastV as the reference implementations score it (the whole
model in eager attention with output_attentions=True, layer K-1's weights read from HF's
eager attention, the same rule: the same tokens kept); PDrop (stages at 1/4, 1/2, 3/4 of the
depth, `atp.budget.pdrop_schedule`); ATP (untrained modules with constant thresholds, so the
probes and MLPs cost what they cost trained; theta_r per stack so that its first module keeps
about a quarter of the visual tokens, theta_s = 0.6: SAP keeps the stride-4 grid). Every
configuration runs in the same process, interleaved, median of repeats, after one warm-up
forward of the stock model. Analytic speedups come from atp's accounting
(`atp.metrics.cost_report` on `atp.stats`); scoring overhead is the time inside the pruner
(`PruningStats.scoring_seconds`: scores, probes, ATP's MLPs) less the key projections its
layer then reuses (`reused_seconds`: PDrop's probe of the layer about to run projects that
layer's keys, which the layer takes instead of projecting them again), as % of the unpruned
prefill, and, because the stacks are shallower than the 7B models, also scaled to the full depth.

    python benchmarks/prefill_speed.py --stack qwen2_5_vl --layers 4 --repeats 3
    python benchmarks/prefill_speed.py --smoke          # tiny widths, every stack, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import atp
from atp.budget import pdrop_schedule
from atp.metrics import cost_report
from atp.models import get_adapter
from atp.models.tiny_qwen import tiny_qwen_vl
from atp.progress import progress
from atp.runtime.pruner import PruneContext, TokenPruner
from atp.token.atp import ATPPruner
from atp.token.selection import TokenBudget, top_k_per_sample

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
QWEN2_5_7B = dict(hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4, mrope_section=(16, 24, 24))
SMOKE_LLAMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
SMOKE_QWEN = dict(hidden_size=64, intermediate_size=160, num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3))
LLAVA_VOCAB = 32000
QWEN_VOCAB = 32000  # [ours] Qwen's is 152,064; the LM head runs on one token (logits_to_keep=1) either way
QWEN_PATCH = 14
FASTV_LAYER = 2
# ATP's constant theta_r per stack: S_r > theta_r keeps about 18-21 % of the visual tokens at the first
# module (measured on each stack's layer 0; theta_s = 0.6 adds SAP's stride-4 grid: about 25 % in all)
ATP_THETA_R = {"llava15": 0.68, "llava_next": 0.43, "qwen2_5_vl": 0.58}


# -- stacks ---------------------------------------------------------------------------------------
@dataclass
class Stack:
    """One model shape and its prompt: `build(layers, attn)` -> model, `inputs` for its forward."""

    name: str
    title: str
    full_layers: int  # the depth of the 7B model the shapes come from
    num_visual: int
    build: Callable[[int, str], torch.nn.Module]
    inputs: dict = field(repr=False)
    atp_theta: tuple[float, float] = (0.5, 0.6)  # ATP's constant (theta_r, theta_s) for this stack


def llava_stack(name: str, image_size: int, full_layers: int, smoke: bool) -> Stack:
    """A LlavaForConditionalGeneration at `image_size` px (patch 14, CLIP without its [CLS] in the
    features: (image_size / 14)^2 visual tokens) and LLaVA-1.5's template: ~35 system/USER tokens,
    the image, a question and 'ASSISTANT:' (30 tokens)."""
    patch = 14
    num_visual = (image_size // patch) ** 2
    image_token = LLAVA_VOCAB - 1

    def build(layers: int, attn: str) -> LlavaForConditionalGeneration:
        text = LlamaConfig(
            **(SMOKE_LLAMA if smoke else VICUNA_7B),
            num_hidden_layers=layers,
            vocab_size=LLAVA_VOCAB,
            max_position_embeddings=4096,
        )
        vision = CLIPVisionConfig(
            hidden_size=32 if smoke else 64,
            intermediate_size=64 if smoke else 128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        )
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=image_token, image_seq_length=num_visual
        )
        config._attn_implementation = config.text_config._attn_implementation = attn
        config.vision_config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(config).eval()

    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, LLAVA_VOCAB - 100, (35,), generator=generator)
    after = torch.randint(3, LLAVA_VOCAB - 100, (30,), generator=generator)
    ids = torch.cat([torch.tensor([1]), before, torch.full((num_visual,), image_token), after])[None]
    pixels = torch.randn(1, 3, image_size, image_size, generator=generator)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, logits_to_keep=1)
    title = f"LLaVA-1.5-7B's layer shapes (Vicuna-7B), {num_visual} visual tokens ({image_size} px)"
    return Stack(name, title, full_layers, num_visual, build, inputs)


NEXT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # LLaVA-NeXT-7B's anyres layouts, (rows, cols) of crops


def llava_next_config(grid: int, smoke: bool, layers: int, attn: str) -> LlavaNextConfig:
    """LLaVA-NeXT-7B's settings: CLIP crops of grid x grid patches of 14 px (the tower's [CLS] dropped,
    layer -2 read), anyres pinpoints NEXT_PINPOINTS, Vicuna-7B's layer shapes (tiny ones with `smoke`)."""
    crop = grid * 14
    vision = CLIPVisionConfig(
        hidden_size=32 if smoke else 64,
        intermediate_size=64 if smoke else 128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=crop,
        patch_size=14,
    )
    vision._attn_implementation = "sdpa"
    text = LlamaConfig(
        **(SMOKE_LLAMA if smoke else VICUNA_7B),
        num_hidden_layers=layers,
        vocab_size=LLAVA_VOCAB,
        max_position_embeddings=4096,
    )
    text._attn_implementation = attn
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=LLAVA_VOCAB - 1,
        image_grid_pinpoints=[[rows * crop, cols * crop] for rows, cols in NEXT_PINPOINTS],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    return config


def next_image_tokens(grid: int, image: tuple[int, int], smoke: bool) -> tuple[int, int]:
    """(image placeholder tokens, newline tokens) of one `image` (height, width) as the stock model packs
    it: its own get_image_features (tiny text widths: the packing does not depend on them) on zeros."""
    config = llava_next_config(grid, True, 1, "sdpa")
    config.vision_config = llava_next_config(grid, smoke, 1, "sdpa").vision_config
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    crop = grid * 14
    views = image_size_to_num_patches(image, config.image_grid_pinpoints, crop)
    with torch.no_grad():
        model.model.image_newline.fill_(float("nan"))  # newline rows are the NaN rows
        features = model.model.get_image_features(
            pixel_values=torch.zeros(1, views, 3, crop, crop), image_sizes=torch.tensor([image])
        )
    packed = features.pooler_output[0]
    return packed.shape[0], int(packed.isnan().all(1).sum())


def llava_next_stack(grid: int, image: tuple[int, int], smoke: bool) -> Stack:
    """A LlavaNextForConditionalGeneration (`llava_next_config`) with one `image` (height, width) in
    LLaVA-NeXT's Vicuna template: ~35 system/USER tokens, the image's placeholders (base view, unpadded
    crop grid, newline tokens), a question and 'ASSISTANT:' (30 tokens)."""
    image_token = LLAVA_VOCAB - 1
    tokens, newlines = next_image_tokens(grid, image, smoke)

    def build(layers: int, attn: str) -> LlavaNextForConditionalGeneration:
        config = llava_next_config(grid, smoke, layers, attn)
        torch.manual_seed(0)
        return LlavaNextForConditionalGeneration(config).eval()

    crop = grid * 14
    views = image_size_to_num_patches(image, llava_next_config(grid, True, 1, "sdpa").image_grid_pinpoints, crop)
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, LLAVA_VOCAB - 100, (35,), generator=generator)
    after = torch.randint(3, LLAVA_VOCAB - 100, (30,), generator=generator)
    ids = torch.cat([torch.tensor([1]), before, torch.full((tokens,), image_token), after])[None]
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(1, views, 3, crop, crop, generator=generator),
        image_sizes=torch.tensor([image]),
        logits_to_keep=1,
    )
    content = tokens - newlines
    title = (
        f"LLaVA-NeXT-7B's layer shapes (Vicuna-7B) and anyres layout, one {image[1]} x {image[0]} image: "
        f"{views} crops of {crop} px (base view + {views - 1}), {tokens} image tokens = {content} visual tokens "
        f"+ {newlines} newline tokens (structural, never pruned)"
    )
    return Stack("llava_next", title, 32, content, build, inputs)


def qwen_stack(grid: int, smoke: bool) -> Stack:
    """Qwen2_5_VLForConditionalGeneration with one image of (2 grid) x (2 grid) tower patches
    (grid x grid visual tokens after the 2x2 merger) in Qwen's chat template: 20 tokens
    (system, user) before <|vision_start|>, 30 after <|vision_end|> (question, assistant)."""
    vocab = QWEN_VOCAB
    image, vision_start, vision_end = vocab - 1, vocab - 3, vocab - 4  # atp.models.tiny_qwen's layout
    patch = 2 if smoke else QWEN_PATCH
    num_visual = grid * grid

    def build(layers: int, attn: str) -> torch.nn.Module:
        model = tiny_qwen_vl(
            "qwen2_5_vl",
            vocab_size=vocab,
            num_layers=layers,
            patch_size=patch,
            vision_hidden=32,
            attn_implementation=attn,
            **(SMOKE_QWEN if smoke else QWEN2_5_7B),
        )
        model.config.vision_config._attn_implementation = "sdpa"
        return model

    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, vocab - 100, (20,), generator=generator)
    after = torch.randint(3, vocab - 100, (30,), generator=generator)
    ids = torch.cat(
        [
            torch.tensor([1]),
            before,
            torch.tensor([vision_start]),
            torch.full((num_visual,), image),
            torch.tensor([vision_end]),
            after,
        ]
    )[None]
    patches = (2 * grid) ** 2
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == image).int(),
        pixel_values=torch.randn(patches, 3 * 2 * patch * patch, generator=generator),
        image_grid_thw=torch.tensor([[1, 2 * grid, 2 * grid]]),
        logits_to_keep=1,
    )
    title = (
        f"Qwen2.5-VL-7B's layer shapes (hidden 3584, MLP 18944, 28 / 4 heads, M-RoPE), one image of "
        f"{2 * grid} x {2 * grid} patches: {num_visual} visual tokens"
    )
    return Stack("qwen2_5_vl", title, 28, num_visual, build, inputs)


def build_stack(name: str, smoke: bool = False) -> Stack:
    """The stack `name`; `smoke`: tiny widths and images (a check of the script, not a measurement)."""
    if name == "llava15":
        stack = llava_stack(name, 112 if smoke else 336, 32, smoke)
    elif name == "llava_next":
        stack = llava_next_stack(4 if smoke else 24, (84, 112) if smoke else (480, 640), smoke)
    elif name == "qwen2_5_vl":
        stack = qwen_stack(8 if smoke else 36, smoke)
    else:
        raise ValueError(f"unknown stack {name!r}; choose one of {STACKS}.")
    if not smoke:
        stack.atp_theta = (ATP_THETA_R[name], 0.6)
    if smoke:
        stack.title = f"SMOKE ({name}, tiny widths and image: checks the script, measures nothing)"
    return stack


STACKS = ("llava15", "llava_next", "qwen2_5_vl")


# -- FastV as the reference implementations score it ----------------------------------------------
class EagerReferenceFastV(TokenPruner):
    """FastV's rule scored the way the reference implementations do: the model runs in eager
    attention (output_attentions=True) and layer K-1's attention weights, as HF's eager attention
    returns them, give the last prompt token's row, averaged over heads; the top-k visual tokens
    are kept before layer K. A benchmark-only pruner (not registered)."""

    name = "fastv_eager_reference"

    def __init__(self, layer: int = FASTV_LAYER, keep_ratio: float = 0.25) -> None:
        super().__init__([layer])
        self.layer = layer
        self.budget = TokenBudget(self.name, keep_ratio)
        self.weights: torch.Tensor | None = None  # [B, H, S, S] of layer K-1, this forward
        self._handle = None

    def attach(self, model: torch.nn.Module) -> None:
        """Read layer K-1's attention weights from its self-attention output (eager: (out, weights))."""

        def keep_weights(_module, _inputs, output) -> None:
            self.weights = output[1]

        attention = get_adapter(model).layers[self.layer - 1].self_attn
        self._handle = attention.register_forward_hook(keep_weights)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.weights = None, None

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("fastv_eager_reference needs eager attention: layer K-1 returned no attention weights.")
        index = ctx.last_prompt[:, None, None, None].expand(-1, self.weights.shape[1], 1, self.weights.shape[-1])
        score = self.weights.gather(2, index).float().mean(1)[:, 0]  # [B, S]
        self.weights = None
        return top_k_per_sample(score, ctx.visual, self.budget.count(ctx.visual_counts()))


def fixed_threshold_atp(num_layers: int, theta_r: float, theta_s: float) -> ATPPruner:
    """ATP modules at the default layers whose threshold MLPs output constant (theta_r, theta_s):
    untrained modules keep everything, and the probes cost the same whatever the thresholds."""
    pruner = atp.build_pruner("atp", num_layers=num_layers)
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            for head, theta in ((module.redundancy_head, theta_r), (module.spatial_head, theta_s)):
                head.weight.zero_()
                head.bias.fill_(torch.logit(torch.tensor(theta)).item())
    return pruner.eval()


@dataclass
class Config:
    """One row: a pruner (None: the stock model) under an attention implementation."""

    name: str
    attn: str
    pruner: TokenPruner | None
    output_attentions: bool = False


def configurations(stack: Stack, layers: int, keep_ratio: float, atp_theta: tuple[float, float]) -> list[Config]:
    tokens = round(keep_ratio * stack.num_visual)
    return [
        Config("stock HF", "sdpa", None),
        Config("atp runtime, none", "sdpa", atp.build_pruner("none")),
        Config(
            f"fastv K={FASTV_LAYER}, atp (SDPA + probe)",
            "sdpa",
            atp.build_pruner("fastv", layer=FASTV_LAYER, keep_ratio=keep_ratio),
        ),
        Config(
            f"fastv K={FASTV_LAYER}, reference scoring (eager, output_attentions)",
            "eager",
            EagerReferenceFastV(FASTV_LAYER, keep_ratio),
            output_attentions=True,
        ),
        Config("pdrop", "sdpa", atp.build_pruner("pdrop", **pdrop_schedule(tokens, stack.num_visual, layers))),
        Config("atp (fixed thresholds)", "sdpa", fixed_threshold_atp(layers, *atp_theta)),
    ]


# -- timing ---------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured configuration, one entry per timed forward; `stats` is None for the stock model.

    seconds: the language model's prefill (wall), from its pre-hook (before the runtime's) to its
             output, the runtime's hooks and the pruner's scoring included: what the analytic
             FLOPs count; cpu_seconds: the same span in process CPU time (all threads);
             forward_seconds: the whole HF forward (vision tower, projector, LM, LM head)
    """

    name: str
    attn: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    forward_seconds: list[float] = field(default_factory=list)
    scoring: list[float] = field(default_factory=list)
    stats: atp.PruningStats | None = None


class SpanTimer:
    """Wall and process-CPU seconds of each call of `module` (a pre-hook that runs before any
    other, a forward hook after the module's output)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = (0.0, 0.0)
        self._handles = [
            module.register_forward_pre_hook(self._begin, prepend=True),
            module.register_forward_hook(self._end),
        ]

    def _begin(self, *_) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def _end(self, *_) -> None:
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def set_text_attention(model: torch.nn.Module, attn: str) -> None:
    """The language model's attention implementation (the vision tower stays on SDPA)."""
    model.config.text_config._attn_implementation = attn


@dataclass
class StackResult:
    """What `run_stack` measured: rows in `configurations` order, the vision tower's seconds per
    timed forward, and the language model's config (for the accounting)."""

    stack: Stack
    layers: int
    repeats: int
    keep_ratio: float
    rows: list[Row]
    tower_seconds: list[float]
    text_config: object
    layer_seconds: dict[int, list[float]] = field(default_factory=dict)  # tokens -> a stock layer's seconds


def time_stock_layers(model: torch.nn.Module, lengths: list[int], repeats: int) -> dict[int, list[float]]:
    """Wall seconds of stock decoder layer 0 (no atp hooks, SDPA, no mask: is_causal, as stock HF runs a
    batch of one) on random hidden states of each length in `lengths`, `repeats` interleaved rounds:
    what the CPU charges for one layer at n tokens, the reference for the runtime's pruned layers."""
    adapter = get_adapter(model)
    layer, width = adapter.layers[0], adapter.text_config.hidden_size
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for n in lengths:
        hidden = torch.randn(1, n, width, generator=generator)
        position = torch.arange(n)[None]
        inputs[n] = (hidden, position, adapter.rotary(hidden, position, None))
    seconds: dict[int, list[float]] = {n: [] for n in lengths}
    with torch.inference_mode():
        layer(
            inputs[lengths[-1]][0],
            attention_mask=None,
            position_ids=inputs[lengths[-1]][1],
            position_embeddings=inputs[lengths[-1]][2],
        )  # warm-up
        for repeat in range(repeats):
            for n in lengths if repeat % 2 == 0 else lengths[::-1]:
                hidden, position, rotary = inputs[n]
                start = time.perf_counter()
                layer(hidden, attention_mask=None, position_ids=position, position_embeddings=rotary)
                seconds[n].append(time.perf_counter() - start)
    return seconds


def run_stack(
    stack: Stack,
    layers: int,
    repeats: int,
    keep_ratio: float = 0.25,
    atp_theta: tuple[float, float] | None = None,
) -> StackResult:
    """Time every configuration of `stack`: one warm-up forward of the stock model, then `repeats`
    rounds, interleaved, every other round in reverse order (a load that drifts during a round
    then weighs on both ends alike). atp_theta: ATP's constant thresholds (default: the stack's)."""
    model = stack.build(layers, "sdpa")
    configs = configurations(stack, layers, keep_ratio, atp_theta or stack.atp_theta)
    rows = [Row(c.name, c.attn) for c in configs]
    adapter = get_adapter(model)
    tower, language_model = SpanTimer(adapter.vision_tower), SpanTimer(adapter.language_model)
    with torch.inference_mode():
        model(**stack.inputs)  # warm-up
        tower.seconds.clear()
        for repeat in progress(range(repeats), f"{stack.name}: timing rounds"):
            order = list(zip(configs, rows))
            for config, row in order if repeat % 2 == 0 else order[::-1]:
                atp.remove(model)
                set_text_attention(model, config.attn)
                if config.pruner is not None:
                    atp.apply(model, config.pruner, mode="drop")
                if isinstance(config.pruner, EagerReferenceFastV):
                    config.pruner.attach(model)
                start = time.perf_counter()
                model(**stack.inputs, output_attentions=config.output_attentions)
                row.forward_seconds.append(time.perf_counter() - start)
                row.seconds.append(language_model.seconds[-1])
                row.cpu_seconds.append(language_model.cpu_seconds[-1])
                if isinstance(config.pruner, EagerReferenceFastV):
                    config.pruner.detach()
                if config.pruner is not None:
                    row.stats = atp.stats(model)
                row.scoring.append(
                    row.stats.scoring_seconds - row.stats.reused_seconds if row.stats is not None else 0.0
                )
    atp.remove(model)
    tower.remove()
    language_model.remove()
    lengths = {int(stack.inputs["input_ids"].shape[1])}
    for row in rows:
        if row.stats is not None:
            lengths.update(int(n) for n in row.stats.tokens[0])
    set_text_attention(model, "sdpa")
    layer_seconds = time_stock_layers(model, sorted(lengths, reverse=True), repeats)
    return StackResult(stack, layers, repeats, keep_ratio, rows, tower.seconds, model.config.text_config, layer_seconds)


# -- the table ------------------------------------------------------------------------------------
COLUMNS = (
    "method",
    "attention",
    "visual tokens/layer",
    "LM prefill s",
    "measured speedup",
    "analytic speedup",
    "measured/analytic",
    "stock-layer speedup",
    "measured/stock-layer",
    "CPU-time speedup",
    "whole-forward speedup",
    "scoring overhead",
    "scoring overhead at full depth",
    "KV cache",
)


@dataclass
class TableRow:
    """The numbers of one printed row; speedups relative to the first row (stock HF, SDPA), medians."""

    name: str
    attn: str
    visual_tokens: float  # mean over decoder layers of the visual tokens processed
    seconds: float  # the language model's prefill, wall
    measured: float  # of the language model's wall time
    analytic: float  # 1 / atp.metrics.cost_report(...).flops_ratio
    stock_layers: float  # sum_l t(N) / sum_l t(n_l), t: a stock decoder layer's median seconds at n tokens
    cpu_measured: float  # of the language model's process CPU time
    forward_measured: float  # of the whole forward's wall time (tiny vision tower included)
    overhead: float | None  # scoring seconds / the stock language model's prefill, in %
    overhead_full_depth: float | None  # the same probes over a prefill of the 7B model's depth, in %
    kv_ratio: float


def table_rows(result: StackResult) -> list[TableRow]:
    """Medians, measured and analytic speedups (atp's accounting on each row's atp.stats)."""
    stock = result.rows[0]
    base, base_cpu, base_forward = (
        statistics.median(x) for x in (stock.seconds, stock.cpu_seconds, stock.forward_seconds)
    )
    depth = result.stack.full_layers / result.layers
    layer_time = {n: statistics.median(times) for n, times in result.layer_seconds.items()}
    full_length = int(result.stack.inputs["input_ids"].shape[1])
    out = []
    for row in result.rows:
        median = statistics.median(row.seconds)
        if row.stats is None:
            analytic, kv, visual, overhead, full = 1.0, 1.0, float(result.stack.num_visual), None, None
            stock_layers = 1.0
        else:
            tokens = [int(n) for n in row.stats.tokens[0]]
            stock_layers = len(tokens) * layer_time[full_length] / sum(layer_time[n] for n in tokens)
            report = cost_report(result.text_config, row.stats)
            analytic, kv = 1.0 / report.flops_ratio, report.kv_ratio
            visual = float(row.stats.average_visual_tokens()[0])
            overhead = 100 * statistics.median(row.scoring) / base
            full = overhead / depth
        cpu = base_cpu / statistics.median(row.cpu_seconds)
        forward = base_forward / statistics.median(row.forward_seconds)
        out.append(
            TableRow(
                row.name,
                row.attn,
                visual,
                median,
                base / median,
                analytic,
                stock_layers,
                cpu,
                forward,
                overhead,
                full,
                kv,
            )
        )
    return out


def kept_agreement(result: StackResult) -> tuple[int, int]:
    """(tokens both FastV rows keep, tokens atp's FastV keeps) in the last forward."""
    by_name = {row.name: row for row in result.rows}
    ours = next(r for n, r in by_name.items() if n.startswith("fastv") and "atp" in n).stats.kept[FASTV_LAYER][0]
    reference = next(r for n, r in by_name.items() if "reference" in n).stats.kept[FASTV_LAYER][0]
    return len(set(ours.tolist()) & set(reference.tolist())), len(ours)


def format_table(result: StackResult, load: tuple[float, float, float] | None = None) -> str:
    """The markdown table of one stack with its caption and notes."""
    rows = table_rows(result)
    stack = result.stack
    tokens = stack.inputs["input_ids"].shape[1]
    lines = [
        f"{stack.title}; {result.layers} of {stack.full_layers} decoder layers, {tokens} tokens, keep "
        f"{result.keep_ratio:.0%} of the visual tokens, drop mode, fp32, {torch.get_num_threads()} threads, "
        f"median of {result.repeats}"
        + (f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start" if load else ""),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        overhead = "-" if r.overhead is None else f"{r.overhead:.2f} %"
        full = "-" if r.overhead_full_depth is None else f"{r.overhead_full_depth:.2f} %"
        lines.append(
            f"| {r.name} | {r.attn} | {r.visual_tokens:.1f} | {r.seconds:.3f} | {r.measured:.2f}x | {r.analytic:.2f}x "
            f"| {r.measured / r.analytic:.3f} | {r.stock_layers:.2f}x | {r.measured / r.stock_layers:.3f} "
            f"| {r.cpu_measured:.2f}x | {r.forward_measured:.2f}x | {overhead} "
            f"| {full} | {100 * r.kv_ratio:.1f} % |"
        )
    ours = next(r for r in rows if r.name.startswith("fastv") and "atp" in r.name)
    reference = next(r for r in rows if "reference" in r.name)
    common, kept = kept_agreement(result)
    tower = statistics.median(result.tower_seconds)
    forward = statistics.median(result.rows[0].forward_seconds)
    lines += [
        "",
        f"FastV in atp runs {reference.seconds / ours.seconds:.2f}x faster than FastV scored as the references do "
        f"(eager attention, output_attentions); both keep {kept} tokens, {common} of them the same.",
        f"Vision tower (tiny, in the whole forward only): {tower:.3f} s, {100 * tower / forward:.1f} % of the stock "
        f"forward ({forward:.3f} s).",
        "LM prefill s per round, in configuration order: "
        + "; ".join(" / ".join(f"{t:.2f}" for t in row.seconds) for row in result.rows),
        "Stock decoder layer s at n tokens (median): "
        + ", ".join(f"{n}: {statistics.median(t):.3f}" for n, t in sorted(result.layer_seconds.items(), reverse=True)),
    ]
    return "\n".join(lines)


NOTES = (
    "Speedups relative to stock HF with SDPA, medians. Measured: wall time of the language model's forward (decoder"
    " stack, the runtime's hooks and the pruner's scoring, final norm; what the analytic FLOPs count); CPU-time: "
    "the same span in process CPU time; whole-forward: the full HF forward (tiny vision tower, projector, LM head "
    "on one token). Analytic: prefill FLOPs of the decoder stack by atp's accounting (atp.metrics.cost_report on "
    "atp.stats). Stock-layer: the speedup stock HF decoder layers would give at the row's tokens per layer on this "
    "machine, sum_l t(N) / sum_l t(n_l) with t(n) a stock layer's time at n tokens (SDPA, is_causal), timed in the "
    "same process; measured/stock-layer isolates what the runtime and the pruner add or save beyond what the CPU "
    "charges per layer at fewer tokens. Scoring overhead: time inside the pruner (scores, probes, ATP's MLPs), less "
    "the key projections the next layer reuses instead of computing (PDrop), as % of the stock language model's "
    "prefill; at full depth: the same seconds over a prefill of the 7B model's depth "
    "(prefill time scaled by full / benchmarked layers). KV cache: bytes after prefill relative to unpruned."
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=(*STACKS, "all"), default="all", help="which language stack")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the 7B models have 28-32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up round (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and images, 1 repeat: checks the script")
    parser.add_argument("--keep-ratio", type=float, default=0.25, help="fraction of the visual tokens kept")
    parser.add_argument(
        "--atp-theta",
        type=float,
        nargs=2,
        default=None,
        metavar=("THETA_R", "THETA_S"),
        help="constant ATP thresholds (default: the stack's; theta_s 0.6: the SAP branch keeps the stride-4 grid)",
    )
    args = parser.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    names = STACKS if args.stack == "all" else (args.stack,)
    for name in names:
        load = os.getloadavg()
        theta = tuple(args.atp_theta) if args.atp_theta else None
        result = run_stack(build_stack(name, args.smoke), args.layers, repeats, args.keep_ratio, theta)
        print("\n" + format_table(result, load) + "\n", flush=True)
    print(NOTES)


if __name__ == "__main__":
    main()
