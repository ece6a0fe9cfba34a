"""The lmms-eval plugin's pure parts, without lmms-eval: model_args, accounting, the suite's table.

References: the accounting against plain loops over `atp.stats` and the documented FLOPs / KV
formulas written out here; the table against the numbers of hand-written result files.
"""

from __future__ import annotations

import json

import pytest
import torch

import atp
from atp.evaluation import markdown_table
from atp.integrations.lmms_spec import ModelSpec, TaskAccounting, parse_model_args
from atp.integrations.lmms_table import merge
from atp.integrations.shapes_task import process_results
from atp.metrics.accounting import DecoderShape
from tests.conftest import make_batch


def test_model_args_are_read_as_lmms_eval_hands_them():
    # lmms-eval turns numbers into int / float and passes batch_size as a string, lists as text
    spec = parse_model_args(
        {
            "pretrained": "/m",
            "pruner": "pdrop",
            "pruner.layers": "[1,2]",
            "pruner.keep_ratios": "[0.5, 0.25]",
            "batch_size": "3",
            "device": "cpu",
            "max_batch_size": None,
            "mode": "mask",
            "latency_batches": 0,
        }
    )
    assert spec.pretrained == "/m" and spec.pruner == "pdrop" and spec.mode == "mask"
    assert spec.pruner_kwargs == {"layers": [1, 2], "keep_ratios": [0.5, 0.25]}
    assert spec.batch_size == 3 and spec.latency_batches == 0 and spec.device == "cpu"
    assert spec.label() == "pdrop (layers=[1, 2], keep_ratios=[0.5, 0.25])"
    assert parse_model_args({"pretrained": "/m"}).label() == "unpruned"
    assert parse_model_args({"pretrained": "/m", "pruner": "fastv", "budget_tokens": 64}).label() == "fastv @ 64 tokens"
    assert parse_model_args({"export": "/e/run1/export"}).label() == "export (export)"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pruner": "fastv"}, "needs a model: model_args pretrained="),
        ({"pretrained": "/m", "pruner": "nosuch"}, "unknown pruner 'nosuch'; available pruners: .*fastv"),
        ({"pretrained": "/m", "pruner": "fastv", "pruner.keep": 3}, r"has no argument\(s\) \['keep'\]"),
        ({"pretrained": "/m", "pruner.layer": 2}, "need pruner=<name>"),
        ({"export": "/e", "pruner": "fastv"}, "export= brings its own pruner"),
        ({"pretrained": "/m", "modee": "drop"}, "no model_args key 'modee'"),
        ({"pretrained": "/m", "mode": "soft"}, r"mode='soft' is not one of \('drop', 'mask'\)"),
        ({"pretrained": "/m", "batch_size": "0"}, "batch_size='0' must be a positive integer"),
        ({"pretrained": "/m", "pruner": "pdrop", "pruner.layers": "[1,"}, "cannot read the model_args value"),
    ],
)
def test_bad_model_args_name_the_key_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parse_model_args(kwargs)


def brute_force_macs(n: int, s: DecoderShape) -> int:
    """Prefill MACs of one layer with n tokens, from the formula in atp/metrics/accounting.py's docstring."""
    return (
        n * s.hidden * s.head_dim * (2 * s.heads + 2 * s.kv_heads)
        + 2 * n * n * s.heads * s.head_dim
        + 3 * n * s.hidden * s.mlp
    )


def test_task_accounting_equals_a_recomputation_from_the_stats(model_factory):
    model = model_factory()
    config = model.config.text_config
    shape, layers = DecoderShape.from_config(config), config.num_hidden_layers
    account = TaskAccounting(layers)
    all_tokens, all_visual, unpruned = [], [], []
    for seed, lengths in enumerate([[(2, 3), (5, 1), (0, 4)], [(3, 3)]]):
        batch = make_batch(lengths, seed=seed)
        atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25))
        with torch.no_grad():
            model(**batch)
        stats = atp.stats(model)
        atp.remove(model)
        account.add_pruned(config, stats, doc_ids=[f"{seed}-{b}" for b in range(len(lengths))])
        all_tokens += stats.tokens.tolist()
        all_visual += stats.visual_tokens.tolist()
        unpruned += [[n] * layers for n in stats.input_tokens.tolist()]  # every layer sees every token
    summary = account.summary(latency=None)
    flops = sum(brute_force_macs(n, shape) for row in all_tokens for n in row)
    flops_unpruned = sum(brute_force_macs(n, shape) for row in unpruned for n in row)
    kv = sum(n for row in all_tokens for n in row)
    kv_unpruned = sum(n for row in unpruned for n in row)
    assert summary["num_samples"] == 4
    assert summary["flops_ratio"] == pytest.approx(flops / flops_unpruned, rel=1e-12)
    assert summary["kv_ratio"] == pytest.approx(kv / kv_unpruned, rel=1e-12)  # bytes per token cancel
    assert summary["avg_visual_tokens"] == pytest.approx(sum(sum(r) / layers for r in all_visual) / 4)
    assert summary["input_visual_tokens"] == pytest.approx(sum(r[0] for r in all_visual) / 4)
    assert summary["visual_tokens_per_layer"] == pytest.approx(
        [sum(r[i] for r in all_visual) / 4 for i in range(layers)]
    )
    assert summary["latency_ratio"] is None  # pruned, not measured
    assert [s["doc_id"] for s in account.samples] == ["0-0", "0-1", "0-2", "1-0"]
    with pytest.raises(ValueError, match="atp.stats is from another call"):
        account.add_pruned(config, stats, doc_ids=["a", "b"])


def test_unpruned_accounting_counts_every_image_token_in_every_layer():
    account = TaskAccounting(num_layers=3)
    account.add_unpruned(torch.tensor([16, 0]), doc_ids=[0, 1])
    summary = account.summary(latency=None)
    assert summary["avg_visual_tokens"] == 8.0 and summary["input_visual_tokens"] == 8.0
    assert summary["flops_ratio"] == summary["kv_ratio"] == summary["latency_ratio"] == 1.0
    assert summary["visual_tokens_per_layer"] == [8.0, 8.0, 8.0]
    with pytest.raises(ValueError, match="no samples"):
        TaskAccounting(num_layers=3).summary(None)


def test_shapes_task_scores_the_first_word_as_evaluate_py():
    doc = {"answer": "red"}
    assert process_results(doc, ["Red. circle"])["exact_match"] == 1.0
    assert process_results(doc, ["blue red"])["exact_match"] == 0.0
    assert process_results(doc, [""])["exact_match"] == 0.0


def write_run(folder, method, budget, scores, accounting):
    (folder / "model").mkdir(parents=True)
    results = {"results": {t: {"alias": t, f"{m},none": v} for t, (m, v) in scores.items()}}
    results["results"]["suite"] = {"alias": "suite"}
    results["group_subtasks"] = {"suite": list(scores), **{t: [] for t in scores}}
    (folder / "model" / "2026-01-01T00-00-00_results.json").write_text(json.dumps(results))
    spec = {**ModelSpec(pretrained="/m").__dict__, "method": method, "budget_tokens": budget}
    (folder / "atp_accounting_2026-01-01T00-00-01.json").write_text(json.dumps({"atp": spec, "tasks": accounting}))


def account(tokens, flops, latency):
    return {
        "num_samples": 10,
        "avg_visual_tokens": tokens,
        "input_visual_tokens": 576.0,
        "flops_ratio": flops,
        "kv_ratio": flops,
        "visual_tokens_per_layer": [],
        "latency_ratio": latency,
        "latency_low": None,
        "latency_high": None,
        "latency_rounds": 0,
    }


def test_suite_table_merges_runs_in_the_budgets_format(tmp_path):
    write_run(
        tmp_path / "unpruned",
        "unpruned",
        None,
        {"pope": ("pope_f1_score", 0.8), "mme": ("mme_perception_score", 1500.0)},
        {"pope": account(576.0, 1.0, 1.0), "mme": account(576.0, 1.0, 1.0)},
    )
    write_run(
        tmp_path / "fastv_64",
        "fastv @ 64 tokens",
        64,
        {"pope": ("pope_f1_score", 0.6), "mme": ("mme_perception_score", 1000.0)},
        {"pope": account(100.0, 0.3, 0.5), "mme": account(120.0, 0.5, 0.7)},
    )
    rows, retention = merge([tmp_path / "fastv_64", tmp_path / "unpruned"])
    assert [r.method for r in rows] == ["unpruned", "fastv @ 64 tokens"]
    fastv = rows[1]
    assert fastv.accuracy_by_type == pytest.approx({"mme": 0.5, "pope": 0.6})
    assert fastv.accuracy == pytest.approx(0.55) and rows[0].accuracy == pytest.approx((0.8 + 0.75) / 2)
    assert fastv.avg_visual_tokens == 110.0 and fastv.flops_ratio == pytest.approx(0.4)
    assert fastv.latency_ratio == pytest.approx(0.6)  # median of 0.5 and 0.7
    assert retention[1] == f"- fastv @ 64 tokens: retention {100 * 0.55 / 0.775:.1f} %"
    table = markdown_table(rows)
    assert "| fastv @ 64 tokens | 55.0 | 50.0 | 60.0 | 110.0 | 576.0 | 40.0 % | 40.0 % | 0.60x | - |" in table
    (tmp_path / "unpruned" / "atp_accounting_2026-01-01T00-00-01.json").write_text(
        json.dumps({"atp": {"method": "unpruned"}, "tasks": {"pope": account(1, 1, 1)}})
    )
    with pytest.raises(ValueError, match=r"no entry for task\(s\) \['mme'\]"):
        merge([tmp_path / "unpruned"])
