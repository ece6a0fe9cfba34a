"""CDPruner: kept tokens against a brute-force recomputation from HF's own projected features and
input embeddings: the kernel in plain loops, and greedy MAP as its definition, each step adding the
token that maximises det(L_Y) (computed by determinants, not by the incremental Cholesky rows the
pruner updates); the LLM then equals the stock LLM on the kept tokens."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from atp.token.cdpruner import greedy_dpp
from tests.conftest import IMAGE, make_batch, single
from tests.token.vision_reference import NUM_VISUAL, RAGGED, check_kept_and_logits, projected_features


def cosine(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))


def brute_force_kernel(model, sample, negate: bool) -> torch.Tensor:
    """[N, N] float64 conditional kernel of one unpadded sample, in plain loops."""
    visual = projected_features(model, sample).tolist()
    ids = sample["input_ids"][0]
    after_image = ids[int((ids == IMAGE).nonzero().max()) + 1 :]  # the instruction: the prompt after the image
    with torch.no_grad():
        text = model.get_input_embeddings()(after_image)
    if len(after_image):
        pooled = text.mean(0).tolist()
        score = [(-1 if negate else 1) * cosine(v, pooled) for v in visual]
        low, high = min(score), max(score)
        relevance = [(s - low + 1e-6) / (high - low) for s in score]
    else:
        relevance = [1.0] * NUM_VISUAL
    kernel = [
        [relevance[i] * cosine(visual[i], visual[j]) * relevance[j] for j in range(NUM_VISUAL)]
        for i in range(NUM_VISUAL)
    ]
    return torch.tensor(kernel, dtype=torch.float64)


def brute_force_map(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP by its definition: add the item that maximises the determinant of the chosen kernel."""
    chosen: list[int] = []
    for _ in range(count):
        gains = {
            j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))
            for j in range(len(kernel))
            if j not in chosen
        }
        chosen.append(max(gains, key=gains.get))
    return chosen


@pytest.mark.parametrize("total,negate", [(4, False), (7, False), (5, True)])
def test_cdpruner_matches_brute_force(model_factory, total, negate):
    model = model_factory(attn_implementation="eager")
    batch = make_batch(RAGGED, seed=19)
    expected = [sorted(brute_force_map(brute_force_kernel(model, single(batch, b), negate), total)) for b in range(3)]
    build = lambda: atp.build_pruner("cdpruner", keep_tokens=total, negate_relevance=negate)  # noqa: E731
    check_kept_and_logits(model, batch, build, expected)


def test_greedy_map_equals_the_determinant_definition_over_many_steps():
    """The incremental updates pick what the determinant definition picks, over many steps."""
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(60, 12, generator=generator, dtype=torch.float64), dim=-1)
    weight = torch.rand(60, generator=generator, dtype=torch.float64) + 0.1
    kernel = weight[:, None] * (features @ features.T) * weight[None, :]
    assert greedy_dpp(kernel, 10) == brute_force_map(kernel, 10)


def test_greedy_map_past_the_kernel_rank_follows_the_diagonal():
    """A rank-3 kernel: three DPP picks, then the rest by descending L_jj (never a repeated index)."""
    generator = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(10, 3, generator=generator, dtype=torch.float64), dim=-1)
    weight = torch.rand(10, generator=generator, dtype=torch.float64) + 0.1
    kernel = weight[:, None] * (features @ features.T) * weight[None, :]
    picked = greedy_dpp(kernel, 7)
    assert picked[:3] == brute_force_map(kernel, 3) and len(set(picked)) == 7
    by_diagonal = sorted(range(10), key=lambda i: -float(kernel[i, i]))
    assert picked[3:] == [i for i in by_diagonal if i not in picked[:3]][:4]


def test_cdpruner_errors(model_factory):
    model = model_factory()
    atp.apply(model, atp.build_pruner("cdpruner", keep_tokens=17))
    with pytest.raises(ValueError, match="keep_tokens=17 is more than the 16 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED))


QWEN_RAGGED = [(2, [(8, 8), (4, 6)], 3), (3, [], 6), (1, [(6, 4)], 2)]  # 22, 0 and 6 image tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cdpruner_runs_on_qwen_vl_without_cls(attn):
    """No [CLS] needed: on tiny Qwen2.5-VL (all of a sample's images together, keep_ratio of its
    tokens) the kept tokens equal the brute force over HF's own LLM input embeddings."""
    from atp.token.selection import kept_count
    from tests.qwen_inputs import IMAGE as QWEN_IMAGE
    from tests.qwen_inputs import qwen_batch, qwen_model

    model = qwen_model("qwen2_5_vl", attn=attn)
    batch = qwen_batch(QWEN_RAGGED)
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    expected = []
    for b in range(len(QWEN_RAGGED)):
        ids, valid = batch["input_ids"][b], batch["attention_mask"][b].bool()
        image = ((ids == QWEN_IMAGE) & valid).nonzero()[:, 0].tolist()
        if not image:
            expected.append([])
            continue
        visual = [embeds[b, p].double().tolist() for p in image]
        pooled = embeds[b, image[-1] + 1 :][valid[image[-1] + 1 :]].double().mean(0).tolist()
        score = [cosine(v, pooled) for v in visual]
        relevance = [(s - min(score) + 1e-6) / (max(score) - min(score)) for s in score]
        n = len(visual)
        kernel = torch.tensor(
            [[relevance[i] * cosine(visual[i], visual[j]) * relevance[j] for j in range(n)] for i in range(n)],
            dtype=torch.float64,
        )
        expected.append(sorted(brute_force_map(kernel, int(kept_count(torch.tensor([n]), 0.3)[0]))))
    assert [len(e) for e in expected] == [7, 0, 2]
    for mode in ("drop", "mask"):
        atp.apply(model, atp.build_pruner("cdpruner", keep_tokens=None, keep_ratio=0.3), mode=mode)
        with torch.no_grad():
            model(**batch)
        kept = atp.stats(model).kept[0]
        atp.remove(model)
        assert [kept[b].tolist() for b in range(len(QWEN_RAGGED))] == expected, mode
