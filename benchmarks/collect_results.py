"""Merge the results.json files of an evaluate.py multirun into one markdown table.

    python benchmarks/collect_results.py checkpoints/eval/budgets --out checkpoints/eval/budgets/table.md \
        --plot checkpoints/eval/budgets/pareto.png

Rows are grouped by `budget_tokens` (largest first), the unpruned row first; retention is
accuracy / unpruned accuracy. --plot draws the same rows as a Pareto plot (`atp.plots.plot_pareto`):
accuracy versus average visual tokens per layer and versus prefill FLOPs, one line per method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atp.evaluation import EvaluationResult, latency_warnings, markdown_table


def load(path: Path) -> tuple[int | None, EvaluationResult]:
    content = json.loads(path.read_text())
    budget = content.pop("budget_tokens", None)
    fields = EvaluationResult.__dataclass_fields__
    return budget, EvaluationResult(**{k: v for k, v in content.items() if k in fields})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a multirun directory (its subfolders hold results.json)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="write the Pareto plot (PNG) here")
    parser.add_argument("--title", default="", help="the plot's title")
    args = parser.parse_args()
    found = [load(p) for p in sorted(args.sweep.rglob("results.json"))]
    if not found:
        raise SystemExit(f"no results.json under {args.sweep}; run the evaluate.py multirun first.")
    found.sort(key=lambda item: (-(item[0] or 10**9), item[1].method))
    results = [r for _, r in found]
    unpruned = next((r for b, r in found if b is None and r.method == "unpruned"), None)
    table = markdown_table(results)
    lines = [table, *latency_warnings(results)]
    if unpruned is not None:
        lines.append("")
        lines += [f"- {r.method}: retention {100 * r.accuracy / max(unpruned.accuracy, 1e-9):.1f} %" for r in results]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        from atp.plots import plot_pareto

        plot_pareto(results, args.plot, title=args.title)
        print(f"Pareto plot written to {args.plot}")


if __name__ == "__main__":
    main()
