"""Merge the results.json files of an evaluate.py multirun into one markdown table.

    python benchmarks/collect_results.py checkpoints/eval/budgets --out checkpoints/eval/budgets/table.md

Rows are grouped by `budget_tokens` (largest first), the unpruned row first; retention is
accuracy / unpruned accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atp.evaluation import EvaluationResult, markdown_table


def load(path: Path) -> tuple[int | None, EvaluationResult]:
    content = json.loads(path.read_text())
    budget = content.pop("budget_tokens", None)
    fields = EvaluationResult.__dataclass_fields__
    return budget, EvaluationResult(**{k: v for k, v in content.items() if k in fields})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a multirun directory (its subfolders hold results.json)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    found = [load(p) for p in sorted(args.sweep.rglob("results.json"))]
    if not found:
        raise SystemExit(f"no results.json under {args.sweep}; run the evaluate.py multirun first.")
    found.sort(key=lambda item: (-(item[0] or 10**9), item[1].method))
    results = [r for _, r in found]
    unpruned = next((r for b, r in found if b is None and r.method == "unpruned"), None)
    table = markdown_table(results)
    lines = [table]
    if unpruned is not None:
        lines.append("")
        lines += [f"- {r.method}: retention {100 * r.accuracy / max(unpruned.accuracy, 1e-9):.1f} %" for r in results]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
