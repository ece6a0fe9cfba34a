"""ATP structural pruning against two-stage baselines on a causal LM (SmolLM2-135M by default).

For every pruned ratio, method and seed: LoRA fine-tuning on the pydoc-topics training split
with the same rank and number of LoRA steps for every method (ATP: its generator searches in
the first `--control-epochs` of `--epochs` epochs, then its mask is frozen; baselines: the
method's mask fixed from the start, scored on `--calibration-chunks` training chunks), export
to a smaller `from_pretrained` checkpoint, then: domain perplexity on held-out pydoc topics
(the val and test splits: never trained on; `--eval-tokens`, default 20480), general-text
perplexity (Python's LICENSE.txt, not seen in training), decoder parameters (every method
within 1 % of the budget, checked), and the exported model's forward latency against the dense
model (median of interleaved repeats, same process). The table gives mean and spread (sample
standard deviation) over `--seeds`; the data split is fixed (`--split-seed`), the seed changes
LoRA's initialisation, the generator and its noise, the random baseline and the data order.

    python benchmarks/structural.py --model checkpoints/smollm2-135m-instruct --seeds 0 1 2
    python benchmarks/structural.py --tiny --steps 4 --epochs 2 --control-epochs 1 --eval-tokens 2048  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import shutil
import statistics
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from transformers import AutoModelForCausalLM

import atp  # noqa: F401  (registers the exported model classes)
from atp.data.text import TextDataModule, token_chunks, topic_splits, train_tokenizer
from atp.lit.structural import StructuralPruningModule
from atp.models.causal import convert_gguf, load_causal_lm, smollm2_gguf_path, tiny_causal_lm
from atp.progress import progress
from atp.structural import decoder_parameters
from atp.structural.baselines import METHODS, allocate, baseline_scores

ALL_METHODS = ("atp", *METHODS)


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, batch_size: int, bf16: bool = False) -> float:
    """exp of the mean next-token loss over `chunks` [N, T] (every chunk weighs the same);
    `bf16`: under CPU bfloat16 autocast."""
    losses = []
    for start in progress(range(0, len(chunks), batch_size), "perplexity", unit="batch"):
        ids = chunks[start : start + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses.append(float(model(input_ids=ids, labels=ids).loss) * len(ids))
    return math.exp(sum(losses) / len(chunks))


@torch.no_grad()
def latency_ratio(pruned, dense, ids: torch.Tensor, repeats: int) -> float:
    times = {"pruned": [], "dense": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, model in (("pruned", pruned), ("dense", dense)):
            start = time.perf_counter()
            model(input_ids=ids)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["pruned"][1:]) / statistics.median(times["dense"][1:])


def load_model(args):
    """(model, tokenizer): the HF directory `--model`, or with --tiny a seeded tiny Llama and a pydoc BPE tokenizer."""
    if args.tiny:
        torch.manual_seed(0)
        tokenizer = train_tokenizer(topic_splits(args.split_seed)["train"], 512)
        return tiny_causal_lm("llama", vocab_size=512, hidden_size=64, num_layers=2).eval(), tokenizer
    return load_causal_lm(args.model)


def fixed_mask(args, dense, method: str, ratio: float, seed: int, datamodule, scores: dict):
    """A baseline's mask at `ratio` (None for ATP). Scores do not depend on the ratio, and only
    `random`'s on the seed: each method calibrates once on the dense model, for every ratio and seed."""
    if method == "atp":
        return None
    key = (method, seed if method == "random" else None)
    if key not in scores:
        chunks = datamodule.chunks["train"][: args.calibration_chunks]
        calibration = [{"input_ids": chunks[i : i + 8]} for i in range(0, len(chunks), 8)]
        scores[key] = baseline_scores(dense, method, calibration, seed=seed)
    return allocate(scores[key], method, dense.config, ratio)


def run_method(args, dense, method: str, ratio: float, seed: int, datamodule, export_dir: Path, scores: dict) -> dict:
    started = time.perf_counter()
    fixed = fixed_mask(args, dense, method, ratio, seed, datamodule, scores)
    scoring = time.perf_counter() - started
    torch.manual_seed(seed)
    module = StructuralPruningModule(
        copy.deepcopy(dense),
        prune_ratio=ratio,
        control_epochs=args.control_epochs,
        generator_lr=args.generator_lr,
        alpha=args.alpha,
        lora_lr=args.lora_lr,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        lasso_eta=args.lasso_eta,
        noise=args.noise,
        seed=seed,
        fixed_mask=fixed,
    )
    datamodule.seed = seed  # the data order
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        precision="bf16-mixed" if args.bf16 else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - started
    keep = float(module.keep_ratio(module.current_mask()))
    if abs(keep / (1 - ratio) - 1) > 0.01:
        raise RuntimeError(
            f"{method} at {ratio:.0%} keeps {keep:.3%} of the decoder, not within 1 % of {1 - ratio:.0%}."
        )
    search = module.search_log
    started = time.perf_counter()
    module.export(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    return {
        "model": model,
        "keep": keep,
        "train_s": seconds,
        "score_s": scoring,
        "export_s": time.perf_counter() - started,
        "lora_steps": int(module.lora_steps),
        "generator_steps": int(module.generator_steps),
        "live_share": (search[0]["generator/live_share"], search[-1]["generator/live_share"]) if search else None,
        "sampled_keep": (search[0]["generator/keep_ratio"], search[-1]["generator/keep_ratio"]) if search else None,
        "keep_curve": search_curve(search, "generator/keep_ratio"),
        "live_curve": search_curve(search, "generator/live_share"),
    }


def search_curve(search: list[dict], key: str, points: int = 6) -> str | None:
    """`key` at about `points` generator steps spread over the search (first and last included), as
    "step:value" pairs: where the search moved and where it stopped."""
    if not search:
        return None
    picks = sorted({round(i * (len(search) - 1) / (points - 1)) for i in range(points)})
    return " ".join(f"{search[i]['step']}:{search[i][key]:.3f}" for i in picks)


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="checkpoints/smollm2-135m-instruct", help="HF dir (converted from GGUF if missing)"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model (smoke runs)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--split-seed", type=int, default=0, help="the fixed topic split (the same for every seed)")
    parser.add_argument("--steps", type=int, default=200, help="LoRA steps per run, spread over --epochs epochs")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--control-epochs", type=int, default=3, help="ATP's search epochs (official: 6 of 10)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--eval-tokens", type=int, default=20480, help="held-out domain tokens evaluated (the protocol: >= 20000)"
    )
    parser.add_argument("--general-chunks", type=int, default=None, help="LICENSE.txt chunks (all by default)")
    parser.add_argument("--calibration-chunks", type=int, default=64, help="baselines' calibration (train split)")
    parser.add_argument("--generator-lr", type=float, default=1e-3, help="official v1 rate")
    parser.add_argument("--alpha", type=float, default=5.0, help="weight of ATP's ratio loss (the module's default: 5)")
    parser.add_argument("--noise", default="gumbel", choices=("gumbel", "logistic"))
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lasso-eta", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=3, help="latency: interleaved pruned / dense forwards")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True,
        help="LoRA and generator steps under CPU bfloat16 autocast (Lightning bf16-mixed); --no-bf16: float32",
    )  # fmt: skip
    parser.add_argument(
        "--eval-bf16", action=argparse.BooleanOptionalAction, default=False,
        help="perplexity under bfloat16 autocast (default float32: the table's numbers stay exact)",
    )  # fmt: skip
    parser.add_argument("--records", type=Path, help="also write every run's record (JSON list) to this file")
    parser.add_argument(
        "--workers", type=int, default=1,
        help="processes of one torch thread each, the methods split between them (2 on a 2-core CPU)",
    )  # fmt: skip
    return parser.parse_args(argv)


@dataclass
class Setup:
    """What every run of one process shares: the dense model and its data, built from `args` alone
    (so that each worker process builds the same)."""

    dense: torch.nn.Module
    datamodule: TextDataModule
    domain: torch.Tensor  # [N, seq_len] held-out domain chunks
    general: torch.Tensor  # [M, seq_len] general-text chunks
    timing_ids: torch.Tensor  # [batch, seq_len] the latency input
    dense_params: int

    def evaluate(self, model, args) -> tuple[float, float]:
        """(domain, general) perplexity of `model`."""
        return (
            perplexity(model, self.domain, args.eval_batch_size, args.eval_bf16),
            perplexity(model, self.general, args.eval_batch_size, args.eval_bf16),
        )


def prepare(args: argparse.Namespace) -> Setup:
    if not args.tiny and not Path(args.model, "config.json").is_file():
        convert_gguf(smollm2_gguf_path(), args.model)
    dense, tokenizer = load_model(args)
    dense.eval()
    datamodule = TextDataModule(
        tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_train_chunks=max(1, args.steps // args.epochs) * args.batch_size,
        seed=args.split_seed,
    )
    datamodule.setup()  # the split is fixed by --split-seed before any seed changes the data order
    domain = torch.cat([datamodule.chunks["val"], datamodule.chunks["test"]])
    if domain.numel() < args.eval_tokens:
        raise SystemExit(
            f"the held-out domain set (val + test topics) holds {domain.numel()} tokens, fewer than --eval-tokens "
            f"{args.eval_tokens}; lower --eval-tokens (the protocol asks for >= 20000)."
        )
    domain = domain[: math.ceil(args.eval_tokens / args.seq_len)]
    license_text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    general = token_chunks([license_text], tokenizer, args.seq_len, args.general_chunks)
    return Setup(dense, datamodule, domain, general, domain[: args.batch_size], decoder_parameters(dense.config))


def run_methods(args: argparse.Namespace, methods: list[str], setup: Setup | None = None) -> list[dict]:
    """Every (ratio, method, seed) of `methods`, in that order: one record per run (method, ratio,
    seed and the measurements), each printed as it finishes."""
    setup = setup or prepare(args)
    records, scores = [], {}  # scores: calibrated once per method (and per seed for random)
    with tempfile.TemporaryDirectory() as scratch:
        grid = [(ratio, method, seed) for ratio in args.ratios for method in methods for seed in args.seeds]
        for ratio, method, seed in progress(grid, "structural runs", unit="run"):
            export = Path(scratch, f"{method}_{ratio}_{seed}")
            run = run_method(args, setup.dense, method, ratio, seed, setup.datamodule, export, scores)
            model = run.pop("model")
            params = sum(p.numel() for p in model.model.layers.parameters())
            started = time.perf_counter()
            run["domain"], run["general"] = setup.evaluate(model, args)
            run["eval_s"] = time.perf_counter() - started
            started = time.perf_counter()
            run["latency"] = latency_ratio(model, setup.dense, setup.timing_ids, args.repeats)
            run.update(latency_s=time.perf_counter() - started, params=params, kept=params / setup.dense_params)
            print(f"{method} {ratio:.0%} seed {seed}: " + ", ".join(f"{k} {v}" for k, v in run.items()), flush=True)
            records.append({"method": method, "ratio": ratio, "seed": seed, **run})
            del model
            shutil.rmtree(export)
    return records


METHOD_COST = {"atp": 1.8}  # a run's cost relative to a baseline's (ATP adds its generator steps)


def split_methods(methods: list[str], workers: int) -> list[list[str]]:
    """`methods` in at most `workers` groups of about equal cost (`METHOD_COST`, 1 otherwise), greedily,
    costliest first; each method stays in one group, so it is calibrated once."""
    groups: list[list[str]] = [[] for _ in range(min(workers, len(methods)))]
    load = [0.0] * len(groups)
    for method in sorted(methods, key=lambda m: -METHOD_COST.get(m, 1.0)):
        lightest = load.index(min(load))
        groups[lightest].append(method)
        load[lightest] += METHOD_COST.get(method, 1.0)
    return groups


def worker(args: argparse.Namespace, methods: list[str]) -> list[dict]:
    """One worker process: one torch thread (on a CPU with as many cores as workers, parallel
    processes of one thread each are faster than threads inside one process)."""
    torch.set_num_threads(1)
    return run_methods(args, methods)


def run_all(args: argparse.Namespace, setup: Setup) -> list[dict]:
    """Every run, in this process (`--workers 1`) or split by method over `--workers` processes."""
    if args.workers == 1:
        return run_methods(args, args.methods, setup)
    groups = split_methods(args.methods, args.workers)
    print(f"{len(groups)} worker processes, one torch thread each: {groups}", flush=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
        parts = list(pool.map(worker, [args] * len(groups), groups))
    return [record for part in parts for record in part]


def print_table(args: argparse.Namespace, setup: Setup, dense_row: tuple[float, float], records: list[dict]) -> None:
    print(
        f"\nSettings: {'tiny Llama (smoke)' if args.tiny else args.model}, {args.steps} LoRA steps of "
        f"{args.batch_size} x {args.seq_len} tokens over {args.epochs} epochs (ATP searches {args.control_epochs}), "
        f"rank {args.lora_rank}, {'bf16 autocast' if args.bf16 else 'float32'}; generator lr {args.generator_lr}, "
        f"ratio-loss alpha {args.alpha}, "
        f"{args.noise} noise; baselines calibrated on "
        f"{args.calibration_chunks} training chunks; eval on {setup.domain.numel()} held-out domain tokens and "
        f"{setup.general.numel()} general tokens ({'bf16 autocast' if args.eval_bf16 else 'float32'}); "
        f"seeds {args.seeds}; mean ± sample std over seeds.\n"
    )
    print("| method | pruned | domain ppl | general ppl | decoder params | kept | forward latency | train s |")
    print("|---|---|---|---|---|---|---|---|")
    dense_params = setup.dense_params
    print(f"| dense | - | {dense_row[0]:.2f} | {dense_row[1]:.2f} | {dense_params / 1e6:.2f} M | 100% | 1.00x | - |")
    for ratio in args.ratios:
        for method in args.methods:
            group = [r for r in records if r["method"] == method and r["ratio"] == ratio]
            print(
                f"| {method} | {ratio:.0%} | {mean_spread([r['domain'] for r in group])} | "
                f"{mean_spread([r['general'] for r in group])} | {group[0]['params'] / 1e6:.2f} M | "
                f"{statistics.mean(r['kept'] for r in group):.1%} | "
                f"{statistics.mean(r['latency'] for r in group):.2f}x | "
                f"{statistics.mean(r['train_s'] for r in group):.0f} |"
            )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.control_epochs > args.epochs:
        raise SystemExit(f"--control-epochs {args.control_epochs} exceeds --epochs {args.epochs}.")
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {args.workers}.")
    setup = prepare(args)
    started = time.perf_counter()
    dense_row = setup.evaluate(setup.dense, args)
    eval_seconds = time.perf_counter() - started
    print(f"dense: domain {dense_row[0]:.2f}, general {dense_row[1]:.2f} (evaluation {eval_seconds:.1f} s)", flush=True)
    begun = time.perf_counter()
    records = run_all(args, setup)
    total = time.perf_counter() - begun
    print(f"\n{len(records)} runs in {total / 60:.1f} min on {args.workers} worker(s), plus the dense evaluation")
    print_table(args, setup, dense_row, records)
    if args.records is not None:
        args.records.write_text(json.dumps({"dense": dense_row, "runs": records}, indent=1))
    return records


if __name__ == "__main__":
    main()
