"""One evaluation protocol for every pruner: accuracy, tokens, FLOPs, KV cache, latency.

- accuracy: exact match of the first generated word against the reference answer
  (greedy HF `generate`), overall and per question type;
- average visual tokens per decoder layer, and the kept count at the LLM input;
- analytic prefill FLOPs and KV-cache bytes relative to the unpruned model;
- measured prefill latency ratio: the same batches through the pruned and the stock
  model in one process, interleaved round by round after a warm-up round; the median of the
  per-round ratios and their range (`atp.latency`), with a warning when the range makes
  the ratio unreadable;
- visual tokens per decoder layer (mean over samples), for the per-layer plot;
- adaptivity: Spearman correlation between per-instance kept tokens and the number of
  objects (when the data says how many there are).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader

import atp
from atp.latency import Contender, LatencyRatio, interleaved_prefill_times, latency_ratios
from atp.metrics import cost_report
from atp.models import get_adapter
from atp.models.adapter import MODEL_INPUT_KEYS
from atp.progress import progress


@dataclass
class EvaluationResult:
    method: str
    accuracy: float
    accuracy_by_type: dict[str, float]
    avg_visual_tokens: float  # mean over samples of mean_l n_l
    input_visual_tokens: float  # visual tokens at the LLM input (after any pre-LLM pruning)
    flops_ratio: float
    kv_ratio: float
    latency_ratio: float | None  # median per-round prefill time / the stock model's
    spearman_tokens_objects: float | None
    num_samples: int
    per_sample: list[dict] = field(default_factory=list)
    visual_tokens_per_layer: list[float] = field(default_factory=list)  # [L] mean over samples
    latency_low: float | None = None  # min / max over the timed rounds of the per-round ratio
    latency_high: float | None = None
    latency_rounds: int = 0
    vision_flops_ratio: float | None = None  # vision-tower FLOPs pruned / unpruned (in-tower pruners only)

    @property
    def latency(self) -> LatencyRatio | None:
        if self.latency_ratio is None or self.latency_low is None or self.latency_high is None:
            return None
        return LatencyRatio(self.latency_ratio, self.latency_low, self.latency_high, self.latency_rounds)

    def set_latency(self, latency: LatencyRatio | None) -> None:
        if latency is None:
            self.latency_ratio = self.latency_low = self.latency_high = None
            self.latency_rounds = 0
        else:
            self.latency_ratio, self.latency_low, self.latency_high = latency.median, latency.low, latency.high
            self.latency_rounds = latency.rounds

    def as_dict(self) -> dict:
        return asdict(self)


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None if either side is constant."""
    if len(x) < 3:
        return None

    def ranks(values: list[float]) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64)
        order = v.argsort()
        rank = torch.empty_like(v)
        rank[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # average the ranks of ties
            tied = v == value
            rank[tied] = rank[tied].mean()
        return rank

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


BLIND_CONTROLS = ("noise", "blank")


def _model_inputs(batch: dict, device, processor, blind: str | None = None) -> dict:
    """The model's inputs for `batch`; with `blind`, every image replaced (same prompts):
    "noise": Gaussian noise in pixel-value space (out of distribution); "blank": an all-black
    image of the processor's size, the testbed's background without objects."""
    inputs = {k: batch[k].to(device) for k in MODEL_INPUT_KEYS if k in batch}
    if blind is None or "pixel_values" not in inputs:
        return inputs
    pixels = inputs["pixel_values"]
    if blind == "noise":
        generator = torch.Generator().manual_seed(len(batch["id"]))
        inputs["pixel_values"] = torch.randn(pixels.shape, generator=generator).to(device, pixels.dtype)
    elif blind == "blank" and "image_sizes" in inputs:  # anyres: black images of the real sizes, same layout
        blacks = [Image.new("RGB", (int(w), int(h))) for h, w in inputs["image_sizes"].tolist()]
        blank = processor.image_processor(blacks, return_tensors="pt")["pixel_values"]
        inputs["pixel_values"] = blank.to(device, pixels.dtype)
    elif blind == "blank":
        if pixels.ndim != 4:
            raise ValueError(
                f"blind='blank' rebuilds images of one fixed size from pixel_values [N, 3, H, W], but this model takes "
                f"pixel_values of shape {tuple(pixels.shape)} (patches of images with their own sizes, e.g. Qwen-VL); "
                "use blind='noise'."
            )
        black = Image.new("RGB", (pixels.shape[-1], pixels.shape[-2]))
        blank = processor.image_processor(black, return_tensors="pt")["pixel_values"]
        inputs["pixel_values"] = blank.expand_as(pixels).to(device, pixels.dtype).clone()
    else:
        raise ValueError(f"blind must be None or one of {BLIND_CONTROLS}, got {blind!r}.")
    return inputs


@torch.inference_mode()
def evaluate(
    model,
    processor,
    loader: DataLoader,
    method: str,
    max_new_tokens: int = 3,
    latency_batches: int = 2,
    latency_repeats: int = 3,
    blind: str | None = None,
) -> EvaluationResult:
    """Evaluate `model` as it is (a pruner attached with atp.apply, or the stock model).

    loader: prompt-only batches from `LlavaConversationDataset(..., prompt_only=True)`;
    blind: "noise" or "blank" replaces every image (controls: how much of the accuracy needs the
    image; see `_model_inputs`).
    """
    device = next(model.parameters()).device
    pruned = getattr(model, "_atp_runtime", None) is not None
    tokenizer = processor.tokenizer
    config = model.config.text_config
    per_sample, flops, flops_unpruned, kv, kv_unpruned = [], 0.0, 0.0, 0.0, 0.0
    tower, tower_unpruned = 0.0, 0.0  # vision-tower FLOPs, never added to the LLM's
    per_layer = torch.zeros(config.num_hidden_layers, dtype=torch.float64)
    for batch in progress(loader, f"evaluating {method}", unit="batch"):
        inputs = _model_inputs(batch, device, processor, blind)
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if pruned:
            stats = atp.stats(model)
            report = cost_report(model.config, stats)
            if report.vision_flops is not None:
                tower += float(report.vision_flops.sum())
                tower_unpruned += float(report.vision_flops_unpruned.sum())
            flops += float(report.flops.sum())
            flops_unpruned += float(report.flops_unpruned.sum())
            kv += float(report.kv_bytes.sum())
            kv_unpruned += float(report.kv_bytes_unpruned.sum())
            average = stats.average_visual_tokens().tolist()
            at_input = stats.visual_tokens[:, 0].tolist()
            per_layer += stats.visual_tokens.double().sum(0).cpu()
        else:
            visual = get_adapter(model).visual_token_counts(inputs).tolist()  # newline tokens not counted
            average, at_input = [float(v) for v in visual], visual
            per_layer += float(sum(visual))
        for b, text in enumerate(texts):
            per_sample.append(
                {
                    "id": batch["id"][b],
                    "question_type": batch["question_type"][b],
                    "answer": batch["answer"][b],
                    "prediction": first_word(text),
                    "correct": first_word(text) == first_word(batch["answer"][b]),
                    "avg_visual_tokens": float(average[b]),
                    "input_visual_tokens": int(at_input[b]),
                    "num_objects": int(batch["num_objects"][b]),
                }
            )
    by_type: dict[str, list[bool]] = {}
    for sample in per_sample:
        by_type.setdefault(sample["question_type"], []).append(sample["correct"])
    objects = [s["num_objects"] for s in per_sample]
    latency = prefill_latency(model, loader, latency_batches, latency_repeats) if pruned else None
    result = EvaluationResult(
        method=method,
        accuracy=sum(s["correct"] for s in per_sample) / max(1, len(per_sample)),
        accuracy_by_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        avg_visual_tokens=statistics.fmean(s["avg_visual_tokens"] for s in per_sample),
        input_visual_tokens=statistics.fmean(s["input_visual_tokens"] for s in per_sample),
        flops_ratio=flops / flops_unpruned if pruned else 1.0,
        kv_ratio=kv / kv_unpruned if pruned else 1.0,
        latency_ratio=1.0 if not pruned else None,
        spearman_tokens_objects=spearman([s["avg_visual_tokens"] for s in per_sample], objects)
        if min(objects) >= 0
        else None,
        num_samples=len(per_sample),
        per_sample=per_sample,
        visual_tokens_per_layer=(per_layer / max(1, len(per_sample))).tolist(),
        vision_flops_ratio=tower / tower_unpruned if tower_unpruned else None,
    )
    if latency is not None:
        result.set_latency(latency)
    return result


def prefill_latency(model, loader: DataLoader, batches: int, repeats: int, warmup: int = 1) -> LatencyRatio | None:
    """Pruned / stock prefill time on the first `batches` batches, the two interleaved round by
    round (`atp.latency.interleaved_prefill_times`); None when `batches` or `repeats` is 0."""
    if batches < 1 or repeats < 1:
        return None
    runtime = atp.runtime_of(model)
    chosen = timing_batches(loader, next(model.parameters()).device, batches)
    contenders = [Contender("pruned", model, runtime.pruner, runtime.mode), Contender("stock", model, None)]
    times = interleaved_prefill_times(contenders, chosen, repeats=repeats, warmup=warmup)
    return latency_ratios(times, reference="stock")["pruned"]


def timing_batches(loader: DataLoader, device: torch.device, count: int) -> list[dict]:
    """The model inputs of the first `count` batches of `loader`, on `device` (for latency)."""
    return [_model_inputs(b, device, processor=None) for _, b in zip(range(count), loader)]


def latency_warnings(results: list[EvaluationResult]) -> list[str]:
    """One line per result whose measured latency ratio cannot be read (see `LatencyRatio.warning`)."""
    lines = []
    for r in results:
        warning = r.latency.warning() if r.latency is not None else None
        if warning:
            lines.append(f"warning: prefill latency of {r.method} ({r.latency}): {warning}")
    return lines


def markdown_table(results: list[EvaluationResult]) -> str:
    types = sorted({t for r in results for t in r.accuracy_by_type})
    header = [
        "method",
        "accuracy",
        *types,
        "avg visual tokens/layer",
        "visual tokens at LLM input",
        "FLOPs",
        "KV cache",
        "prefill latency",
        "Spearman(tokens, objects)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r.method, f"{100 * r.accuracy:.1f}"]
        cells += [f"{100 * r.accuracy_by_type[t]:.1f}" if t in r.accuracy_by_type else "-" for t in types]
        cells += [
            f"{r.avg_visual_tokens:.1f}",
            f"{r.input_visual_tokens:.1f}",
            f"{100 * r.flops_ratio:.1f} %"
            + ("" if r.vision_flops_ratio is None else f" (tower {100 * r.vision_flops_ratio:.1f} %)"),
            f"{100 * r.kv_ratio:.1f} %",
            _latency_cell(r),
            "-" if r.spearman_tokens_objects is None else f"{r.spearman_tokens_objects:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _latency_cell(r: EvaluationResult) -> str:
    if r.latency is not None:
        return str(r.latency)
    return "-" if r.latency_ratio is None else f"{r.latency_ratio:.2f}x"
