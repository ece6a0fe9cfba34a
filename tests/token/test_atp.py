"""The learned ATP module: scores against brute force, decisions, soft masks and losses."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.models import get_adapter
from atp.token.atp import (
    QUANTILES,
    ATPPruner,
    atp_losses,
    content_features,
    default_layers,
    sap_scores,
    score_statistics,
    tokens_per_layer,
)
from tests.conftest import IMAGE, make_batch

RAGGED = [(2, 3), (6, 1), (1, 7)]


def brute_force_scores(model, batch, layer: int, grad: bool = False):
    """S_self, S_cross (rescaled) per sample from HF eager attentions of layer `layer - 1`."""
    model.set_attn_implementation("eager")
    with torch.enable_grad() if grad else torch.no_grad():
        probs = model(**batch, output_attentions=True).attentions[layer - 1].mean(1)
    results = []
    for b in range(probs.shape[0]):
        ids, real = batch["input_ids"][b], batch["attention_mask"][b].bool()
        visual = ((ids == IMAGE) & real).nonzero()[:, 0].tolist()
        instruction = [i for i in range(len(ids)) if real[i] and i > visual[-1]]
        s_self = torch.zeros(len(visual))
        for n, j in enumerate(visual):
            queries = [i for i in visual if i > j]
            s_self[n] = probs[b, queries, j].mean() if queries else 0.0
        s_cross = torch.stack([probs[b, instruction, j].mean() for j in visual])
        results.append((s_self / s_self.max(), s_cross / s_cross.max(), visual))
    return results


def recording(pruner):
    calls = []
    original = pruner.scores
    pruner.scores = lambda ctx: calls.append((ctx.layer, ctx.visual.clone(), *original(ctx))) or calls[-1][2:]
    return calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_elements", [1, 2**21])  # one query row at a time, or all at once
def test_redundancy_scores_match_brute_force(model_factory, monkeypatch, attn, chunk_elements):
    monkeypatch.setattr(atp.runtime.probe, "QUERY_CHUNK_ELEMENTS", chunk_elements)
    model = model_factory()
    batch = make_batch(RAGGED, seed=2)
    reference = brute_force_scores(model, batch, layer=2)
    model.set_attn_implementation(attn)
    pruner = ATPPruner(num_layers=4, layers=[2]).eval()
    calls = recording(pruner)
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        model(**batch)
    layer, visual, s_self, s_cross, s_spatial = calls[0]
    assert layer == 2
    for b, (ref_self, ref_cross, positions) in enumerate(reference):
        assert_close(s_self[b, positions], ref_self, rtol=1e-4, atol=1e-6)
        assert_close(s_cross[b, positions], ref_cross, rtol=1e-4, atol=1e-6)
        assert visual[b].nonzero()[:, 0].tolist() == positions


@pytest.mark.parametrize("score_gradients", [False, True])
def test_score_gradients_reach_the_probed_layer_as_through_eager_attention(model_factory, score_gradients):
    """With score_gradients, d(any function of S_self, S_cross)/d(probed layer's q/k weights)
    equals the gradient through HF's eager attention probabilities; without, no gradient."""
    model = model_factory()
    model.requires_grad_(False)
    attn = get_adapter(model).layers[1].self_attn
    trained = [attn.q_proj.weight, attn.k_proj.weight]
    for weight in trained:
        weight.requires_grad_(True)
    batch = make_batch(RAGGED, seed=2)
    generator = torch.Generator().manual_seed(0)
    coefficients = [torch.randn(2, 16, generator=generator) for _ in RAGGED]

    def objective(per_sample):  # [(s_self, s_cross) per sample, visual tokens only]
        terms = [
            (c[0] * s_self).sum() + (c[1] * s_cross).sum() for c, (s_self, s_cross) in zip(coefficients, per_sample)
        ]
        return sum(terms)

    reference = brute_force_scores(model, batch, layer=2, grad=True)
    expected = torch.autograd.grad(objective([(a, b) for a, b, _ in reference]), trained)

    model.set_attn_implementation("sdpa")
    pruner = ATPPruner(num_layers=4, layers=[2], score_gradients=score_gradients).train()
    calls = recording(pruner)
    atp.apply(model, pruner, mode="mask")
    model(**batch)
    _, _, s_self, s_cross, _ = calls[0]
    assert s_self.requires_grad == s_cross.requires_grad == score_gradients
    if score_gradients:
        per_sample = [(s_self[b, positions], s_cross[b, positions]) for b, (_, _, positions) in enumerate(reference)]
        for got, want in zip(torch.autograd.grad(objective(per_sample), trained), expected):
            assert want.abs().sum() > 0
            assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sap", [True, False, [2], [1]])
def test_hard_decision_is_the_threshold_rule(model_factory, sap):
    model = model_factory()
    batch = make_batch(RAGGED, seed=2)
    reference = brute_force_scores(model, batch, layer=2)
    model.set_attn_implementation("sdpa")
    pruner = ATPPruner(num_layers=4, layers=[1, 2] if sap == [1] else [2], sap=sap).eval()
    with_sap = sap is True or sap == [2]  # the module before layer 2 has the spatial branch
    with torch.no_grad():  # thresholds in the middle of the score range, so the rule matters
        pruner.modules_by_layer["2"].redundancy_head.bias.fill_(1.8)  # theta_r 0.86
        pruner.modules_by_layer["2"].spatial_head.bias.fill_(-0.4)  # theta_s 0.40: the stride-2 grid
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        model(**batch)
    spatial = sap_scores(torch.arange(16)[None], (4, 4))[0]
    spatial_only = 0  # tokens only the SAP branch keeps
    for b, (ref_self, ref_cross, _) in enumerate(reference):
        theta_r, theta_s = pruner.thresholds[2][b].tolist()
        redundant = (ref_self + ref_cross) / 2 > theta_r
        keep = redundant | ((spatial > theta_s) & with_sap)
        spatial_only += int((~redundant & (spatial > theta_s)).sum())
        assert 0 < int(keep.sum()) < 16
        assert atp.stats(model).kept[2][b].tolist() == keep.nonzero()[:, 0].tolist()
    assert spatial_only > 0


def test_sap_must_name_module_layers():
    with pytest.raises(ValueError, match=r"sap=\[2\] names layers without a module; modules sit before \[1, 3\]"):
        ATPPruner(num_layers=4, layers=[1, 3], sap=[2])


def test_sap_hierarchy_on_llava_grid():
    score = sap_scores(torch.arange(576)[None], (24, 24))[0].view(24, 24)
    assert score[0, 0] == 1.0 and score[8, 16] == 1.0 and score[4, 8] == 0.75 and score[2, 6] == 0.5
    assert score[1, 0] == 0.25 and score[23, 23] == 0.25
    assert [int((score == v).sum()) for v in (1.0, 0.75, 0.5, 0.25)] == [9, 36 - 9, 144 - 36, 576 - 144]
    # a second image in the same sample restarts the grid; non-visual slots score 0
    assert sap_scores(torch.tensor([[-1, 576, 577]]), (24, 24)).tolist() == [[0.0, 1.0, 0.25]]


def test_initial_modules_keep_everything(model_factory):
    model = model_factory()
    atp.apply(model, ATPPruner(num_layers=4, layers=[1, 3]).eval(), mode="drop")
    with torch.no_grad():
        model(**make_batch(RAGGED))
    assert (atp.stats(model).visual_tokens == 16).all()


@pytest.mark.parametrize("content", [False, True])
def test_drop_and_eval_mask_agree(model_factory, content):
    model = model_factory()
    batch = make_batch(RAGGED)
    pruner = ATPPruner(num_layers=4, layers=[1, 3], content_features=content).eval()
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.0)
            module.spatial_head.bias.fill_(0.6)
    logits, kept = {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, pruner, mode=mode)
        with torch.no_grad():
            logits[mode] = model(**batch).logits[:, -1]
        kept[mode] = atp.stats(model).kept
    assert kept["drop"].keys() == {1, 3}
    for layer in kept["drop"]:
        for a, b in zip(kept["drop"][layer], kept["mask"][layer]):
            assert torch.equal(a, b)
    assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("instance", [True, False, ["redundancy"], ["spatial"]])
def test_thresholds_differ_per_instance_only_where_instance_wise(model_factory, instance):
    """The paper's MLP maps each instance's statistics to its own thresholds; a threshold that is
    not instance-wise is the MLP's output for a zero input, the same for every instance."""
    model = model_factory()
    torch.manual_seed(0)
    pruner = ATPPruner(num_layers=4, layers=[1, 3], instance_thresholds=instance).eval()
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            for head in (module.redundancy_head, module.spatial_head):
                head.weight.normal_(std=0.1)
                head.bias.fill_(0.0)
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        model(**make_batch(RAGGED))
    assert pruner.thresholds.keys() == {1, 3}
    for layer, thresholds in pruner.thresholds.items():  # [B, 2]: (theta_r, theta_s)
        module = pruner.modules_by_layer[str(layer)]
        constant = torch.cat(module(torch.zeros(1, module.trunk[0].in_features)))
        for column, kind in enumerate(("redundancy", "spatial")):
            if instance is True or kind in (instance or []):
                assert (thresholds[:, column] - thresholds[0, column]).abs().amax() > 1e-3, (layer, kind)
            else:
                expected = constant[column].expand(len(thresholds))
                assert_close(thresholds[:, column], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"instance_thresholds=\['theta'\] names unknown thresholds"):
        ATPPruner(num_layers=4, layers=[1, 3], instance_thresholds=["theta"])


def training_losses(model, pruner, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask-mode training forward on RAGGED: (LM loss on the last two tokens, ATP plus
    target losses)."""
    atp.apply(model, pruner, mode="mask")
    batch = make_batch(RAGGED, padding=padding)
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    labels[:, :-2] = -100
    out = model(**batch, labels=labels)
    num_visual = atp.stats(model).num_visual
    losses = atp_losses(pruner, num_visual, target_tokens=0.25 * num_visual.float())
    return out.loss, losses["atp"] + losses["target"]


def training_backward(model, pruner, padding: str) -> torch.Tensor:
    """`training_losses`, summed and backpropagated; returns the total loss."""
    loss = sum(training_losses(model, pruner, padding))
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(
    ("straight_through", "content", "sap"),
    [(False, True, True), (True, True, True), (False, False, True), (True, True, False), (True, True, [1])],
)
def test_soft_training_trains_every_module(model_factory, straight_through, content, sap):
    model = model_factory()
    for p in model.parameters():
        p.requires_grad_(False)
    pruner = ATPPruner(
        num_layers=4, layers=[1, 3], straight_through=straight_through, content_features=content, sap=sap
    )
    pruner.train()
    assert pruner.modules_by_layer["1"].trunk[0].in_features == (19 if content else 16)
    training_backward(model, pruner, padding="right")
    for name, param in pruner.named_parameters():
        module_layer = int(name.split(".")[1])
        if "spatial_head" in name and not (sap is True or module_layer in (sap or [])):  # theta_s decides nothing
            assert param.grad is None or not param.grad.any(), name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def module_gradients(model, pruner, parts: str) -> dict[str, torch.Tensor]:
    """The threshold MLPs' gradients of `training_losses` from the LM loss (`parts="lm"`) or
    the ATP plus target losses (`parts="budget"`)."""
    pruner.zero_grad(set_to_none=False)
    lm, budget = training_losses(model, pruner, padding="left")
    (lm if parts == "lm" else budget).backward()
    return {
        name: torch.zeros_like(param) if param.grad is None else param.grad.clone()
        for name, param in pruner.named_parameters()
    }


PARTS = ("lm", "budget")


def same_weight_pruners(model_factory, variants: dict[str, dict], layers: tuple[int, ...] = (1, 3)):
    """(frozen tiny model, {name: pruner}): training-mode ATP pruners built with the keyword
    arguments `variants[name]` and the same MLP weights (the first's; a missing budget offset
    stays zero), thresholds near the middle of the scores so that the masks have gradients."""
    model = model_factory()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    pruners = {name: ATPPruner(num_layers=4, layers=list(layers), **kw).train() for name, kw in variants.items()}
    first = next(iter(pruners.values()))
    for pruner in pruners.values():
        missing, unexpected = pruner.load_state_dict(first.state_dict(), strict=False)
        assert all(key.endswith(".budget_offset") for key in missing + unexpected), (missing, unexpected)
        with torch.no_grad():
            for module in pruner.modules_by_layer.values():
                module.redundancy_head.bias.fill_(0.0)
                module.spatial_head.bias.fill_(0.3)
    return model, pruners


def paired_pruners(model_factory, instance, mode: str):
    """(frozen tiny model, {"all": pruner, mode: pruner}), straight-through, `same_weight_pruners`."""
    common = {"straight_through": True, "instance_thresholds": instance}
    return same_weight_pruners(model_factory, {name: {**common, "budget_gradients": name} for name in ("all", mode)})


def paired_gradients(model, pruners) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(mode, "lm" | "budget") -> the MLPs' gradients; both pruners must compute the same values."""
    grads = {(mode, part): module_gradients(model, pruner, part) for mode, pruner in pruners.items() for part in PARTS}
    first, second = pruners.values()
    for layer in (1, 3):
        assert torch.equal(first.soft_counts[layer], second.soft_counts[layer])
        assert torch.equal(first.thresholds[layer], second.thresholds[layer])
    return grads


@pytest.mark.parametrize("instance", [True, False, ["redundancy"]])
def test_level_budget_gradients_move_only_the_common_level(model_factory, instance):
    """budget_gradients="level" changes no value and no LM gradient. The budget losses see each
    instance-wise threshold logit as the batch mean plus a constant, so (chain rule) a head's
    weight gets its bias's gradient times the batch mean of the head's input; "all" differs."""
    model, pruners = paired_pruners(model_factory, instance, "level")
    head_inputs = {}  # the trunk output [B, hidden] each head read first: the one for the instance features

    def record(name: str):
        def hook(module, args, output) -> None:
            head_inputs.setdefault(name, args[0].detach())

        return hook

    for name, module in pruners["level"].named_modules():
        if name.endswith("_head"):
            module.register_forward_hook(record(name))
    grads = paired_gradients(model, pruners)
    kinds = {"redundancy", "spatial"} if instance is True else set(instance or [])
    for name in grads["all", "lm"]:
        assert_close(grads["level", "lm"][name], grads["all", "lm"][name], rtol=0, atol=0)
        level, full = grads["level", "budget"][name], grads["all", "budget"][name]
        kind = "redundancy" if "redundancy_head" in name else "spatial" if "spatial_head" in name else None
        if name.endswith("head.bias") or kind not in kinds and (kind is not None or not kinds):
            assert_close(level, full, rtol=1e-5, atol=1e-9)  # the level's gradient is the sum over instances
        elif name.endswith("head.weight"):
            bias_grad = grads["level", "budget"][name.replace("weight", "bias")]
            expected = bias_grad[:, None] * head_inputs[name.rsplit(".", 1)[0]].mean(0, keepdim=True)
            assert_close(level, expected, rtol=1e-4, atol=1e-9)
            assert (level - full).abs().amax() > 1e-3 * full.abs().amax(), name
    with pytest.raises(ValueError, match="budget_gradients must be one of 'all', 'level', 'offset', got 'bias'"):
        ATPPruner(num_layers=4, layers=[1, 3], budget_gradients="bias")


@pytest.mark.parametrize("instance", [True, ["redundancy"]])
def test_offset_budget_gradients_train_only_the_offsets(model_factory, instance):
    """budget_gradients="offset" adds a per-module logit offset (zero: the values of "all").
    The budget losses train only it, and an offset shifts every instance's logit as its head's
    bias does, so its gradients (budget and LM) are the "all" path's head-bias gradients; the
    MLP's LM gradients are those of "all", its budget gradients zero."""
    model, pruners = paired_pruners(model_factory, instance, "offset")
    grads = paired_gradients(model, pruners)
    for layer in ("1", "3"):
        offset = f"modules_by_layer.{layer}.budget_offset"
        for part in PARTS:
            biases = [f"modules_by_layer.{layer}.{kind}_head.bias" for kind in ("redundancy", "spatial")]
            heads = [grads["all", part][bias] for bias in biases]
            assert_close(grads["offset", part][offset], torch.cat(heads), rtol=1e-5, atol=1e-9)
        assert grads["offset", "budget"][offset].abs().amin() > 0
    for name in grads["all", "lm"]:
        assert_close(grads["offset", "lm"][name], grads["all", "lm"][name], rtol=0, atol=0)
        assert not grads["offset", "budget"][name].any(), name
        assert grads["all", "budget"][name].any() or "trunk" not in name, name


def hard_keep_counts(calls, thresholds) -> dict[int, torch.Tensor]:
    """layer -> [B] visual tokens every module so far keeps by the threshold rule, recomputed
    from `recording`'s scores of one forward and the thresholds the pruner used."""
    keep, counts = None, {}
    for layer, visual, s_self, s_cross, s_spatial in calls:
        theta_r, theta_s = thresholds[layer].unbind(1)
        rule = ((s_self + s_cross) / 2 > theta_r[:, None]) | (s_spatial > theta_s[:, None])
        keep = visual & rule if keep is None else keep & rule
        counts[layer] = keep.sum(1).float()
    return counts


@pytest.mark.parametrize("budget_gradients", ["all", "offset"])
def test_hard_budget_count_reads_the_inference_keeps_under_soft_masks(model_factory, budget_gradients):
    """budget_count="hard" with soft masks: the LM sees the soft masks (the values and LM gradients
    of budget_count="mask"), the budget losses read the hard keep counts (recomputed from the
    scores), and with one module their gradients are those of straight-through masks."""
    variants = {
        "hard": {"budget_count": "hard"},
        "soft": {"budget_count": "mask"},
        "straight": {"budget_count": "mask", "straight_through": True},
    }
    for kwargs in variants.values():
        kwargs["budget_gradients"] = budget_gradients
    model, pruners = same_weight_pruners(model_factory, variants)
    calls = recording(pruners["hard"])
    lm = {name: module_gradients(model, pruners[name], "lm") for name in ("hard", "soft")}
    for name in lm["soft"]:
        assert_close(lm["hard"][name], lm["soft"][name], rtol=0, atol=0)
    expected = hard_keep_counts(calls[-2:], pruners["hard"].thresholds)
    module_gradients(model, pruners["soft"], "budget")
    budget = module_gradients(model, pruners["hard"], "budget")
    for layer in (1, 3):
        assert_close(pruners["hard"].soft_counts[layer], expected[layer], rtol=0, atol=1e-5)
        assert (pruners["soft"].soft_counts[layer] - expected[layer]).abs().amax() > 0.1, layer
    trained = [name for name in budget if ("offset" if budget_gradients == "offset" else "head") in name]
    assert trained and all(budget[name].any() for name in trained), trained

    model, pruners = same_weight_pruners(model_factory, variants, layers=(2,))
    budget = {name: module_gradients(model, pruners[name], "budget") for name in ("hard", "straight")}
    assert torch.equal(pruners["hard"].soft_counts[2], pruners["straight"].soft_counts[2])
    for name in budget["hard"]:
        assert_close(budget["hard"][name], budget["straight"][name], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="budget_count must be one of 'mask', 'hard', got 'soft'"):
        ATPPruner(num_layers=4, layers=[1, 3], budget_count="soft")


def test_content_features_match_a_per_sample_computation():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 5) + 0.5
    weight = torch.tensor([[1.0, 1, 1, 0, 0, 1, 1], [0.5, 1, 0.2, 1, 1, 1, 0]])
    got = content_features(hidden, weight)
    for b in range(2):
        present = weight[b] > 0
        w, tokens = weight[b][present], hidden[b][present]
        mean_token = sum(wi * h for wi, h in zip(w, tokens)) / w.sum()
        cosines = torch.stack([h @ mean_token / (h.norm() * mean_token.norm()) for h in tokens])
        mean = (w * cosines).sum() / w.sum()
        std = ((w * (cosines - mean) ** 2).sum() / w.sum()).sqrt()
        spread = (
            sum(wi * (h - mean_token).pow(2).sum() for wi, h in zip(w, tokens)) / (w * tokens.pow(2).sum(1)).sum()
        ).sqrt()
        assert_close(got[b], torch.stack([mean, std, spread]), rtol=1e-5, atol=1e-6)
    assert_close(content_features(3 * hidden, weight), got, rtol=1e-5, atol=1e-6)  # scale-free
    same = torch.randn(5).expand(1, 4, 5)  # four copies of one token: no spread at all
    assert_close(content_features(same, torch.ones(1, 4)), torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    assert_close(content_features(hidden, torch.zeros(2, 7)), torch.zeros(2, 3))  # nothing remains: zeros


def test_an_instance_that_loses_every_token_trains_without_nan(model_factory):
    """Without SAP nothing guarantees a token survives; the later modules (content features,
    scores, losses) must stay finite when an instance has none left."""
    model = model_factory()
    pruner = ATPPruner(
        num_layers=4, layers=[1, 2, 3], straight_through=True, content_features=True, score_gradients=True, sap=False
    ).train()
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(5.0)  # theta_r 0.99: about one token survives layer 1
    loss = training_backward(model, pruner, padding="left")
    assert (pruner.soft_counts[3] == 0).any()
    assert torch.isfinite(loss)
    for name, param in list(model.named_parameters()) + list(pruner.named_parameters()):
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_score_statistics_match_a_per_sample_loop():
    torch.manual_seed(0)
    score = torch.rand(4, 9)
    present = torch.rand(4, 9) > 0.4
    present[2] = False  # no token left
    present[3] = False
    present[3, 5] = True  # one token: std 0
    got = score_statistics(score, present)
    for b in range(4):
        values = score[b][present[b]]
        if values.numel() == 0:
            expected = torch.zeros(7)
        else:
            std = values.std() if values.numel() > 1 else torch.tensor(0.0)
            expected = torch.cat([values.mean()[None], std[None], torch.quantile(values, torch.tensor(QUANTILES))])
        assert_close(got[b], expected)


def test_losses_match_the_formula():
    pruner = ATPPruner(num_layers=4, layers=[1, 3])
    pruner.soft_counts = {1: torch.tensor([10.0, 0.0]), 3: torch.tensor([4.0, 0.0])}
    num_visual = torch.tensor([16, 0])  # the second sample has no image and is left out
    n = tokens_per_layer(pruner, num_visual)
    assert n.tolist() == [[16, 10, 10, 4], [0, 0, 0, 0]]
    losses = atp_losses(pruner, num_visual, target_tokens=4.0, lambda_atp=0.05, lambda_target=0.2)
    expected_atp = sum((layer / 4) * count / 16 for layer, count in enumerate([16, 10, 10, 4])) / 4
    expected_target = abs((16 + 10 + 10 + 4) / 4 - 4.0) / 16
    assert losses["atp"].item() == pytest.approx(0.05 * expected_atp)
    assert losses["target"].item() == pytest.approx(0.2 * expected_target)


@pytest.mark.parametrize("reduction", ["batch", "instance"])
def test_a_ceiling_target_counts_only_an_excess(reduction):
    pruner = ATPPruner(num_layers=2, layers=[1])
    num_visual = torch.tensor([16, 16])
    for kept, target in (([2.0, 4.0], 12.0), ([14.0, 12.0], 6.0), ([2.0, 14.0], 10.0)):
        pruner.soft_counts = {1: torch.tensor(kept)}
        excess = [((16 + k) / 2 - target) / 16 for k in kept]  # averages over the two layers
        kwargs = {"target_tokens": target, "lambda_target": 1.0, "target_reduction": reduction}
        got = atp_losses(pruner, num_visual, target_side="above", **kwargs)["target"].item()
        if reduction == "batch":
            assert got == pytest.approx(max(0.0, sum(excess) / 2))
        else:
            assert got == pytest.approx(sum(max(0.0, e) for e in excess) / 2)
        both = atp_losses(pruner, num_visual, **kwargs)["target"].item()
        assert both == pytest.approx(abs(sum(excess)) / 2 if reduction == "batch" else sum(map(abs, excess)) / 2)
    with pytest.raises(ValueError, match="target_side must be 'both' or 'above', got 'below'"):
        atp_losses(pruner, num_visual, target_tokens=4.0, target_side="below")


def test_batch_target_lets_instances_differ_and_instance_target_does_not():
    pruner = ATPPruner(num_layers=2, layers=[1])
    pruner.soft_counts = {1: torch.tensor([2.0, 10.0, 5.0])}  # averages (16+2)/2, (16+10)/2, and an 8-token image
    num_visual = torch.tensor([16, 16, 8])
    excess = [((16 + 2) / 2 - 6) / 16, ((16 + 10) / 2 - 6) / 16, ((8 + 5) / 2 - 6) / 8]
    batch = atp_losses(pruner, num_visual, target_tokens=6.0, lambda_target=1.0)
    instance = atp_losses(pruner, num_visual, target_tokens=6.0, lambda_target=1.0, target_reduction="instance")
    assert batch["target"].item() == pytest.approx(abs(sum(excess)) / 3)
    assert instance["target"].item() == pytest.approx(sum(abs(e) for e in excess) / 3)
    with pytest.raises(ValueError, match="target_reduction must be 'batch' or 'instance'"):
        atp_losses(pruner, num_visual, target_tokens=6.0, target_reduction="sample")


def test_default_placement_and_errors():
    assert default_layers(32) == [4, 14, 24]
    assert default_layers(4) == [1, 2, 3]
    with pytest.raises(ValueError, match="layers must be >= 1"):
        ATPPruner(num_layers=4, layers=[0, 2])
    with pytest.raises(ValueError, match="built for a 8-layer LLM"):
        atp.apply(atp.models.tiny.tiny_llava(num_layers=4, grid=4), ATPPruner(num_layers=8))


@pytest.mark.parametrize("training", [False, True])
def test_changing_the_answer_leaves_keep_decisions_unchanged(model_factory, training):
    model = model_factory()
    pruner = ATPPruner(num_layers=4, layers=[1, 3]).train(training)
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.0)
            module.spatial_head.bias.fill_(0.6)
    atp.apply(model, pruner, mode="mask" if training else "drop")
    prompt = make_batch(RAGGED[:2], padding="right", seed=4)
    decisions = []
    for seed in range(3):
        answer = torch.randint(3, 100, (2, 4), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([prompt["input_ids"], answer], 1)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(answer)], 1)
        labels = torch.cat([torch.full_like(prompt["input_ids"], -100), answer], 1)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=prompt["pixel_values"], labels=labels)
        decisions.append(({k: v.clone() for k, v in pruner.soft_counts.items()}, atp.stats(model).kept))
    counts, kept = decisions[0]
    assert 0 < float(counts[3].min()) < 16
    for other_counts, other_kept in decisions[1:]:
        for layer in counts:
            torch.testing.assert_close(other_counts[layer], counts[layer])
            assert all(torch.equal(a, b) for a, b in zip(kept[layer], other_kept[layer]))
