"""benchmarks/text_pruning.py in its smoke mode: the table's rows and columns, and its numbers against
independent references (one plain forward without a cache for the full row; the documented cache-size
arithmetic for the evicting rows; the full row at a budget no sequence reaches; for LazyLLM: the full row at
keep ratio 1, one drop-mode forward over the whole sequence (continuation as answer tokens) and the rule's
token arithmetic without revival, the brute force of tests/token/test_lazyllm.py, teacher-forced, with it)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import atp
from atp.metrics.accounting import prefill_flops
from tests.token.test_lazyllm import brute_force

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
    evicting = (["a2sf"] * len(args.alphas) + ["streaming"]) * len(args.budgets)
    assert [m.name for m in methods] == ["full"] + evicting + ["lazyllm"] * 2 * len(args.lazy_ratios)
    methods = methods[: 1 + len(evicting)]
    results = text_pruning.evaluate_rows(model, methods, sequences, args.prompt)
    steps = range(args.continuation)
    for method, result in zip(methods[1:], results[1:]):
        expected = [min(method.budget, args.prompt + t + 1) for t in steps]
        assert result["entries"] == pytest.approx(sum(expected) / len(expected))
        assert result["largest"] == method.budget
    assert any(r["agreement"] < 1.0 for r in results[1:])  # eviction changes predictions somewhere
    large = args.prompt + args.continuation
    args.budgets, args.alphas = [large], [0.5]
    _, a2sf, streaming, *_ = text_pruning.method_rows(args)
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
    column = {name: i for i, name in enumerate(text_pruning.COLUMNS)}
    assert rows[0][column["of full"]] == "100.0%" and rows[0][column["agrees with full"]] == "100.0%"
    assert rows[0][column["prefill FLOPs"]] == "100.0%" and rows[0][column["decode rows/layer"]] == "1.00"
    assert rows[0][column["TTFT"]].startswith("1.00x") and rows[0][column["decode/token"]].startswith("1.00x")
    lazy = [row for row in rows if row[0] == "lazyllm"]
    assert [row[1].endswith("revival on") for row in lazy] == [True, False] * len(args.lazy_ratios)
    assert all(float(row[column["prefill FLOPs"]].rstrip("%")) < 100 for row in lazy)


def lazy_rows(args, ratio: float) -> list:
    args = text_pruning.parse_args(["--smoke", "--lazy-ratios", str(ratio)])
    return text_pruning.lazyllm_rows(args)


def test_lazyllm_keeping_every_token_equals_the_full_row(smoke):
    args, model, sequences = smoke
    full = text_pruning.Method("full", "every entry", text_pruning.full_cache)
    reference, *rows = text_pruning.evaluate_rows(model, [full, *lazy_rows(args, 1.0)], sequences, args.prompt)
    for result in rows:  # revival on, then off
        assert result["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
        assert result["accuracy"] == reference["accuracy"] and result["agreement"] == 1.0
        assert result["entries"] == reference["entries"] and result["largest"] == reference["largest"]
        assert result["prefill_flops"] == 1.0 and result["decode_rows"] == 1.0
    assert model.__dict__.get("_atp_runtime") is None  # the row removed its pruner


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_lazyllm_without_revival_equals_one_drop_mode_forward(smoke, ratio):
    """Static pruning's teacher-forced decode = one drop-mode forward over prompt + continuation with the
    continuation as answer tokens (never pruned; the last prompt token scores): the same kept prompt tokens,
    seen by every continuation token. Entries: the rule's arithmetic per layer plus the decoded tokens."""
    args, model, sequences = smoke
    _, static = lazy_rows(args, ratio)
    scores = text_pruning.continuation_scores(model, static, sequences, args.prompt)
    [result] = text_pruning.evaluate_rows(model, [static], sequences, args.prompt)
    labels = torch.full_like(sequences, -100)
    labels[:, args.prompt :] = sequences[:, args.prompt :]
    atp.apply(model, atp.build_pruner("lazyllm", layers=args.lazy_layers, keep_ratios=[ratio], revival=False))
    try:
        with torch.no_grad():
            logits = model(input_ids=sequences, labels=labels).logits[:, args.prompt : -1].double()
    finally:
        atp.remove(model)
    targets = sequences[:, args.prompt + 1 :]
    logprobs = torch.log_softmax(logits, -1).gather(2, targets[..., None])[..., 0]
    torch.testing.assert_close(scores["logprobs"].double(), logprobs, rtol=1e-5, atol=1e-5)
    assert torch.equal(scores["predictions"], logits.argmax(-1))
    assert result["perplexity"] == pytest.approx(math.exp(-float(logprobs.mean())), rel=1e-5)
    layers = model.config.num_hidden_layers
    kept = math.floor((args.prompt - 1) * ratio + 0.5) + 1  # prunable: all but the last prompt token
    prefill = [args.prompt if layer < args.lazy_layers[0] else kept for layer in range(layers)]
    expected = [sum(prefill) / layers + t + 1 for t in range(args.continuation)]
    assert result["entries"] == pytest.approx(sum(expected) / len(expected))
    assert result["decode_rows"] == 1.0
    flops = prefill_flops(model.config, torch.tensor([prefill])) / prefill_flops(
        model.config, torch.tensor([[args.prompt] * layers])
    )
    assert result["prefill_flops"] == pytest.approx(float(flops), rel=1e-9)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_lazyllm_with_revival_equals_the_teacher_forced_brute_force(smoke, ratio):
    """Each decode step's argmax equals the brute force that recomputes the step from scratch with stock
    layers (re-selecting and reviving), fed the true continuation; revived tokens make decode rows > 1."""
    args, model, sequences = smoke
    revival, _ = lazy_rows(args, ratio)
    scores = text_pruning.continuation_scores(model, revival, sequences, args.prompt)
    embed = model.get_input_embeddings()
    steps = args.continuation + 1  # the prefill, then one step per continuation token fed
    for b, sequence in enumerate(sequences):
        with torch.no_grad():
            prompt = embed(sequence[None, : args.prompt])[0]
        forced = sequence[args.prompt : args.prompt + args.continuation].tolist()
        expected, _ = brute_force(model, prompt, args.lazy_layers, [ratio], steps, revival=True, forced=forced)
        assert scores["predictions"][b].tolist() == expected[1:], f"sequence {b}"
    assert float(scores["rows"].mean()) > 1.0  # some steps revived tokens
