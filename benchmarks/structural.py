"""ATP structural pruning against two-stage baselines on a causal LM (SmolLM2-135M by default).

For every pruned ratio and method: LoRA fine-tuning on the pydoc-topics training split with
the same rank and number of LoRA steps (ATP: its generator trains in the first epoch and
its mask is frozen for the second; baselines: magnitude / Wanda-sp / random masks fixed
from the start), export to a smaller `from_pretrained` checkpoint, then:
domain perplexity (pydoc test topics), general-text perplexity (Python's LICENSE.txt, not
seen in training), decoder parameters, and the exported model's forward latency against
the dense model (median of interleaved repeats, same process).

    python benchmarks/structural.py --model checkpoints/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import math
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from transformers import AutoModelForCausalLM

import atp  # noqa: F401  (registers the exported model classes)
from atp.data.text import TextDataModule, token_chunks
from atp.lit.structural import StructuralPruningModule
from atp.models.causal import convert_gguf, load_causal_lm, smollm2_gguf_path
from atp.progress import progress
from atp.structural import decoder_parameters
from atp.structural.baselines import baseline_mask


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    losses = []
    for start in progress(range(0, len(chunks), batch_size), "perplexity", unit="batch"):
        ids = chunks[start : start + batch_size]
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


def run_method(args, method: str, ratio: float, datamodule, tokenizer, export_dir: Path):
    model, _ = load_causal_lm(args.model)
    fixed = None
    if method != "atp":
        chunks = datamodule.chunks["train"][: args.calibration_chunks]
        calibration = [{"input_ids": chunks[i : i + 8]} for i in range(0, len(chunks), 8)]
        fixed = baseline_mask(model, method, ratio, calibration, seed=args.seed)
    module = StructuralPruningModule(
        model,
        prune_ratio=ratio,
        control_epochs=1,
        generator_lr=args.generator_lr,
        lora_lr=args.lora_lr,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        lasso_eta=args.lasso_eta,
        seed=args.seed,
        fixed_mask=fixed,
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    minutes = (time.perf_counter() - started) / 60
    keep = float(module.keep_ratio(module.current_mask()))
    module.export(export_dir)
    return AutoModelForCausalLM.from_pretrained(export_dir).eval(), keep, minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="checkpoints/smollm2-135m-instruct", help="HF dir (converted from GGUF if missing)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=["atp", "magnitude", "wanda_sp", "random"])
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps per run (two epochs of steps / 2)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-chunks", type=int, default=48)
    parser.add_argument(
        "--calibration-chunks", type=int, default=64, help="Wanda-sp's calibration chunks (train split)"
    )
    parser.add_argument("--generator-lr", type=float, default=0.05)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lasso-eta", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if not Path(args.model, "config.json").is_file():
        convert_gguf(smollm2_gguf_path(), args.model)
    dense, tokenizer = load_causal_lm(args.model)
    dense.eval()
    datamodule = TextDataModule(
        tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_train_chunks=args.steps // 2 * args.batch_size,
        max_eval_chunks=args.eval_chunks,
        seed=args.seed,
    )
    datamodule.setup()
    license_text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    general = token_chunks([license_text], tokenizer, args.seq_len, args.eval_chunks)
    domain = datamodule.chunks["test"]
    timing_ids = domain[: args.batch_size]
    dense_params = decoder_parameters(dense.config)
    rows = [("dense", "-", perplexity(dense, domain, 8), perplexity(dense, general, 8), dense_params, 1.0, 1.0, 0.0)]
    with tempfile.TemporaryDirectory() as scratch:
        runs = [(ratio, method) for ratio in args.ratios for method in args.methods]
        for ratio, method in progress(runs, "structural runs", unit="run"):
            model, keep, minutes = run_method(
                args, method, ratio, datamodule, tokenizer, Path(scratch, f"{method}_{ratio}")
            )
            params = sum(p.numel() for p in model.model.layers.parameters())
            rows.append(
                (
                    method,
                    f"{ratio:.0%}",
                    perplexity(model, domain, 8),
                    perplexity(model, general, 8),
                    params,
                    params / dense_params,
                    latency_ratio(model, dense, timing_ids, args.repeats),
                    minutes,
                )
            )
            print(rows[-1], flush=True)
    print(
        f"\nSettings: {args.model}, {args.steps} LoRA steps of {args.batch_size} x {args.seq_len} tokens (rank "
        f"{args.lora_rank}), Wanda-sp calibrated on {args.calibration_chunks} training chunks, eval on {len(domain)} "
        f"domain and {len(general)} general chunks, seed {args.seed}.\n"
    )
    print(
        "| method | pruned (target) | domain ppl | general ppl | decoder params | kept | forward latency | train min |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, target, ppl, general_ppl, params, kept, latency, minutes in rows:
        print(
            f"| {method} | {target} | {ppl:.2f} | {general_ppl:.2f} | {params / 1e6:.1f} M | {kept:.1%} | "
            f"{latency:.2f}x | {minutes:.1f} |"
        )


if __name__ == "__main__":
    main()
