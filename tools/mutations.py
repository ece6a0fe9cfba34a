"""Mutation check: apply one-line mutations of the source one at a time and see which tests fail.

    python tools/mutations.py                       # every mutation, the whole suite (-x -q)
    python tools/mutations.py --only tau_doubled    # one mutation (repeatable)
    python tools/mutations.py -- tests/token        # a test selection instead of the whole suite
    python tools/mutations.py --list

Each mutation is an exact string replacement in one file; a target string that is missing (or
not unique) stops the run with an error, so a refactor cannot silently turn a mutation into a
no-op. The file is restored afterwards whatever happens. The report names the failing tests
(pytest's "FAILED"/"ERROR" lines), so without -x it lists every test that catches a mutation.
Not collected by pytest (it lives outside tests/ and has no test_ functions).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    what: str


MUTATIONS = [
    Mutation(
        "soft_mask_probabilistic_or",
        "atp/token/atp.py",
        "soft = torch.maximum(soft, torch.sigmoid(self.tau * (s_spatial - theta_s[:, None])))",
        "spatial = torch.sigmoid(self.tau * (s_spatial - theta_s[:, None]))\n"
        "            soft = soft + spatial - soft * spatial",
        "the soft mask's max of the two sigmoids replaced by a probabilistic OR",
    ),
    Mutation(
        "tau_doubled",
        "atp/token/atp.py",
        "self.tau = float(tau)",
        "self.tau = 2 * float(tau)",
        "the soft-mask temperature tau doubled",
    ),
    Mutation(
        "key_bias_doubled",
        "atp/runtime/layout.py",
        "bias = torch.log(layout.weight.clamp_min(SOFT_MASK_FLOOR)).to(dtype)",
        "bias = 2 * torch.log(layout.weight.clamp_min(SOFT_MASK_FLOOR)).to(dtype)",
        "the key bias log m doubled (2 log m)",
    ),
    Mutation(
        "depth_feature_unnormalised",
        "atp/token/atp.py",
        "depth = ctx.layer / self.num_layers",
        "depth = float(ctx.layer)",
        "the threshold MLP's depth feature l / L replaced by l",
    ),
    Mutation(
        "bankers_rounding",
        "atp/token/selection.py",
        "keep = torch.floor(num_tokens.double() * keep_ratio + 0.5).long()",
        "keep = torch.round(num_tokens.double() * keep_ratio).long()",
        "the budgeted pruners' count rounding (FastV's and others') half-up -> banker's",
    ),
    Mutation(
        "correct_by_substring",
        "atp/evaluation.py",
        '"correct": first_word(text) == first_word(batch["answer"][b]),',
        '"correct": first_word(batch["answer"][b]) in text.lower(),',
        "the evaluation's correct rule: first-word match -> substring match",
    ),
    Mutation(
        "kv_ratio_unpruned",
        "atp/evaluation.py",
        "kv += float(report.kv_bytes.sum())",
        "kv += float(report.kv_bytes_unpruned.sum())",
        "the evaluation's KV-cache ratio counts the unpruned cache (always 1)",
    ),
    Mutation(
        "s_self_ignores_soft_weights",
        "atp/token/atp.py",
        "query_weight = (ctx.weight * visual).float()",
        "query_weight = visual.float()",
        "S_self ignores the earlier modules' soft weights",
    ),
    Mutation(
        "s_self_statistics_from_s_cross",
        "atp/token/atp.py",
        "score_statistics(s_self, present),",
        "score_statistics(s_cross, present),",
        "the MLP's S_self statistics replaced by S_cross's",
    ),
    Mutation(
        "no_return_to_mask_mode",
        "atp/lit/module.py",
        "self.use_mode(self.hparams.eval_mode if hard else self.hparams.train_mode)",
        "self.use_mode(self.hparams.eval_mode if hard else self._mode or self.hparams.train_mode)",
        "training after a mid-epoch validation stays in the validation's (drop) mode",
    ),
]


def apply(mutation: Mutation) -> str:
    """Write the mutated file; returns the original text (raises if the target is not unique)."""
    path = ROOT / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(
            f"mutation {mutation.name}: the target string occurs {count} times in {mutation.path} (expected "
            f"once); update tools/mutations.py to the current source.\n  target: {mutation.old!r}"
        )
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def run_tests(selection: list[str], extra: list[str]) -> tuple[int, list[str], str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *selection]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    return result.returncode, failed, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-x", action="store_true", help="do not stop at the first failure (list every catcher)")
    parser.add_argument("selection", nargs="*", default=["tests"], help="pytest paths / node ids (default: tests)")
    args = parser.parse_args()
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.what} ({m.path})")
        return
    unknown = sorted(set(args.only or []) - set(by_name))
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; --list shows the names.")
    chosen = [by_name[name] for name in args.only] if args.only else MUTATIONS
    extra = [] if args.no_x else ["-x"]
    caught_all = True
    for mutation in chosen:
        original = apply(mutation)
        try:
            code, failed, summary = run_tests(args.selection, extra)
        finally:
            (ROOT / mutation.path).write_text(original)
        caught = code != 0 and bool(failed)
        caught_all &= caught
        status = "CAUGHT" if caught else "MISSED" if code == 0 else f"ERROR (exit {code})"
        print(f"{mutation.name}: {status}  [{summary}]")
        for test in failed:
            print(f"    {test}")
        sys.stdout.flush()
    sys.exit(0 if caught_all else 1)


if __name__ == "__main__":
    main()
