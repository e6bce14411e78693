"""Uncertainty: Wilson intervals for one accuracy, paired tests for two runs on the same problems."""

from __future__ import annotations

import math
import random
from typing import Sequence


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy correct/n (sensible at 0% and 100%, unlike +-1.96 SE)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test on paired outcomes (same problems, two models).

    Only discordant pairs carry information: b01 = problems A got wrong and B right, b10 the
    reverse. Under "no difference" b01 ~ Binomial(b01 + b10, 1/2); the two-sided p-value doubles
    the smaller tail (capped at 1). Returns {"a_only", "b_only", "p_value"}.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    tail = sum(math.comb(n, k) for k in range(0, min(a_only, b_only) + 1)) / 2 ** n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


def paired_bootstrap_ci(a: Sequence[bool], b: Sequence[bool], resamples: int = 2000, seed: int = 0
                        ) -> tuple[float, float]:
    """95% percentile interval of accuracy(B) - accuracy(A), resampling problems with replacement."""
    n = len(a)
    if n == 0:
        return (0.0, 0.0)
    rng = random.Random(seed)
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    stats = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return (stats[int(0.025 * resamples)], stats[min(resamples - 1, int(0.975 * resamples))])


def shared_outcomes(reference: dict, other: dict) -> tuple[list[bool], list[bool]]:
    """Outcomes ({problem id: correct}) of two evaluations on the problems both have, in id order."""
    shared = sorted(set(reference) & set(other))
    return [bool(reference[i]) for i in shared], [bool(other[i]) for i in shared]


def paired_comparison(reference: Sequence[bool], other: Sequence[bool]) -> dict:
    """The paired test every comparison in otr reports (eval compare, side by side, the study).

    reference, other: outcomes on the same problems, in the same order. Returns n, both
    accuracies with Wilson 95% intervals, delta = other - reference with a paired bootstrap 95%
    interval, McNemar's exact p-value and the discordant counts (reference_only, other_only).
    """
    n = len(reference)
    correct_ref, correct_other = sum(reference), sum(other)
    test = mcnemar_exact(reference, other)
    return {"n": n, "reference_accuracy": correct_ref / n if n else 0.0,
            "accuracy": correct_other / n if n else 0.0, "delta": (correct_other - correct_ref) / n if n else 0.0,
            "reference_ci95": list(wilson_interval(correct_ref, n)), "ci95": list(wilson_interval(correct_other, n)),
            "delta_ci95": list(paired_bootstrap_ci(reference, other)), "mcnemar_p": test["p_value"],
            "reference_only": test["a_only"], "other_only": test["b_only"]}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
