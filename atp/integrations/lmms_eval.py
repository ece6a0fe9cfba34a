"""lmms-eval model plugin: `lmms-eval --model atp --model_args pretrained=...,pruner=fastv,...`.

Registered through the entry-point group `lmms_eval.models` (pyproject.toml), which lmms-eval
0.7 reads when it builds its model registry (`ModelRegistryV2.load_entrypoint_manifests`); the
`lmms` extra installs lmms-eval. model_args: `atp.integrations.lmms_spec`.

- generate_until: batches of `batch_size` prompts (ragged: left-padded, the runtime drops each
  sample's own tokens), grouped by task and generation settings; greedy unless the task samples.
  Each prompt is the model's own chat template with one image part per visual (the processor
  expands the image tokens), the task's text after them.
- loglikelihood: the continuation's summed log-probability under the pruned prefill (the
  continuation is the answer part for the pruner, as in training) and whether greedy decoding
  would produce it.
- generate_until_multi_round: not supported (NotImplementedError names the reason).
- Accounting: per task, `atp.integrations.lmms_spec.TaskAccounting` over every prefill, and the
  prefill latency ratio pruned / stock measured on the task's first batches (`atp.latency`,
  interleaved rounds). Written when lmms-eval has run every request (`clean`, before it deletes
  the model) to `atp_accounting_<time>.json` and `atp_samples_<task>_<time>.jsonl` in
  `output_dir`, by default the folder where lmms-eval writes its results (`--output_path`
  joined with its model-name folder); also kept as `self.accounting`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

import atp
from atp.budget import budget_kwargs
from atp.data.processor import load_processor
from atp.export import load_export_pruner, read_export
from atp.integrations.lmms_spec import ModelSpec, TaskAccounting, parse_model_args, spec_record
from atp.latency import Contender, interleaved_prefill_times, latency_ratios
from atp.models import get_adapter
from atp.models.build import load_vlm, resolve_device
from atp.runtime.pruner import pruner_class

IMAGE_PLACEHOLDER = "<image>"


def manifest():
    """The entry point's payload: lmms-eval's `ModelManifest` for `--model atp`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="atp", simple_class_path="atp.integrations.lmms_eval.AtpLmms")


def architecture(config) -> dict:
    """The sizes an exported pruner depends on, from a VLM config (to tell one base model from another)."""
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    return {
        "model_type": config.model_type,
        "text_hidden_size": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "text_heads": text.num_attention_heads,
        "vocab_size": text.vocab_size,
        "vision_hidden_size": getattr(vision, "hidden_size", None),
        "image_token_id": getattr(config, "image_token_id", None),
    }


def check_export_base(export: str, model) -> None:
    """Refuse an export whose base model is not `model`'s architecture (when its base is on disk)."""
    from transformers import AutoConfig

    _, base = read_export(export)
    if not (base / "config.json").is_file():
        return  # the pruner's own checks (weights' shapes, depth) still apply
    expected, given = architecture(AutoConfig.from_pretrained(base)), architecture(model.config)
    if expected != given:
        differ = {k: (expected[k], given[k]) for k in expected if expected[k] != given[k]}
        raise ValueError(
            f"export {export} was made for another base model ({base}): (export's base, pretrained) differ in "
            f"{differ}. Give the pretrained= the export was trained on, or drop pretrained= to use the export's base."
        )


def build_spec_pruner(spec: ModelSpec, model) -> atp.TokenPruner | None:
    """The baseline pruner spec names, its budget arguments set for budget_tokens."""
    if spec.pruner is None:
        return None
    kwargs = dict(spec.pruner_kwargs)
    text = model.config.get_text_config()
    if spec.budget_tokens is not None:
        # the adapter's grid, not config.image_seq_length: LLaVA-NeXT's config carries one (576) that is
        # no image's count (anyres), InternVL's is per tile, not per image
        grid = get_adapter(model).fixed_grid
        if grid is None:
            raise ValueError(
                f"budget_tokens needs a fixed number of visual tokens per image; {type(model).__name__} has none "
                "(per-image grids). Give the pruner's own budget arguments instead (e.g. pruner.keep_ratio=0.25)."
            )
        num_visual = grid[0] * grid[1]
        kwargs.update(budget_kwargs(spec.pruner, spec.budget_tokens, num_visual, text.num_hidden_layers))
    if "num_layers" in inspect.signature(pruner_class(spec.pruner).__init__).parameters:
        kwargs.setdefault("num_layers", text.num_hidden_layers)
    return atp.build_pruner(spec.pruner, **kwargs)


def load_model(spec: ModelSpec):
    """(model with its pruner attached or the stock model, processor) for `spec`, on spec.device."""
    if spec.export and not spec.pretrained:
        model, processor = atp.load_pruned(spec.export, spec.mode, spec.dtype, spec.attn_implementation)
        if processor is None:
            raise ValueError(f"export {spec.export} holds no processor; give pretrained=<the base model directory>.")
        pruner = atp.runtime_of(model).pruner
    else:
        model, _ = load_vlm(spec.pretrained, spec.dtype, spec.attn_implementation, with_processor=False)
        get_adapter(model)  # an unsupported family stops here, naming the supported ones
        processor = load_processor(spec.pretrained)
        if spec.export:
            check_export_base(spec.export, model)
            pruner = load_export_pruner(spec.export)
        else:
            pruner = build_spec_pruner(spec, model)
        if pruner is not None:
            atp.apply(model, pruner.eval(), mode=spec.mode)
    device = resolve_device(spec.device)
    model.to(device).eval()
    if pruner is not None:
        pruner.to(device)  # the runtime holds the pruner outside the model's modules
    return model, processor


def cli_output_dir(argv: list[str]) -> Path | None:
    """Where lmms-eval's CLI writes this run's results: --output_path / <its model-name folder>."""
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lmms_eval.utils import sanitize_model_name

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", default=None)
    parser.add_argument("--model_args", default="")
    known, _ = parser.parse_known_args(argv)
    if not known.output_path:
        return None
    return Path(known.output_path) / sanitize_model_name(GeneralConfigTracker._get_model_name(known.model_args))


class AtpLmms(lmms):
    """Any VLM atp supports, with a pruner or an ATP export, as an lmms-eval model."""

    is_simple = True

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.spec = parse_model_args(kwargs)
        self.model, self.processor = load_model(self.spec)
        self.device = next(self.model.parameters()).device
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every prompt at the same column
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        runtime = getattr(self.model, "_atp_runtime", None)  # None: the stock model (as atp.evaluation reads it)
        self.pruner, self.mode = (runtime.pruner, runtime.mode) if runtime is not None else (None, None)
        self.adapter = get_adapter(self.model)
        self.text_config = self.model.config.get_text_config()
        self._accounts: dict[str, TaskAccounting] = {}
        self._timing: dict[str, list[dict]] = defaultdict(list)
        self.accounting: dict | None = None
        self.output_dir = Path(self.spec.output_dir) if self.spec.output_dir else cli_output_dir(sys.argv[1:])

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    # -- prompts ---------------------------------------------------------------------
    def _visuals(self, request: Instance) -> list[Image.Image]:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        flat = []
        for visual in visuals or []:
            if not isinstance(visual, Image.Image):
                raise ValueError(
                    f"task {task!r} gives a {type(visual).__name__} visual (doc {doc_id}); "
                    "the atp model takes images only."
                )
            flat.append(visual.convert("RGB"))
        return flat

    def _prompt(self, context: str, images: int) -> str:
        """The chat-template prompt: one image part per image, then the task's text."""
        text = context.replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in context else context
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict:
        kwargs = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        batch = self.processor(**kwargs)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # -- accounting ------------------------------------------------------------------
    def _account(self, task: str, inputs: dict, doc_ids: list) -> None:
        account = self._accounts.setdefault(task, TaskAccounting(self.text_config.num_hidden_layers))
        if self.pruner is not None:
            account.add_pruned(self.text_config, atp.stats(self.model), doc_ids)
        else:
            # as the runtime counts them: structural placeholders (LLaVA-NeXT's newlines) are no visual tokens
            account.add_unpruned(self.adapter.visual_token_counts(inputs), doc_ids)
        if len(self._timing[task]) < self.spec.latency_batches:
            self._timing[task].append({k: v for k, v in inputs.items() if k != "labels"})

    def _latency(self, task: str):
        batches = self._timing.get(task) or []
        if self.pruner is None or not batches or self.spec.latency_repeats < 1:
            return None
        contenders = [Contender("pruned", self.model, self.pruner, self.mode), Contender("stock", self.model, None)]
        times = interleaved_prefill_times(contenders, batches, repeats=self.spec.latency_repeats)
        return latency_ratios(times, reference="stock")["pruned"]

    def finish_accounting(self) -> dict:
        """Every task's accounting (latency measured now), written to output_dir; idempotent."""
        if self.accounting is not None:
            return self.accounting
        tasks = {task: account.summary(self._latency(task)) for task, account in self._accounts.items()}
        self.accounting = {"atp": spec_record(self.spec), "tasks": tasks}
        if self.output_dir is not None and tasks:
            stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime())
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / f"atp_accounting_{stamp}.json"
            path.write_text(json.dumps(self.accounting, indent=1))
            for task, account in self._accounts.items():
                lines = "".join(json.dumps(sample) + "\n" for sample in account.samples)
                (self.output_dir / f"atp_samples_{task}_{stamp}.jsonl").write_text(lines)
            logger.info(f"atp accounting written to {path}")
        elif tasks:
            logger.warning("atp accounting not written: give --output_path or model_args output_dir=<dir>.")
        return self.accounting

    def clean(self):
        """lmms-eval calls this once every request has run, then deletes the model: account first."""
        if getattr(self, "model", None) is not None:
            self.finish_accounting()
        super().clean()

    # -- requests --------------------------------------------------------------------
    def _batches(self, requests: list[Instance], by_settings: bool = True):
        """Indices of `requests` in batches of batch_size, grouped by task (and generation settings)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            settings = request.args[1] if by_settings else None
            key = json.dumps(settings, sort_keys=True, default=str) if isinstance(settings, dict) else repr(settings)
            groups[(request.args[4], key)].append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        for chunk in self._batches(requests):
            batch = [requests[i] for i in chunk]
            settings = dict(batch[0].args[1] or {})
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            texts, images = [], []
            for request in batch:
                visuals = self._visuals(request)
                texts.append(self._prompt(request.args[0], len(visuals)))
                images += visuals
            inputs = self._inputs(texts, images)
            temperature = float(settings.get("temperature", 0) or 0)
            sample = bool(settings.get("do_sample", False)) and temperature > 0
            generated = self.model.generate(
                **inputs,
                max_new_tokens=int(settings.get("max_new_tokens", self.spec.max_new_tokens)),
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=settings.get("top_p") if sample else None,
                num_beams=int(settings.get("num_beams", 1) or 1),
                pad_token_id=self.tokenizer.pad_token_id,
            )
            self._account(batch[0].args[4], inputs, [r.args[3] for r in batch])
            decoded = self.tokenizer.batch_decode(
                generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for index, text in zip(chunk, decoded):
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                answers[index] = text
                self.cache_hook.add_partial("generate_until", (requests[index].args[0], settings), text)
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for chunk in self._batches(requests, by_settings=False):
            batch = [requests[i] for i in chunk]
            prompts, full, images = [], [], []
            for request in batch:
                context, target, _, doc_id, task, split = request.args
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                visuals = self._visuals(request)
                prompt = self._prompt(context, len(visuals))
                prompts.append(prompt)
                full.append(prompt + continuation)
                images += visuals
            inputs = self._inputs(full, images)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            lengths = mask.sum(1)
            prompt_lengths = self._inputs(prompts, images)["attention_mask"].sum(1)
            labels = torch.full_like(ids, -100)
            for b in range(len(batch)):
                start = ids.shape[1] - int(lengths[b]) + int(prompt_lengths[b])  # left-padded
                labels[b, start:] = ids[b, start:]
            if bool((labels == -100).all(1).any()):
                raise ValueError(
                    "a loglikelihood continuation is empty after tokenisation; the task's target is blank."
                )
            logits = self.model(**inputs, labels=labels).logits.float()
            log_probs = logits[:, :-1].log_softmax(-1)
            target_ids, scored = ids[:, 1:], labels[:, 1:] != -100
            token_log_probs = log_probs.gather(-1, target_ids[..., None])[..., 0]
            greedy = log_probs.argmax(-1) == target_ids
            self._account(batch[0].args[4], inputs, [r.args[3] for r in batch])
            for b, index in enumerate(chunk):
                total = float(token_log_probs[b][scored[b]].sum())
                results[index] = (total, bool(greedy[b][scored[b]].all()))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "the atp model does not run multi-round tasks: each round would be a new prefill whose pruning "
            "depends on the previous rounds' answers, which atp's accounting and runtime do not define yet."
        )
