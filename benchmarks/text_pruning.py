"""Text benchmark: KV-cache policies on a causal LM (SmolLM2-135M-Instruct by default) with the pydoc corpus.

Protocol. Held-out pydoc topics (the test split of `atp.data.text.topic_splits`, never trained on by
any atp job) are cut into `--sequences` chunks of `--prompt` + `--continuation` + 1 tokens. For each
method row, one batch: the prompt is prefilled into the row's cache, then the true continuation is
fed one token per forward (teacher forcing: each forward is a decode step, with the cache the method
left), and each decode step's logits predict the next true token. Metrics over those `--continuation`
predictions per sequence: perplexity, next-token accuracy (argmax = the true token), agreement with
the full cache's argmax, and the KV-cache size (entries per layer, mean over layers and decode steps,
and the largest any layer held; an evicting policy never holds more than its budget, checked).

Timing, in the same process with interleaved repeats (every round runs every row once, the first round
warms up): batch 1, the first sequence's prompt; time to first token = the prefill forward with the
row's cache and the argmax of its last logits; decode = the median time of one greedy decode step over
`--timing-steps` steps. Ratios are against the full cache (median over rounds), by the wall clock and by
this process's CPU clock (on shared cores the wall clock also counts the time other processes hold them; run
with OMP_NUM_THREADS=1 so CPU time is the work done).

Rows are a small table of callables (`Method`): each opens a context manager that yields the cache a
forward runs with and removes whatever it put on the model when it closes. LazyLLM (prompt-token pruning
during prefill, `--lazy-layers` / `--lazy-ratios`, revival on and off) joins as rows whose context applies it
with `atp.apply` (drop mode) and yields a `DynamicCache`; the teacher-forced steps are then the runtime's
decode steps (with revival, `atp.runtime.revival`: re-selection and revived rows). Its prefill FLOPs are
`cost_report`'s analytic ratio over the prefill's tokens per layer (`atp.stats`; the cache policies run every
token: 100 %); its KV entries per sample and layer come from the revival runtime (`cache_tokens()`) or,
without revival, the prefill's tokens per layer plus the decoded ones; "decode rows/layer" is the tokens each
layer ran per decode step (1: the new token; revival adds the revived ones).

    python benchmarks/text_pruning.py                     # SmolLM2 (converted once from the GGUF of `make smollm2`)
    python benchmarks/text_pruning.py --smoke             # a tiny random Llama and a pydoc BPE tokenizer (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn
from transformers import DynamicCache

import atp
from atp.data.text import token_chunks, topic_splits, train_tokenizer
from atp.metrics.accounting import cost_report
from atp.models.causal import convert_gguf, load_causal_lm, smollm2_gguf_path, tiny_causal_lm
from atp.models.hf_compat import cache_kwargs
from atp.progress import progress
from atp.runtime.kv_cache import build_kv_cache

COLUMNS = (
    "method",
    "settings",
    "prefill FLOPs",
    "KV entries/layer",
    "of full",
    "max entries",
    "decode rows/layer",
    "perplexity",
    "next-token acc",
    "agrees with full",
    "TTFT",
    "decode/token",
)


def cache_entries(cache) -> list[int]:
    """Entries each layer of the cache holds now (any transformers cache of DynamicLayer-like layers)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def cached_entries(model: nn.Module, cache, decoded: int, batch: int) -> torch.Tensor:
    """[B, L] entries each layer's cache holds for each sample (a cache policy: the same for every sample)."""
    return torch.tensor(cache_entries(cache), dtype=torch.float64).expand(batch, -1)


@dataclass(frozen=True)
class Method:
    """One row: `open(model)` is a context manager yielding the cache to prefill and decode with.

    entries(model, cache, decoded, batch): [B, L] KV entries each layer holds after `decoded` decode steps;
    prefill_flops(model): the last prefill's analytic FLOPs over the unpruned prefill's (None: every token runs);
    decode_rows(model): [B, L] tokens each layer ran in the last decode step (None: the one new token)."""

    name: str
    settings: str
    open: Callable[[nn.Module], ContextManager]
    budget: int | None = None  # entries per layer an evicting policy may hold (checked)
    entries: Callable[[nn.Module, object, int, int], torch.Tensor] = cached_entries
    prefill_flops: Callable[[nn.Module], float] | None = None
    decode_rows: Callable[[nn.Module], torch.Tensor] | None = None


def full_cache(model: nn.Module) -> ContextManager:
    return contextlib.nullcontext(DynamicCache())


@contextlib.contextmanager
def lazyllm_cache(model: nn.Module, **settings):
    """LazyLLM attached to the model (drop mode) for the row's forwards, removed when the row closes."""
    atp.apply(model, atp.build_pruner("lazyllm", **settings), mode="drop")
    try:
        yield DynamicCache()
    finally:
        atp.remove(model)


def lazyllm_entries(model: nn.Module, cache, decoded: int, batch: int) -> torch.Tensor:
    """[B, L] KV entries per sample and layer: with revival the runtime's count (what each layer computed,
    revived tokens included); static pruning holds the prefill's tokens per layer plus the decoded ones."""
    revival = atp.runtime_of(model).revival
    if revival is not None:
        return revival.cache_tokens().double()
    return atp.stats(model).tokens.double() + decoded


def lazyllm_flops(model: nn.Module) -> float:
    return cost_report(model.config, atp.stats(model)).flops_ratio


def lazyllm_decode_rows(model: nn.Module) -> torch.Tensor | None:
    revival = atp.runtime_of(model).revival
    return None if revival is None else revival.computed[-1].double()


def lazyllm_rows(args: argparse.Namespace) -> list[Method]:
    """LazyLLM per keep ratio (the same at every pruning layer), with and without revival."""
    rows = []
    layers = "/".join(map(str, args.lazy_layers))
    for ratio in args.lazy_ratios:
        for revival in (True, False):
            settings = dict(layers=args.lazy_layers, keep_ratios=[ratio] * len(args.lazy_layers), revival=revival)
            rows.append(
                Method(
                    "lazyllm",
                    f"layers {layers}, keep {ratio} each, revival {'on' if revival else 'off'}",
                    lambda model, s=settings: lazyllm_cache(model, **s),
                    entries=lazyllm_entries,
                    prefill_flops=lazyllm_flops,
                    decode_rows=lazyllm_decode_rows,
                )
            )
    return rows


def method_rows(args: argparse.Namespace) -> list[Method]:
    """The full cache, then per budget: A2SF at each forgetting factor and the StreamingLLM-style window; then
    LazyLLM (`lazyllm_rows`)."""
    rows = [Method("full", "every entry", full_cache)]
    for budget in args.budgets:
        recent = round(budget * args.recent_ratio)
        for alpha in args.alphas:
            settings = dict(budget=budget, forgetting_factor=alpha, recent=recent)
            rows.append(
                Method(
                    "a2sf",
                    f"budget {budget}, alpha {alpha}, recent {recent}",
                    lambda model, s=settings: build_kv_cache("a2sf", model, **s),
                    budget,
                )
            )
        if args.sinks < budget:
            settings = dict(budget=budget, sinks=args.sinks)
            rows.append(
                Method(
                    "streaming",
                    f"budget {budget}, sinks {args.sinks}",
                    lambda model, s=settings: build_kv_cache("streaming", model, **s),
                    budget,
                )
            )
    return rows + lazyllm_rows(args)


@torch.no_grad()
def continuation_scores(model: nn.Module, method: Method, sequences: torch.Tensor, prompt: int) -> dict:
    """Teacher-forced decode of sequences [N, prompt + C + 1] with the row's cache.

    Returns log-probabilities of the true tokens [N, C], argmax predictions [N, C], the entries per sample
    and layer after every decode step [C, N, L], the tokens each layer ran per decode step [C, N, L] and
    the prefill's FLOPs over the unpruned prefill's."""
    batch, steps = sequences.shape[0], sequences.shape[1] - prompt - 1
    logprobs, predictions, sizes, rows = [], [], [], []
    with method.open(model) as cache:
        model(input_ids=sequences[:, :prompt], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        flops = 1.0 if method.prefill_flops is None else method.prefill_flops(model)
        for t in range(steps):
            position = prompt + t
            logits = model(
                input_ids=sequences[:, position : position + 1], **cache_kwargs(cache), use_cache=True
            ).logits[:, -1]
            target = sequences[:, position + 1]
            logprobs.append(torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None])[:, 0])
            predictions.append(logits.argmax(-1))
            sizes.append(method.entries(model, cache, t + 1, batch))
            ran = None if method.decode_rows is None else method.decode_rows(model)
            rows.append(torch.ones_like(sizes[-1]) if ran is None else ran)
    return dict(
        logprobs=torch.stack(logprobs, 1),
        predictions=torch.stack(predictions, 1),
        sizes=torch.stack(sizes),
        rows=torch.stack(rows),
        flops=flops,
    )


def clocks() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on shared cores the CPU clock does not count the time other
    processes hold the cores (with one thread, CPU time is the work done)."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


@torch.no_grad()
def time_once(model: nn.Module, method: Method, ids: torch.Tensor, steps: int) -> tuple[float, float, float, float]:
    """(wall, CPU) seconds to the first token, then (wall, CPU) median seconds per greedy decode step; ids [1, P]."""
    with method.open(model) as cache:
        start = clocks()
        logits = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        first = since(start)
        step_times = []
        for _ in range(steps):
            start = clocks()
            logits = model(input_ids=token, **cache_kwargs(cache), use_cache=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            step_times.append(since(start))
    return (*first, statistics.median(t[0] for t in step_times), statistics.median(t[1] for t in step_times))


def timing(model: nn.Module, methods: list[Method], ids: torch.Tensor, steps: int, repeats: int) -> dict:
    """{row index: {"ttft", "decode", "ttft_cpu", "decode_cpu": ratio against row 0 (the full cache); "ttft_s",
    "decode_s": wall seconds}}, medians over interleaved rounds after one warm-up round."""
    times = {i: [] for i in range(len(methods))}
    for round_ in progress(range(repeats + 1), "timing rounds", unit="round"):
        for i, method in enumerate(methods):
            measured = time_once(model, method, ids, steps)
            if round_ > 0:
                times[i].append(measured)
    out = {}
    for i in times:
        ratios = [[t / f for t, f in zip(row, full)] for row, full in zip(times[i], times[0])]
        out[i] = dict(
            ttft=statistics.median(r[0] for r in ratios),
            ttft_cpu=statistics.median(r[1] for r in ratios),
            decode=statistics.median(r[2] for r in ratios),
            decode_cpu=statistics.median(r[3] for r in ratios),
            ttft_s=statistics.median(t[0] for t in times[i]),
            decode_s=statistics.median(t[2] for t in times[i]),
        )
    return out


def evaluate_rows(model: nn.Module, methods: list[Method], sequences: torch.Tensor, prompt: int) -> list[dict]:
    """Per row: perplexity, accuracy, agreement with row 0 (the full cache), cache sizes (budgets checked)."""
    results, reference = [], None
    for method in progress(methods, "text rows", unit="row"):
        scores = continuation_scores(model, method, sequences, prompt)
        targets = sequences[:, prompt + 1 :]
        if reference is None:
            reference = scores["predictions"]
        sizes = scores["sizes"]  # [C, N, layers]
        largest = int(sizes.max())
        if method.budget is not None and largest > method.budget:
            raise RuntimeError(
                f"{method.name} ({method.settings}) held {largest} entries in a layer, "
                f"over its budget of {method.budget}."
            )
        results.append(
            dict(
                perplexity=math.exp(-float(scores["logprobs"].double().mean())),
                accuracy=float((scores["predictions"] == targets).double().mean()),
                agreement=float((scores["predictions"] == reference).double().mean()),
                entries=float(sizes.mean()),
                largest=largest,
                prefill_flops=scores["flops"],
                decode_rows=float(scores["rows"].mean()),
            )
        )
        print(
            f"{method.name} ({method.settings}): " + ", ".join(f"{k} {v:.4g}" for k, v in results[-1].items()),
            flush=True,
        )
    return results


def table(methods: list[Method], results: list[dict], timings: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    full_entries = results[0]["entries"]
    for i, (method, result) in enumerate(zip(methods, results)):
        t = timings[i]
        cells = [
            method.name,
            method.settings,
            f"{result['prefill_flops']:.1%}",
            f"{result['entries']:.1f}",
            f"{result['entries'] / full_entries:.1%}",
            str(result["largest"]),
            f"{result['decode_rows']:.2f}",
            f"{result['perplexity']:.3f}",
            f"{result['accuracy']:.1%}",
            f"{result['agreement']:.1%}",
            f"{t['ttft']:.2f}x ({t['ttft_s'] * 1e3:.0f} ms; CPU {t['ttft_cpu']:.2f}x)",
            f"{t['decode']:.2f}x ({t['decode_s'] * 1e3:.1f} ms; CPU {t['decode_cpu']:.2f}x)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load(args: argparse.Namespace):
    """(model, tokenizer): SmolLM2 (converted from its GGUF once) or, with --smoke, a tiny random Llama."""
    if args.smoke:
        torch.manual_seed(0)
        tokenizer = train_tokenizer(topic_splits(args.split_seed)["train"], 512)
        model = tiny_causal_lm("llama", num_layers=2, initializer_range=0.3, attn_implementation=args.attn)
        return model.eval(), tokenizer
    if not Path(args.model, "config.json").is_file():
        convert_gguf(smollm2_gguf_path(), args.model)
    model, tokenizer = load_causal_lm(args.model, dtype=args.dtype)
    model.set_attn_implementation(args.attn)
    return model.eval(), tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="checkpoints/smollm2-135m-instruct", help="HF dir (from the GGUF if missing)"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, short sequences, one timing round")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--sequences", type=int, default=4, help="held-out chunks scored per row (one batch)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefilled)")
    parser.add_argument("--continuation", type=int, default=16, help="decode steps scored per sequence")
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64], help="KV entries per layer and head")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0], help="A2SF forgetting factors")
    parser.add_argument("--recent-ratio", type=float, default=0.125, help="A2SF recent window, share of the budget")
    parser.add_argument("--sinks", type=int, default=4, help="the streaming baseline's sink tokens")
    parser.add_argument("--lazy-layers", type=int, nargs="+", default=[8, 16, 24], help="LazyLLM's pruning layers")
    parser.add_argument(
        "--lazy-ratios", type=float, nargs="+", default=[0.5, 0.7], help="LazyLLM keep ratios (each pruning layer)"
    )
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timing rounds after the warm-up round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sequences, args.prompt, args.continuation = 3, 40, 8
        args.budgets, args.timing_steps, args.repeats = [8, 16], 4, 1
        args.lazy_layers = [1]  # the tiny Llama has 2 layers
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    model, tokenizer = load(args)
    length = args.prompt + args.continuation + 1
    sequences = token_chunks(topic_splits(args.split_seed)["test"], tokenizer, length, args.sequences)
    if len(sequences) < args.sequences:
        raise SystemExit(f"the test topics hold {len(sequences)} chunks of {length} tokens; lower --sequences.")
    methods = method_rows(args)
    started = time.perf_counter()
    results = evaluate_rows(model, methods, sequences, args.prompt)
    scored = time.perf_counter() - started
    timings = timing(model, methods, sequences[:1, : args.prompt], args.timing_steps, args.repeats)
    text = (
        f"Settings: {'tiny random Llama (smoke)' if args.smoke else args.model} ({args.dtype}, {args.attn}); "
        f"{len(sequences)} held-out pydoc chunks (test topics, split seed {args.split_seed}) of {args.prompt} prompt "
        f"tokens + {args.continuation} teacher-forced decode steps; A2SF recent = {args.recent_ratio} of the budget; "
        f"timing: batch 1, {args.timing_steps} decode steps, median of {args.repeats} interleaved rounds after a "
        f"warm-up; threads {torch.get_num_threads()}; scoring {scored:.0f} s.\n\n" + table(methods, results, timings)
    )
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
