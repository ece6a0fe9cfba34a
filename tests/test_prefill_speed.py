"""benchmarks/prefill_speed.py in its smoke mode: the tables' structure, and every analytic number
against a recomputation from atp.stats by the documented FLOPs rule written as plain loops."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prefill_speed", ROOT / "benchmarks/prefill_speed.py")
prefill_speed = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = prefill_speed  # dataclasses look their module up
spec.loader.exec_module(prefill_speed)

LAYERS = 4
ROW_NAMES = [
    "stock HF",
    "atp runtime, none",
    "fastv K=2, atp (SDPA + probe)",
    "fastv K=2, reference scoring (eager, output_attentions)",
    "pdrop",
    "atp (fixed thresholds)",
]


@pytest.fixture(scope="module")
def results():
    return {
        name: prefill_speed.run_stack(prefill_speed.build_stack(name, smoke=True), LAYERS, repeats=1)
        for name in prefill_speed.STACKS
    }


def brute_force_flops(config, tokens_per_layer: list[int]) -> float:
    """docs/methods.md's accounting: 2 x (n d hd (2 h_q + 2 h_kv) + 2 n^2 h_q hd + 3 n d m) per layer."""
    d, m, h_q = config.hidden_size, config.intermediate_size, config.num_attention_heads
    h_kv = config.num_key_value_heads
    hd = d // h_q
    total = 0
    for n in tokens_per_layer:
        total += 2 * (n * d * hd * (2 * h_q + 2 * h_kv) + 2 * n * n * h_q * hd + 3 * n * d * m)
    return total


def table_body(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(prefill_speed.COLUMNS)
    assert set(lines[1]) <= set("|-")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("name", prefill_speed.STACKS)
def test_table_rows_match_atp_stats_and_the_documented_flops_rule(results, name):
    result = results[name]
    rows = prefill_speed.table_rows(result)
    assert [r.name for r in rows] == ROW_NAMES
    base = statistics.median(result.rows[0].seconds)
    for measured in result.rows:  # the language model's span lies inside the whole forward
        assert all(0 < lm <= whole for lm, whole in zip(measured.seconds, measured.forward_seconds))
    num_visual = result.stack.num_visual
    for row, measured in zip(rows, result.rows):
        assert row.measured == pytest.approx(base / statistics.median(measured.seconds))
        if measured.stats is None:  # the stock model: nothing pruned
            assert (row.analytic, row.kv_ratio, row.visual_tokens) == (1.0, 1.0, num_visual)
            continue
        stats = measured.stats
        tokens = stats.tokens[0].tolist()
        unpruned = [int(stats.input_tokens[0])] * LAYERS
        config = result.text_config
        expected = brute_force_flops(config, unpruned) / brute_force_flops(config, tokens)
        assert row.analytic == pytest.approx(expected, rel=1e-12)
        assert row.kv_ratio == pytest.approx(sum(tokens) / sum(unpruned), rel=1e-12)
        assert row.visual_tokens == pytest.approx(sum(stats.visual_tokens[0].tolist()) / LAYERS)
        assert row.overhead == pytest.approx(100 * statistics.median(measured.scoring) / base)
        layer_time = {n: statistics.median(t) for n, t in result.layer_seconds.items()}
        full = layer_time[int(stats.input_tokens[0])]
        assert row.stock_layers == pytest.approx(LAYERS * full / sum(layer_time[n] for n in tokens), rel=1e-12)
    kept = round(0.25 * num_visual)
    by_name = {r.name: r for r in result.rows}
    for fastv in ROW_NAMES[2:4]:  # both FastV rows keep 25 % from layer 2 on
        assert by_name[fastv].stats.visual_tokens[0].tolist() == [num_visual] * 2 + [kept] * 2
    assert by_name["pdrop"].stats.visual_tokens[0].tolist() == [num_visual, 2 * kept, kept, kept // 2]


@pytest.mark.parametrize("name", prefill_speed.STACKS)
def test_printed_table_is_the_rows(results, name):
    result = results[name]
    text = prefill_speed.format_table(result, load=(1.0, 2.0, 3.0))
    body = table_body(text)
    rows = prefill_speed.table_rows(result)
    assert [cells[0] for cells in body] == ROW_NAMES
    for cells, row in zip(body, rows):
        assert cells[1] == row.attn
        assert float(cells[2]) == pytest.approx(row.visual_tokens, abs=0.05)
        assert float(cells[5].rstrip("x")) == pytest.approx(row.analytic, abs=0.005)
        assert float(cells[6]) == pytest.approx(row.measured / row.analytic, abs=0.0005)
        assert float(cells[7].rstrip("x")) == pytest.approx(row.stock_layers, abs=0.005)
        assert float(cells[8]) == pytest.approx(row.measured / row.stock_layers, abs=0.0005)
        assert float(cells[9].rstrip("x")) == pytest.approx(row.cpu_measured, abs=0.005)
        assert (cells[11] == "-") == (row.overhead is None)
    common, kept = prefill_speed.kept_agreement(result)
    assert f"both keep {kept} tokens, {common} of them the same" in text
    assert "load average 1.00 / 2.00 / 3.00" in text


def test_llava_next_stack_is_a_real_anyres_layout(results):
    """The NeXT stack is a LlavaNextForConditionalGeneration whose image placeholders are what the stock
    model packs (base view, unpadded crop grid, one newline per grid row) and whose visual tokens are
    the content tokens: the runtime never counts or prunes the newlines."""
    result = results["llava_next"]
    model = result.stack.build(1, "sdpa")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    inputs = result.stack.inputs
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output[0]
    newline = (packed == model.model.image_newline.to(packed.dtype)).all(1)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == packed.shape[0]
    assert 0 < int(newline.sum()) and result.stack.num_visual == packed.shape[0] - int(newline.sum())
    for row in result.rows[1:]:
        assert int(row.stats.num_visual[0]) == result.stack.num_visual


def test_reference_fastv_reads_eager_weights_and_keeps_fastvs_tokens(results):
    """The eager-reference row scores from HF's eager attention weights; on these tiny models its
    kept tokens equal atp's probe-based FastV (the same rule, the same layer)."""
    for result in results.values():
        common, kept = prefill_speed.kept_agreement(result)
        assert kept == round(0.25 * result.stack.num_visual)
        assert common == kept


def test_cli_smoke_prints_one_table_per_stack(capsys):
    prefill_speed.main(["--smoke", "--stack", "llava15"])
    out = capsys.readouterr().out
    assert out.count("| method | attention |") == 1
    assert "SMOKE (llava15" in out
