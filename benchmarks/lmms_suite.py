"""Methods x budgets through lmms-eval, merged into the `make budgets` table (needs the `lmms` extra).

    python benchmarks/lmms_suite.py run --pretrained /data/llava-1.5-7b-hf --methods fastv,pdrop,sparsevlm \\
        --budgets 192,128,64 --tasks atp_llava_seven --out checkpoints/lmms/suite --device cuda --batch-size 16
    python benchmarks/lmms_suite.py collect checkpoints/lmms/suite --out checkpoints/lmms/suite/table.md

`run` makes one job per row: the unpruned model, the ATP export (--export), and every method at
every budget (`budget_tokens`, `atp.budget`'s rules); each job is one `python -m lmms_eval --model
atp` call writing to <out>/<job>/ (lmms-eval's results and samples, the plugin's accounting). It runs
with --verbosity DEBUG, without which lmms-eval's CLI exits 0 after a failed evaluation; a job that
fails stops the suite with its exit code. `--list` prints the jobs, `--index I` runs job I only: a
Slurm array runs the suite in parallel (docs/architecture.md, "Standard benchmarks"). `collect`
merges the finished jobs (`atp.integrations.lmms_table`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from atp.evaluation import latency_warnings, markdown_table
from atp.integrations.lmms_table import merge

TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"


def jobs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, model_args) for every row of the table."""
    common = f"dtype={args.dtype},attn_implementation={args.attn_implementation},mode={args.mode}"
    rows = [("unpruned", f"pretrained={args.pretrained},{common}")]
    if args.export:
        rows.append(("atp", f"pretrained={args.pretrained},export={args.export},{common},method_name=atp"))
    for method in [m for m in args.methods.split(",") if m]:
        for budget in [int(b) for b in args.budgets.split(",") if b]:
            rows.append(
                (f"{method}_{budget}", f"pretrained={args.pretrained},pruner={method},budget_tokens={budget},{common}")
            )
    return rows


def task_folder(args: argparse.Namespace) -> Path:
    """One folder for lmms-eval's --include_path (it takes one): the suite's group and copies of
    the --include_path folders (local tasks name their data by absolute path)."""
    if not args.include_path:
        return TASKS_DIR
    merged = args.out / "tasks"
    for index, folder in enumerate([TASKS_DIR, *args.include_path]):
        shutil.copytree(folder, merged / str(index), dirs_exist_ok=True)
    return merged


def command(args: argparse.Namespace, name: str, model_args: str) -> list[str]:
    out = args.out / name
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "atp", "--model_args", f"{model_args},output_dir={out}"]
    cmd += ["--tasks", args.tasks, "--include_path", str(task_folder(args))]
    cmd += ["--batch_size", str(args.batch_size), "--device", args.device, "--output_path", str(out)]
    cmd += ["--log_samples", "--verbosity", "DEBUG"]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    return cmd


def run(args: argparse.Namespace) -> None:
    if not args.pretrained:
        raise SystemExit(
            "give --pretrained <a save_pretrained VLM directory> (the unpruned model and the methods' base)."
        )
    todo = jobs(args)
    if args.list:
        for index, (name, model_args) in enumerate(todo):
            print(f"{index}\t{name}\t{model_args}")
        return
    if args.index is not None:
        if not 0 <= args.index < len(todo):
            raise SystemExit(
                f"--index {args.index} is outside 0..{len(todo) - 1} ({len(todo)} jobs; --list shows them)."
            )
        todo = [todo[args.index]]
    for name, model_args in todo:
        cmd = command(args, name, model_args)
        print("+", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
        if code != 0:
            raise SystemExit(f"job {name} failed (exit {code}); its log is above, its folder {args.out / name}.")


def collect(args: argparse.Namespace) -> None:
    folders = sorted({p.parent for p in args.suite.rglob("atp_accounting_*.json")})
    if not folders:
        raise SystemExit(f"no finished job under {args.suite} (no atp_accounting_*.json); run the suite first.")
    rows, retention = merge(folders)
    text = "\n".join([markdown_table(rows), *latency_warnings(rows), "", *retention]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the jobs (all, or --index I)")
    r.add_argument("--pretrained", default=None, help="the base model (save_pretrained directory)")
    r.add_argument("--export", default=None, help="an ATP export of that base (one more row)")
    r.add_argument("--methods", default="fastv,pdrop,sparsevlm,visionzip,divprune,fastervlm,spatial,random")
    r.add_argument("--budgets", default="192,128,64")
    r.add_argument("--tasks", default="atp_llava_seven", help="lmms-eval tasks or groups, comma-separated")
    r.add_argument("--include_path", action="append", default=[], help="more task folders (e.g. a local task)")
    r.add_argument("--out", type=Path, default=Path("checkpoints/lmms/suite"))
    r.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="float16")
    r.add_argument("--attn-implementation", dest="attn_implementation", default="sdpa")
    r.add_argument("--mode", default="drop")
    r.add_argument("--limit", type=int, default=None, help="first N documents per task (smoke runs only)")
    r.add_argument("--list", action="store_true", help="print the jobs and exit")
    r.add_argument("--index", type=int, default=None, help="run job I only (a Slurm array task)")
    c = sub.add_parser("collect", help="merge finished jobs into one table")
    c.add_argument("suite", type=Path)
    c.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    run(args) if args.command == "run" else collect(args)


if __name__ == "__main__":
    main()
