"""A plain verdict on a pruner comparison: is the learned pruner ahead of the baselines by
more than the sampling noise of the questions asked, and if not, why not. [ours]

The test is paired, because every method answers the same questions: for method A against
baseline B, `wins` counts the questions A answers right and B wrong, `losses` the reverse.
Under "A and B are equally good" each of the `wins + losses` discordant questions is a fair
coin, so the one-sided p-value is P(X >= wins) for X ~ Binomial(wins + losses, 1/2) (the
exact sign test, McNemar's test in its exact form). A is "ahead beyond sampling noise" when
that p-value is below `alpha` (0.05).

Why a lead can be impossible to show: a pruner only changes answers that need the image.
`image_worth` (unpruned accuracy minus the blank-image control's) roughly bounds how far one
pruner can lead another, since pruned models usually land between the blank control and the
unpruned model; when it is no larger than the lead the sign test would need on these
questions, a pruner can hardly be shown ahead on this model, whatever it learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atp.evaluation import EvaluationResult

ALPHA = 0.05
TOKEN_TOLERANCE = 0.02  # "the same measured tokens": averages within 2 % of each other


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins), X ~ Binomial(wins + losses, 1/2); 1.0 when there
    are no discordant questions."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be counts >= 0, got {wins} and {losses}.")
    m = wins + losses
    if m == 0:
        return 1.0
    return sum(math.comb(m, k) for k in range(wins, m + 1)) / 2**m


def needed_wins(discordant: int, alpha: float = ALPHA) -> int | None:
    """The fewest wins out of `discordant` questions that the sign test calls significant at
    `alpha`; None when even winning all of them is not enough."""
    for wins in range(discordant + 1):
        if sign_test_p(wins, discordant - wins) < alpha:
            return wins
    return None


@dataclass(frozen=True)
class PairedComparison:
    """Method vs baseline on the same questions."""

    method: str
    baseline: str
    wins: int  # method right, baseline wrong
    losses: int  # method wrong, baseline right
    num_questions: int
    method_tokens: float  # average visual tokens per decoder layer
    baseline_tokens: float

    @property
    def lead(self) -> float:
        """Accuracy difference in points (method - baseline)."""
        return 100 * (self.wins - self.losses) / self.num_questions

    @property
    def p_value(self) -> float:
        return sign_test_p(self.wins, self.losses)

    @property
    def same_tokens(self) -> bool:
        return abs(self.method_tokens - self.baseline_tokens) <= TOKEN_TOLERANCE * max(self.method_tokens, 1e-9)

    def needed_lead(self, alpha: float = ALPHA) -> float | None:
        """The smallest lead (points) the sign test calls significant with this many discordant
        questions; None when no split of them is enough."""
        discordant = self.wins + self.losses
        wins = needed_wins(discordant, alpha)
        return None if wins is None else 100 * (2 * wins - discordant) / self.num_questions


def paired(method: EvaluationResult, baseline: EvaluationResult) -> PairedComparison:
    """Pair two evaluations question by question (by sample id). Both must cover the same questions."""
    right = {s["id"]: bool(s["correct"]) for s in method.per_sample}
    other = {s["id"]: bool(s["correct"]) for s in baseline.per_sample}
    if set(right) != set(other) or not right:
        raise ValueError(
            f"{method.method!r} and {baseline.method!r} must be evaluated on the same (non-empty) questions: "
            f"{len(right)} and {len(other)} ids, {len(set(right) ^ set(other))} not shared."
        )
    wins = sum(right[i] and not other[i] for i in right)
    losses = sum(other[i] and not right[i] for i in right)
    return PairedComparison(
        method.method,
        baseline.method,
        wins,
        losses,
        len(right),
        method.avg_visual_tokens,
        baseline.avg_visual_tokens,
    )


def verdict(
    method: EvaluationResult,
    baselines: list[EvaluationResult],
    unpruned: EvaluationResult,
    blank: EvaluationResult,
    alpha: float = ALPHA,
    weak_model_hint: str | None = None,
) -> tuple[bool, list[str]]:
    """(shown, lines): whether `method` is ahead of every baseline, at the same measured tokens,
    by more than the sampling noise (one-sided sign test at `alpha`), and the lines that say so
    or say why not. `weak_model_hint` follows the reason "the model answers most questions
    without the image" (e.g. how to train a model that needs it)."""
    comparisons = [paired(method, b) for b in baselines]
    lines = []
    for c in comparisons:
        lines.append(
            f"{c.method} vs {c.baseline}: {c.lead:+.1f} points at {c.method_tokens:.1f} vs {c.baseline_tokens:.1f} "
            f"tokens/layer ({c.wins} questions won, {c.losses} lost of {c.num_questions}; "
            f"one-sided sign test p = {c.p_value:.3f})"
        )
    shown = all(c.same_tokens and c.lead > 0 and c.p_value < alpha for c in comparisons)
    n = comparisons[0].num_questions if comparisons else 0
    if shown:
        lines.append(
            f"VERDICT: {method.method} is ahead of {', '.join(b.method for b in baselines)} at the same measured "
            f"tokens by more than the sampling noise of {n} questions (p < {alpha})."
        )
        return True, lines
    why = []
    for c in comparisons:
        if not c.same_tokens:
            why.append(
                f"{c.baseline} ran at {c.baseline_tokens:.1f} tokens/layer, not {c.method_tokens:.1f}: "
                "not the same measured tokens"
            )
        elif c.lead <= 0:
            why.append(f"it is not ahead of {c.baseline} ({c.lead:+.1f} points)")
        elif c.p_value >= alpha:
            need = c.needed_lead(alpha)
            need_text = "no lead" if need is None else f"a lead of {need:.1f} points"
            why.append(
                f"its {c.lead:+.1f} points over {c.baseline} are within sampling noise "
                f"(p = {c.p_value:.3f}; {need_text} would be needed on these {n} questions)"
            )
    image_worth = 100 * (unpruned.accuracy - blank.accuracy)
    needs = [c.needed_lead(alpha) for c in comparisons]
    needed = max((x for x in needs if x is not None), default=None)
    if needed is None or image_worth <= needed:
        why.append(
            f"the model answers most questions without the image: unpruned {100 * unpruned.accuracy:.1f} % vs "
            f"{100 * blank.accuracy:.1f} % with blank images, so the image is worth {image_worth:.1f} points, "
            "no more than the lead these questions would need, so a pruner can hardly be shown ahead on this model"
            + (f" ({weak_model_hint})" if weak_model_hint else "")
        )
    lines.append(f"VERDICT: not shown that {method.method} beats the baselines: " + "; ".join(why) + ".")
    return False, lines
