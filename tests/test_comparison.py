"""The comparison verdict against hand-made tables and a brute-force sign test."""

from __future__ import annotations

import itertools

import pytest

from atp.comparison import needed_wins, paired, sign_test_p, verdict
from atp.evaluation import EvaluationResult


def result(name: str, correct: list[bool], tokens: float = 130.0) -> EvaluationResult:
    per_sample = [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct)]
    return EvaluationResult(
        method=name,
        accuracy=sum(correct) / len(correct),
        accuracy_by_type={},
        avg_visual_tokens=tokens,
        input_visual_tokens=576.0,
        flops_ratio=0.2,
        kv_ratio=0.25,
        latency_ratio=None,
        spearman_tokens_objects=None,
        num_samples=len(correct),
        per_sample=per_sample,
    )


def table(n: int, both: int, wins: int, losses: int) -> tuple[list[bool], list[bool]]:
    """Two answer sheets on n questions: `both` right in both, `wins` right only in the first,
    `losses` right only in the second, the rest wrong in both."""
    first = [True] * both + [True] * wins + [False] * losses
    second = [True] * both + [False] * wins + [True] * losses
    rest = n - len(first)
    return first + [False] * rest, second + [False] * rest


@pytest.mark.parametrize("m", range(0, 11))
def test_sign_test_matches_counting_all_coin_sequences(m):
    for wins in range(m + 1):
        at_least = 0
        for flips in itertools.product((0, 1), repeat=m):  # every equally likely outcome under H0
            if sum(flips) >= wins:
                at_least += 1
        expected = at_least / 2**m if m else 1.0
        assert sign_test_p(wins, m - wins) == pytest.approx(expected, abs=1e-15)


def test_needed_wins_is_the_smallest_significant_count():
    for m in range(0, 30):
        k = needed_wins(m)
        significant = [w for w in range(m + 1) if sign_test_p(w, m - w) < 0.05]
        assert k == (min(significant) if significant else None)
    assert needed_wins(4) is None  # 4 of 4: p = 1/16 > 0.05
    assert needed_wins(20) == 15  # P(X >= 15) = 0.0207, P(X >= 14) = 0.0577


def test_paired_counts_discordant_questions():
    a, b = table(50, both=10, wins=7, losses=3)
    c = paired(result("atp", a), result("fastv", b))
    assert (c.wins, c.losses, c.num_questions) == (7, 3, 50)
    assert c.lead == pytest.approx(100 * (sum(a) - sum(b)) / 50)


def test_paired_refuses_different_questions():
    a = result("atp", [True, False])
    b = result("fastv", [True, False, True])
    with pytest.raises(ValueError, match="same"):
        paired(a, b)


def controls(n: int, unpruned: int, blank: int) -> tuple[EvaluationResult, EvaluationResult]:
    return (
        result("unpruned", [True] * unpruned + [False] * (n - unpruned), 576.0),
        result("blank", [True] * blank + [False] * (n - blank), 576.0),
    )


def test_a_clear_lead_is_shown():
    a, b = table(200, both=80, wins=30, losses=5)  # p = P(X >= 30 | 35) < 1e-5
    unpruned, blank = controls(200, 120, 60)
    shown, lines = verdict(result("atp", a), [result("fastv", b), result("random", b)], unpruned, blank)
    assert shown
    assert lines[-1].startswith("VERDICT: atp is ahead of fastv, random")
    assert "+12.5 points" in lines[0] and "30 questions won, 5 lost of 200" in lines[0]


def test_a_lead_within_noise_is_not_shown_and_says_what_lead_was_needed():
    a, b = table(200, both=80, wins=12, losses=8)  # p = P(X >= 12 | 20) = 0.2517
    unpruned, blank = controls(200, 120, 60)  # the image is worth 30 points: not the reason
    shown, lines = verdict(result("atp", a), [result("fastv", b)], unpruned, blank)
    assert not shown
    assert "p = 0.252" in lines[-1] and "a lead of 5.0 points would be needed on these 200 questions" in lines[-1]
    assert "without the image" not in lines[-1]


def test_a_base_that_ignores_the_image_is_named_as_the_reason():
    a, b = table(200, both=80, wins=12, losses=8)  # needs 5.0 points
    unpruned, blank = controls(200, 86, 80)  # 43.0 % vs 40.0 %: the image is worth 3.0 points
    shown, lines = verdict(result("atp", a), [result("fastv", b)], unpruned, blank, weak_model_hint="train longer")
    assert not shown
    assert "the image is worth 3.0 points" in lines[-1] and "(train longer)" in lines[-1]


def test_being_behind_is_reported():
    a, b = table(200, both=80, wins=3, losses=9)
    unpruned, blank = controls(200, 120, 60)
    shown, lines = verdict(result("atp", a), [result("random", b)], unpruned, blank)
    assert not shown and "not ahead of random (-3.0 points)" in lines[-1]


def test_different_token_counts_are_not_a_comparison():
    a, b = table(200, both=80, wins=30, losses=5)
    unpruned, blank = controls(200, 120, 60)
    shown, lines = verdict(result("atp", a, tokens=130.0), [result("fastv", b, tokens=150.0)], unpruned, blank)
    assert not shown and "not the same measured tokens" in lines[-1]
