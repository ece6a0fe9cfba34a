"""Compare token pruners on held-out ShapesVQA at the same measured average token count.

Rows: the unpruned base model; two blind controls (images replaced by noise, out of
distribution, or by the empty black background: what the prompts alone are worth); the trained ATP
export; FastV and random with one cut before the first ATP layer, their keep ratio chosen
so that their average visual tokens per decoder layer match ATP's measured average. When the
export carries its own LLM (trained with LoRA, `module.train_parts=lora`), one more row runs
that LLM without its pruner: the accuracy the fine-tuning alone is worth, so ATP's retention
can be read against it as well as against the base model. The last line is a verdict
(`atp.comparison.verdict`): whether ATP is ahead of FastV and random at the same measured
tokens by more than the sampling noise of the questions asked (a paired one-sided sign test),
and if not, why not.

Latency: after the accuracy runs, every pruned row and the unpruned model are timed on the same
batches in interleaved rounds (a warm-up round first, the order rotated each round); the table
gives the median per-round ratio to the unpruned model and its range, and the output warns when
the range makes a ratio unreadable (a busy machine). Pictures: kept tokens per decoder layer
(`tokens_per_layer.png`) and kept tokens versus the number of objects (`tokens_vs_objects.png`)
for the pruned rows, next to the table in --out.

    python benchmarks/shapes_comparison.py --base checkpoints/shapes_base/model \\
        --atp checkpoints/atp_llava_shapes/export --split test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import atp
from atp.budget import single_cut_keep_ratio
from atp.comparison import verdict
from atp.data.llava_format import prompt_loader
from atp.evaluation import evaluate, latency_warnings, markdown_table, timing_batches
from atp.latency import Contender, interleaved_prefill_times, latency_ratios
from atp.models.build import load_llava
from atp.plots import plot_kept_tokens_per_layer, plot_tokens_vs_objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="checkpoints/shapes_base/model")
    parser.add_argument("--atp", default="checkpoints/atp_llava_shapes/export")
    parser.add_argument("--data", default="checkpoints/data/shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default="checkpoints/comparison")
    parser.add_argument("--latency-batches", type=int, default=2, help="batches timed per round")
    parser.add_argument("--latency-repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, processor = load_llava(args.base, setting="--base")
    model.eval()
    loader = prompt_loader(
        Path(args.data, f"{args.split}.json"), Path(args.data, "images"), processor, args.max_samples, args.batch_size
    )
    no_timing = {"latency_batches": 0}  # timed below, all rows interleaved
    results = [
        evaluate(model, processor, loader, "unpruned"),
        evaluate(model, processor, loader, "blind control (noise images)", blind="noise"),
        evaluate(model, processor, loader, "blind control (blank images)", blind="blank"),
    ]
    contenders = [Contender("unpruned", model, None)]
    atp_model, _ = atp.load_pruned(args.atp)
    atp_model.eval()
    atp_result = evaluate(atp_model, processor, loader, "atp (trained)", **no_timing)
    results.append(atp_result)
    pruner = atp.runtime_of(atp_model).pruner
    contenders.append(Contender(atp_result.method, atp_model, pruner))
    timed = [atp_result]
    if json.loads(Path(args.atp, "atp_config.json").read_text())["base_model"] == "base":  # its own LLM
        atp.remove(atp_model)
        results.append(evaluate(atp_model, processor, loader, "the export's fine-tuned model, unpruned"))
        atp.apply(atp_model, pruner, mode="drop")
    num_layers, cut = model.config.text_config.num_hidden_layers, min(pruner.layers)
    num_visual = round(atp_result.input_visual_tokens)
    ratio = single_cut_keep_ratio(atp_result.avg_visual_tokens, num_visual, num_layers, cut)
    baselines = []
    for name, kwargs in (("fastv", {"layer": cut}), ("random", {"layers": [cut], "seed": 0})):
        baseline = atp.build_pruner(name, keep_ratio=ratio, **kwargs).eval()
        atp.apply(model, baseline, mode="drop")
        label = f"{name} (cut before layer {cut}, keep {ratio:.3f})"
        baselines.append(evaluate(model, processor, loader, label, **no_timing))
        atp.remove(model)
        timed.append(baselines[-1])
        contenders.append(Contender(baselines[-1].method, model, baseline))
    results += baselines
    batches = timing_batches(loader, next(model.parameters()).device, args.latency_batches)
    times = interleaved_prefill_times(contenders, batches, repeats=args.latency_repeats, warmup=1)
    ratios = latency_ratios(times, reference="unpruned")
    for r in timed:
        r.set_latency(ratios[r.method])
    table = markdown_table(results)
    warnings = latency_warnings(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r.as_dict() for r in results], indent=1))
    (out / "results.md").write_text("\n".join([table, *warnings]) + "\n")
    pictured = [results[0], *timed]
    title = f"ShapesVQA {args.split}, {len(loader.dataset)} questions"
    plot_kept_tokens_per_layer(pictured, out / "tokens_per_layer.png", title=title)
    plot_tokens_vs_objects(timed, out / "tokens_vs_objects.png", title=title)
    base = results[0].accuracy
    print(f"\nShapesVQA {args.split} ({len(loader.dataset)} questions); retention = accuracy / unpruned accuracy\n")
    print(table)
    for r in results[1:]:
        print(f"{r.method}: retention {100 * r.accuracy / max(base, 1e-9):.1f} %")
    print(
        f"prefill latency: median of {args.latency_repeats} interleaved rounds over {len(batches)} batches "
        "(per-round ratio to unpruned; min-max in brackets)"
    )
    for line in warnings:
        print(line)
    print(f"pictures: {out / 'tokens_per_layer.png'}, {out / 'tokens_vs_objects.png'}")
    hint = (
        "the testbed base needs the image more the longer it trains: the README's results use "
        "`python train.py experiment=shapes_base` at its 1,000 steps, ~34 min on 2 CPU cores"
    )
    _, lines = verdict(atp_result, baselines, unpruned=results[0], blank=results[2], weak_model_hint=hint)
    (out / "verdict.txt").write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
