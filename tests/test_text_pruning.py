"""benchmarks/text_pruning.py in its smoke mode: the table's rows and columns, and its numbers against
independent references (one plain forward without a cache for the full row; the documented cache-size
arithmetic for the evicting rows; the full row at a budget no sequence reaches)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("text_pruning", ROOT / "benchmarks/text_pruning.py")
text_pruning = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = text_pruning  # dataclasses look their module up
spec.loader.exec_module(text_pruning)


@pytest.fixture(scope="module")
def smoke():
    args = text_pruning.parse_args(["--smoke"])
    model, tokenizer = text_pruning.load(args)
    length = args.prompt + args.continuation + 1
    sequences = text_pruning.token_chunks(
        text_pruning.topic_splits(args.split_seed)["test"], tokenizer, length, args.sequences
    )
    return args, model, sequences


def test_full_row_equals_one_forward_without_a_cache(smoke):
    args, model, sequences = smoke
    full = text_pruning.Method("full", "every entry", text_pruning.full_cache)
    [result] = text_pruning.evaluate_rows(model, [full], sequences, args.prompt)
    with torch.no_grad():
        logits = model(input_ids=sequences).logits[:, args.prompt : -1].double()  # predicting tokens prompt+1..
    targets = sequences[:, args.prompt + 1 :]
    logprobs = torch.log_softmax(logits, -1).gather(2, targets[..., None])[..., 0]
    assert result["perplexity"] == pytest.approx(math.exp(-float(logprobs.mean())), rel=1e-4)
    assert result["accuracy"] == float((logits.argmax(-1) == targets).double().mean())
    assert result["agreement"] == 1.0
    steps = range(args.continuation)
    assert result["entries"] == pytest.approx(sum(args.prompt + t + 1 for t in steps) / len(steps))
    assert result["largest"] == args.prompt + args.continuation


def test_evicting_rows_hold_the_documented_sizes_and_a_large_budget_changes_nothing(smoke):
    args, model, sequences = smoke
    methods = text_pruning.method_rows(args)
    assert [m.name for m in methods] == ["full"] + (["a2sf"] * len(args.alphas) + ["streaming"]) * len(args.budgets)
    results = text_pruning.evaluate_rows(model, methods, sequences, args.prompt)
    steps = range(args.continuation)
    for method, result in zip(methods[1:], results[1:]):
        expected = [min(method.budget, args.prompt + t + 1) for t in steps]
        assert result["entries"] == pytest.approx(sum(expected) / len(expected))
        assert result["largest"] == method.budget
    assert any(r["agreement"] < 1.0 for r in results[1:])  # eviction changes predictions somewhere
    large = args.prompt + args.continuation
    args.budgets, args.alphas = [large], [0.5]
    _, a2sf, streaming = text_pruning.method_rows(args)
    full, *rest = text_pruning.evaluate_rows(model, [methods[0], a2sf, streaming], sequences, args.prompt)
    for result in rest:
        assert result["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
        assert result["agreement"] == 1.0 and result["entries"] == pytest.approx(full["entries"])


def test_a_row_over_its_budget_is_an_error(smoke):
    args, model, sequences = smoke
    liar = text_pruning.Method("full", "claims 4", text_pruning.full_cache, budget=4)
    with pytest.raises(RuntimeError, match="held 48 entries in a layer, over its budget of 4"):
        text_pruning.evaluate_rows(model, [liar], sequences, args.prompt)


def test_smoke_table():
    text = text_pruning.main(["--smoke"])
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(text_pruning.COLUMNS)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    args = text_pruning.parse_args(["--smoke"])
    assert [r[0] for r in rows] == [m.name for m in text_pruning.method_rows(args)]
    assert rows[0][3] == "100.0%" and rows[0][7] == "100.0%"
    assert rows[0][8].startswith("1.00x") and rows[0][9].startswith("1.00x")
