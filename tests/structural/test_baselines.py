"""Two-stage baselines on a tiny GQA Llama: FLAP's, LLM-Pruner's and Wanda-sp's scores against
brute-force recomputations written as plain loops from the documented rules, and every method
within 1 % of its parameter budget."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from atp.structural.allocation import within_budget
from atp.structural.baselines import METHODS, baseline_mask, baseline_scores
from atp.structural.groups import decoder_parameters
from tests.structural.test_export import tiny_decoder


def calibration_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 64, (2, 10), generator=generator)} for _ in range(2)]


def captured_inputs(model, batches) -> list[dict[str, list[list[float]]]]:
    """Per layer, every token's input row to o_proj and down_proj, as plain lists."""
    rows = [{"o": [], "down": []} for _ in model.model.layers]
    handles = []
    for index, layer in enumerate(model.model.layers):
        for name, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):

            def keep(_m, args, index=index, name=name):
                rows[index][name].extend(args[0].detach().double().reshape(-1, args[0].shape[-1]).tolist())

            handles.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return rows


def plain_standardise(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / std for v in values]


def plain_group(values: list[float], count: int, reduce: str) -> list[float]:
    width = len(values) // count
    out = []
    for g in range(count):
        part = values[g * width : (g + 1) * width]
        out.append(sum(part) if reduce == "sum" else sum(part) / width)
    return out


def test_flap_scores_match_plain_loops():
    model = tiny_decoder("llama")
    batches = calibration_batches()
    scores = baseline_scores(model, "flap", batches)
    inputs = captured_inputs(model, batches)
    for index, layer in enumerate(model.model.layers):
        expected = {}
        for name, linear in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            x, w = inputs[index][name], linear.weight.detach().double().tolist()
            metric = []
            for j in range(len(x[0])):
                column = [row[j] for row in x]
                mean = sum(column) / len(column)
                var = sum((v - mean) ** 2 for v in column) / len(column)
                norm = sum(w[i][j] ** 2 for i in range(len(w)))
                metric.append((var * norm) ** 2 if name == "o" else var * norm)
            expected[name] = plain_standardise(metric)
        torch.testing.assert_close(
            scores.attention[index], torch.tensor(plain_group(expected["o"], 2, "mean"), dtype=torch.float64)
        )
        torch.testing.assert_close(scores.channels[index], torch.tensor(expected["down"], dtype=torch.float64))


def test_wanda_sp_scores_match_plain_loops():
    model = tiny_decoder("llama")
    batches = calibration_batches()
    uniform = baseline_scores(model, "wanda_sp", batches)
    global_ = baseline_scores(model, "wanda_sp_global", batches)
    inputs = captured_inputs(model, batches)
    for index, layer in enumerate(model.model.layers):
        metric = {}
        for name, linear in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            x, w = inputs[index][name], linear.weight.detach().double().tolist()
            values = []
            for j in range(len(x[0])):
                norm = math.sqrt(sum(row[j] ** 2 for row in x))
                values.append(sum(abs(w[i][j]) * norm for i in range(len(w))) / len(w))
            metric[name] = values
        torch.testing.assert_close(uniform.attention[index], torch.tensor(plain_group(metric["o"], 2, "sum")).double())
        torch.testing.assert_close(uniform.channels[index], torch.tensor(metric["down"]).double())
        standard = plain_group(plain_standardise(metric["o"]), 2, "mean")
        torch.testing.assert_close(global_.attention[index], torch.tensor(standard).double())
        torch.testing.assert_close(global_.channels[index], torch.tensor(plain_standardise(metric["down"])).double())


def test_llm_pruner_taylor_scores_match_plain_loops_and_leave_the_model_untouched():
    model = tiny_decoder("llama")
    reference = copy.deepcopy(model)
    batches = calibration_batches()
    scores = baseline_scores(model, "llm_pruner", batches)
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    weights = []
    for layer in reference.model.layers:
        weights.append({n: getattr(layer.self_attn if n[0] in "qkvo" else layer.mlp, n).weight for n in names})
    loss = sum(reference(input_ids=b["input_ids"], labels=b["input_ids"]).loss for b in batches)
    flat = [w for layer in weights for w in layer.values()]
    grads = torch.autograd.grad(loss, flat)
    grad_of = {id(w): g for w, g in zip(flat, grads)}
    for index, layer in enumerate(weights):
        prod = {}
        for n, w in layer.items():
            wl, gl = w.detach().double().tolist(), grad_of[id(w)].double().tolist()
            prod[n] = [[abs(wl[r][c] * gl[r][c]) for c in range(len(wl[0]))] for r in range(len(wl))]
        heads = []
        for g in range(2):  # 2 groups: 2 query heads of 8 dims each, 1 key/value head of 8 dims
            total = 0.0
            for r in range(g * 16, (g + 1) * 16):
                total += sum(prod["q_proj"][r])
                total += sum(prod["o_proj"][i][r] for i in range(len(prod["o_proj"])))
            for r in range(g * 8, (g + 1) * 8):
                total += sum(prod["k_proj"][r]) + sum(prod["v_proj"][r])
            heads.append(total)
        channels = []
        for c in range(48):
            down = sum(prod["down_proj"][i][c] for i in range(len(prod["down_proj"])))
            channels.append(sum(prod["gate_proj"][c]) + sum(prod["up_proj"][c]) + down)
        torch.testing.assert_close(scores.attention[index], torch.tensor(heads, dtype=torch.float64))
        torch.testing.assert_close(scores.channels[index], torch.tensor(channels, dtype=torch.float64))


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.5])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_meets_its_parameter_budget_within_one_percent(method, ratio):
    model = tiny_decoder("qwen2" if method == "magnitude" else "llama")
    budget = (1 - ratio) * decoder_parameters(model.config)
    mask = baseline_mask(model, method, ratio, calibration_batches())
    assert within_budget(model.config, mask, budget, 0.01), decoder_parameters(model.config, mask) / budget
    assert all(bool(m.any()) for m in mask.attention + mask.channels)
    if method in ("wanda_sp", "llm_pruner", "magnitude", "random"):  # uniform: floor(ratio * G) groups go
        assert [int(m.sum()) for m in mask.attention] == [2 - int(ratio * 2)] * 3
        assert len({int(m.sum()) for m in mask.channels}) == 1


def test_uniform_and_global_allocations_keep_the_highest_scores():
    model = tiny_decoder("llama")
    batches = calibration_batches()
    for method in ("wanda_sp", "flap"):
        scores = baseline_scores(model, method, batches)
        mask = baseline_mask(model, method, 0.4, batches)
        for values, kept in zip(scores.channels, mask.channels):
            if method == "wanda_sp":  # within a layer
                assert float(values[kept].min()) >= float(values[~kept].max())
        if method == "flap":  # across layers (channels all cost the same: once one does not fit, none does)
            kept_min = min(float(v[k].min()) for v, k in zip(scores.channels, mask.channels))
            removed_max = max(float(v[~k].max()) for v, k in zip(scores.channels, mask.channels) if bool((~k).any()))
            assert kept_min >= removed_max


def test_baseline_errors_name_the_value_and_the_fix():
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match="baseline method must be one of"):
        baseline_mask(model, "sparsegpt", 0.4)
    with pytest.raises(ValueError, match="flap needs calibration batches"):
        baseline_mask(model, "flap", 0.4)
