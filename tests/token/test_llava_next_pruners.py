"""Token pruners on tiny LLaVA-NeXT / LLaVA-OneVision, each against a brute-force recomputation of its
documented rule from the stock model's eager outputs (plain loops, not the atp code): content tokens
only (newline tokens are structural), budgets over a sample's content tokens, grid and [CLS] rules
per crop."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import atp
from tests.next_inputs import FAMILIES, GRID, SQUARE, TALL, WIDE, next_batch, next_model, stock_reference
from tests.runtime.family_checks import divprune_by_loops

SPECS = [(2, [WIDE], 3), (4, [SQUARE], 2), (1, [TALL], 2)]


def kept_count(n: int, ratio: float) -> int:
    return min(n, max(1, math.floor(n * ratio + 0.5))) if n else 0


def top(scores: list[tuple[float, int]], count: int) -> list[int]:
    """The `count` items of (score, number) with the highest score, ties to the smaller number."""
    return [number for _, number in sorted(scores, key=lambda item: (-item[0], item[1]))[:count]]


def shares(sizes: list[int], total: int) -> list[int]:
    """total split over groups by size: floors of the exact quotas, the rest to the largest remainders."""
    whole = sum(sizes)
    quotas = [total * size / whole for size in sizes]
    parts = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda g: (-(quotas[g] - parts[g]), g))
    for g in order[: total - sum(parts)]:
        parts[g] += 1
    return parts


def eager_run(model, batch, **kwargs):
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**batch, **kwargs)
    model.set_attn_implementation(implementation)
    return out


def run_kept(model, batch, pruner, layer, mode="drop"):
    atp.apply(model, pruner, mode=mode)
    with torch.no_grad():
        model(**batch)
    kept = [k.tolist() for k in atp.stats(model).kept[layer]]
    atp.remove(model)
    return kept


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_keeps_what_eager_attentions_say(family, attn):
    model = next_model(family, attn)
    batch = next_batch(model, SPECS)
    reference = stock_reference(model, batch)
    attentions = eager_run(model, batch, output_attentions=True).attentions[1]  # layer K - 1 = 1
    expected = []
    for b, positions in enumerate(reference["content"]):
        row = attentions[b, :, -1].mean(0)  # the last prompt token is the last slot (left padding)
        scores = [(float(row[p]), number) for number, p in enumerate(positions)]
        expected.append(sorted(top(scores, kept_count(len(positions), 0.25))))
    for mode in ("drop", "mask"):
        assert run_kept(model, batch, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), 2, mode) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_divprune_keeps_what_the_brute_force_keeps(family):
    model = next_model(family)
    batch = next_batch(model, SPECS)
    reference = stock_reference(model, batch)
    expected = []
    for b, positions in enumerate(reference["content"]):
        tokens = [reference["embeds"][b, p].double().tolist() for p in positions]
        expected.append(divprune_by_loops(tokens, kept_count(len(tokens), 0.3)))
    assert run_kept(model, batch, atp.build_pruner("divprune", keep_ratio=0.3), 0) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_spatial_keeps_a_uniform_grid_on_every_crop(family):
    """keep_ratio 0.25 of a 4 x 4 crop grid: stride 2 in every crop's own tower grid (base view and
    each anyres crop, where unpadding removed rows or columns), read from the stock features."""
    model = next_model(family)
    batch = next_batch(model, SPECS)
    reference = stock_reference(model, batch)
    expected = []
    for where in reference["where"]:
        expected.append([n for n, (_, patch) in enumerate(where) if (patch // GRID) % 2 == 0 and patch % 2 == 0])
    assert run_kept(model, batch, atp.build_pruner("spatial", keep_ratio=0.25), 0) == expected
    views = [{view for view, _ in where} for where in reference["where"]]
    assert [len(v) for v in views] == [3, 5, 3]  # every crop of every image holds kept tokens
    for b, where in enumerate(reference["where"]):
        assert {where[n][0] for n in expected[b]} == views[b]


def clip_attentions(model, pixels, layer: int = -2) -> torch.Tensor:
    """[V, H, T+1, T+1] the stock CLIP tower's eager attention probabilities in layer `layer`."""
    tower = model.model.vision_tower
    implementation = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = tower(pixels, output_attentions=True).attentions[layer]
    tower.set_attn_implementation(implementation)
    return attentions


def per_view_budget(where, total: int) -> dict[int, list[int]]:
    """{view: [content numbers of its tokens]} and their budgets apportioned from total."""
    groups: dict[int, list[int]] = {}
    for number, (view, _) in enumerate(where):
        groups.setdefault(view, []).append(number)
    views = sorted(groups)
    return {v: (groups[v], k) for v, k in zip(views, shares([len(groups[v]) for v in views], total))}


def test_fastervlm_per_crop_matches_clip_output_attentions(attn):
    model = next_model("llava_next", attn)
    batch = next_batch(model, SPECS)
    reference = stock_reference(model, batch)
    cls = clip_attentions(model, reference["pixels"])[:, :, 0, 1:].mean(1)  # [V, T]
    expected = []
    for where in reference["where"]:
        kept = []
        for view, (numbers, count) in per_view_budget(where, kept_count(len(where), 0.25)).items():
            kept += top([(float(cls[view, where[n][1]]), n) for n in numbers], count)
        expected.append(sorted(kept))
    for mode in ("drop", "mask"):
        assert run_kept(model, batch, atp.build_pruner("fastervlm", keep_ratio=0.25), 0, mode) == expected


def visionzip_reference(model, reference, b: int, total: int) -> tuple[list[int], list[torch.Tensor]]:
    """VisionZip on one sample, per crop, as loops: (kept content positions in slot order, the LLM
    input rows those slots hold after the merge, in order)."""
    pixels = reference["pixels"]
    tower = model.model.vision_tower
    attentions = clip_attentions(model, pixels)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
        keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[-3]))  # layer -2's keys [V, T+1, dv]
        keys = keys.unflatten(-1, (layer.self_attn.num_heads, -1)).mean(2)[:, 1:]  # heads averaged, [V, T, hd]
    features = hidden[-2][:, 1:]  # the projector input [V, T, dv]
    where, positions = reference["where"][b], reference["content"][b]
    parts = {}  # (section, contextual, crop) -> rows in order
    slots = []
    for view, (numbers, count) in per_view_budget(where, total).items():
        dominant_count = min(count, int(count * 54 / 64 + 0.5))
        contextual_count = count - dominant_count
        score = attentions[view, :, 0, 1:].sum(0)
        dominant = sorted(top([(float(score[where[n][1]]), n) for n in numbers], dominant_count))
        crop = view - min(v for v, _ in where)  # the image's views start at its base view
        section = int(crop > 0)
        slots += dominant
        parts.setdefault((section, 0, 0), []).extend(dominant)
        rest = [n for n in numbers if n not in dominant]
        if not contextual_count or not rest:
            continue
        step = max(1, len(rest) // contextual_count)
        targets = list(range(0, len(rest), step))[:contextual_count]
        unit = [torch.nn.functional.normalize(keys[view, where[n][1]].double(), dim=0) for n in rest]
        groups = {t: [] for t in targets}
        for i in range(len(rest)):
            if i in targets:
                continue
            similarity = [float(unit[i] @ unit[t]) for t in targets]
            groups[targets[similarity.index(max(similarity))]].append(i)
        for t in targets:
            target = features[view, where[rest[t]][1]]
            joined = [features[view, where[rest[i]][1]] for i in groups[t]]
            merged = target + torch.stack(joined).mean(0) if joined else target
            with torch.no_grad():
                row = model.model.multi_modal_projector(merged[None])[0]
            slots.append(rest[t])
            parts.setdefault((section, 1, crop), []).append(row)
    ordered = []
    for key in sorted(parts):
        if key[1] == 0:  # dominant tokens in packed order
            ordered += [reference["embeds"][b, positions[n]] for n in sorted(parts[key])]
        else:  # contextual rows, crop by crop, in target order
            ordered += parts[key]
    return sorted(positions[n] for n in slots), ordered


def test_visionzip_per_crop_matches_clip_outputs():
    """Dominant tokens by each crop's [CLS] attention (HF's output_attentions), contextual merges of
    each crop's other tokens by its layer -2 keys, in the reference's NeXT order; the layer-0 input of
    each sample equals the sequence built by the loops (text and newline rows as stock)."""
    model = next_model("llava_next")
    batch = next_batch(model, SPECS)
    reference = stock_reference(model, batch)
    captured = {}
    atp.apply(model, atp.build_pruner("visionzip", keep_tokens=20))
    first = atp.runtime_of(model).adapter.layers[0]

    def record(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    first.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    real = batch["attention_mask"].bool()
    for b in range(len(SPECS)):
        slots, ordered = visionzip_reference(model, reference, b, 20)
        content = set(reference["content"][b])
        rows, queue = [], list(ordered)
        for p in real[b].nonzero()[:, 0].tolist():
            if p not in content:
                rows.append(reference["embeds"][b, p])
            elif p in slots:
                rows.append(queue.pop(0))
        expected = torch.stack(rows)
        got = captured["hidden"][b, -len(rows) :]
        assert atp.stats(model).visual_tokens[b, 0] == 20
        assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fastervlm", "visionzip"])
def test_cls_methods_refuse_onevision_siglip(name):
    model = next_model("llava_onevision")
    with pytest.raises(ValueError, match=r"SiglipVisionModel\) has no \[CLS\] token.*fastv"):
        atp.apply(model, atp.build_pruner(name))


@pytest.mark.parametrize("family", FAMILIES)
def test_atp_sap_grid_is_each_crops_grid(family):
    """ATP's SAP branch alone (theta_r = 1: no redundancy keep; theta_s = 0.4 between the SAP levels 0.25
    and 0.5) keeps the stride-2 grid of every crop's own tower grid, read from the stock features."""
    model = next_model(family)
    batch = next_batch(model, SPECS)
    reference = stock_reference(model, batch)
    pruner = atp.build_pruner("atp", num_layers=4, layers=[1], hidden=16).eval()
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            for head, logit in ((module.redundancy_head, 40.0), (module.spatial_head, math.log(0.4 / 0.6))):
                head.weight.zero_()
                head.bias.fill_(logit)
    expected = [
        [n for n, (_, patch) in enumerate(where) if (patch // GRID) % 2 == 0 and patch % 2 == 0]
        for where in reference["where"]
    ]
    assert run_kept(model, batch, pruner, 1) == expected
