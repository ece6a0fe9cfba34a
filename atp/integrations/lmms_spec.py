"""The lmms-eval plugin's pure parts: its model_args and its per-task accounting.

Nothing here imports lmms-eval, so the unit tests run without the `lmms` extra.

model_args (lmms-eval's `--model_args a=1,b=2`; the CLI adds batch_size and device):

    pretrained=<dir>          a `save_pretrained` VLM directory of any family atp supports
    export=<dir>              an ATP export (`atp.save_pruned`): its pruner, and its base model unless
                              pretrained= is also given (then the export must be for that base)
    pruner=<name>             a registered pruner (`atp.available_pruners()`), with
    pruner.<arg>=<value>      its constructor arguments (lists as [1,3]), or
    budget_tokens=<n>         the budget arguments for n retained visual tokens (`atp.budget`); families
                              with one grid per image only (LLaVA-1.5), refused where images have their own counts
    mode=drop|mask, dtype=float32|bfloat16|float16, device=auto|cpu|cuda:0, attn_implementation=sdpa|eager
    batch_size=<n>            prompts per generate call (ragged prompts are left-padded)
    max_new_tokens=<n>        default when the task does not set it (lmms-eval's tasks do)
    latency_batches=<n>, latency_repeats=<n>   the measured prefill latency (0 batches: not measured)
    output_dir=<dir>          where the accounting is written (default: beside lmms-eval's results)
    method_name=<label>       the row label in the suite's table
"""

from __future__ import annotations

import ast
import inspect
import statistics
from dataclasses import asdict, dataclass, field

import torch

from atp.latency import LatencyRatio
from atp.metrics.accounting import cost_report
from atp.runtime.pruner import pruner_class
from atp.runtime.stats import PruningStats

MODES = ("drop", "mask")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager")
PRUNER_PREFIX = "pruner."
SETTINGS = (
    "pretrained",
    "export",
    "pruner",
    "budget_tokens",
    "mode",
    "dtype",
    "device",
    "attn_implementation",
    "batch_size",
    "max_batch_size",
    "max_new_tokens",
    "latency_batches",
    "latency_repeats",
    "output_dir",
    "method_name",
)


@dataclass
class ModelSpec:
    """What the plugin loads and how it runs, parsed from lmms-eval's model_args."""

    pretrained: str | None = None
    export: str | None = None
    pruner: str | None = None
    pruner_kwargs: dict = field(default_factory=dict)
    budget_tokens: int | None = None
    mode: str = "drop"
    dtype: str = "float32"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    batch_size: int = 1
    max_new_tokens: int = 32
    latency_batches: int = 2
    latency_repeats: int = 3
    output_dir: str | None = None
    method_name: str | None = None

    def label(self) -> str:
        """The method's name in tables: method_name, else the pruner and its settings."""
        if self.method_name:
            return self.method_name
        if self.export:
            return f"export ({self.export.rstrip('/').rsplit('/', 1)[-1]})"
        if self.pruner is None:
            return "unpruned"
        if self.budget_tokens is not None:
            return f"{self.pruner} @ {self.budget_tokens} tokens"
        settings = ", ".join(f"{k}={v}" for k, v in self.pruner_kwargs.items())
        return f"{self.pruner} ({settings})" if settings else self.pruner


def _value(raw):
    """A model_args value: lmms-eval already turned numbers and booleans into Python values;
    lists, dicts and None arrive as text ("[1,3]", "None")."""
    if isinstance(raw, str) and (raw[:1] in ("[", "(", "{") or raw in ("None", "null")):
        try:
            return ast.literal_eval(raw) if raw != "null" else None
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"cannot read the model_args value {raw!r} ({error}); write lists as [1,3].") from error
    return raw


def _positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 0 or (number == 0 and name in ("batch_size", "max_new_tokens")):
        raise ValueError(f"model_args {name}={value!r} must be a positive integer.")
    return number


def parse_model_args(kwargs: dict) -> ModelSpec:
    """A `ModelSpec` from the keyword arguments lmms-eval hands the model class; a clear error
    naming the key and the fix for anything it cannot run."""
    spec = ModelSpec()
    pruner_kwargs = {}
    for key, raw in kwargs.items():
        value = _value(raw)
        if key.startswith(PRUNER_PREFIX):
            pruner_kwargs[key[len(PRUNER_PREFIX) :]] = value
        elif key not in SETTINGS:
            raise ValueError(
                f"the atp model has no model_args key {key!r}. Keys: {', '.join(SETTINGS)}, and "
                f"{PRUNER_PREFIX}<argument> for the pruner's arguments (e.g. pruner=fastv,pruner.layer=2)."
            )
        elif value is not None and key != "max_batch_size":
            setattr(spec, key, value)
    for key in ("batch_size", "max_new_tokens", "latency_batches", "latency_repeats"):
        setattr(spec, key, _positive_int(key, getattr(spec, key)))
    if spec.budget_tokens is not None:
        spec.budget_tokens = _positive_int("budget_tokens", spec.budget_tokens)
    for key, allowed in (("mode", MODES), ("dtype", DTYPES), ("attn_implementation", ATTENTION)):
        if getattr(spec, key) not in allowed:
            raise ValueError(f"model_args {key}={getattr(spec, key)!r} is not one of {allowed}.")
    if not spec.pretrained and not spec.export:
        raise ValueError(
            "the atp model needs a model: model_args pretrained=<save_pretrained directory> (with pruner=<name> "
            "for a baseline) or export=<atp export directory> (a trained ATP pruner and its base model)."
        )
    for key in ("pretrained", "export"):
        if getattr(spec, key) is not None:
            setattr(spec, key, str(getattr(spec, key)))
    if spec.export and (spec.pruner or pruner_kwargs or spec.budget_tokens is not None):
        raise ValueError(
            "model_args export= brings its own pruner: drop pruner=, pruner.<arg>= and budget_tokens= "
            "(or drop export= to evaluate a baseline pruner on pretrained=)."
        )
    if spec.pruner is None and (pruner_kwargs or spec.budget_tokens is not None):
        raise ValueError("model_args pruner.<arg>= and budget_tokens= need pruner=<name> (atp.available_pruners()).")
    if spec.pruner is not None:
        cls = pruner_class(str(spec.pruner))  # unknown name: a clear error listing the pruners
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(pruner_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"pruner {spec.pruner!r} has no argument(s) {unknown}; it accepts {accepted}.")
    spec.pruner_kwargs = pruner_kwargs
    return spec


@dataclass
class TaskAccounting:
    """The project's accounting of one task's prefills, accumulated batch by batch.

    Per sample: the mean over decoder layers of the visual tokens it kept (`PruningStats.
    average_visual_tokens`) and its visual tokens at the LLM input; summed: analytic prefill FLOPs
    and KV-cache bytes, pruned and unpruned (`atp.metrics.cost_report`), and visual tokens per
    layer. An unpruned model counts its image tokens in every layer (FLOPs and KV ratios 1).
    """

    num_layers: int
    samples: list[dict] = field(default_factory=list)
    flops: float = 0.0
    flops_unpruned: float = 0.0
    kv: float = 0.0
    kv_unpruned: float = 0.0
    per_layer: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.per_layer:
            self.per_layer = [0.0] * self.num_layers

    def add_pruned(self, text_config, stats: PruningStats, doc_ids: list) -> None:
        """One batch's prefill as `atp.stats(model)` recorded it; doc_ids: the batch's samples in order."""
        if stats.visual_tokens.shape != (len(doc_ids), self.num_layers):
            raise ValueError(
                f"the prefill statistics cover {tuple(stats.visual_tokens.shape)} (samples, layers), the batch "
                f"has {len(doc_ids)} samples on {self.num_layers} layers: atp.stats is from another call."
            )
        report = cost_report(text_config, stats)
        self.flops += float(report.flops.sum())
        self.flops_unpruned += float(report.flops_unpruned.sum())
        self.kv += float(report.kv_bytes.sum())
        self.kv_unpruned += float(report.kv_bytes_unpruned.sum())
        layer_sums = stats.visual_tokens.double().sum(0).tolist()
        self.per_layer = [a + b for a, b in zip(self.per_layer, layer_sums)]
        average, at_input = stats.average_visual_tokens().tolist(), stats.visual_tokens[:, 0].tolist()
        for doc_id, avg, first in zip(doc_ids, average, at_input):
            self.samples.append({"doc_id": doc_id, "avg_visual_tokens": float(avg), "input_visual_tokens": int(first)})

    def add_unpruned(self, visual_counts: torch.Tensor | list[int], doc_ids: list) -> None:
        """One batch of the stock model: visual_counts [B] image tokens per sample (all layers see them)."""
        counts = [int(c) for c in torch.as_tensor(visual_counts).tolist()]
        self.per_layer = [value + sum(counts) for value in self.per_layer]
        for doc_id, count in zip(doc_ids, counts):
            self.samples.append({"doc_id": doc_id, "avg_visual_tokens": float(count), "input_visual_tokens": count})

    @property
    def pruned(self) -> bool:
        return self.flops_unpruned > 0

    def summary(self, latency: LatencyRatio | None) -> dict:
        """The task's accounting, named as `atp.evaluation.EvaluationResult` names it."""
        count = len(self.samples)
        if count == 0:
            raise ValueError("no samples were accounted for this task.")
        result = {
            "num_samples": count,
            "avg_visual_tokens": statistics.fmean(s["avg_visual_tokens"] for s in self.samples),
            "input_visual_tokens": statistics.fmean(s["input_visual_tokens"] for s in self.samples),
            "flops_ratio": self.flops / self.flops_unpruned if self.pruned else 1.0,
            "kv_ratio": self.kv / self.kv_unpruned if self.pruned else 1.0,
            "visual_tokens_per_layer": [value / count for value in self.per_layer],
            "latency_ratio": None if self.pruned else 1.0,
            "latency_low": None,
            "latency_high": None,
            "latency_rounds": 0,
        }
        if latency is not None:
            result.update(
                latency_ratio=latency.median,
                latency_low=latency.low,
                latency_high=latency.high,
                latency_rounds=latency.rounds,
            )
        return result


def spec_record(spec: ModelSpec) -> dict:
    """The spec as written into the accounting file (what ran)."""
    return {**asdict(spec), "method": spec.label()}
