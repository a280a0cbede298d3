"""How sure a comparison is: intervals for accuracies and tests for differences between models.

All models of a comparison are evaluated on the same validation images, so differences are tested
paired, image by image:

* one run per model: the Wilson score interval of each accuracy and the exact McNemar test of a
  pair (a two-sided binomial test on the images exactly one of the two models gets right), with the
  paired (Wald) interval of the difference;
* several runs (seeds) per model: the mean accuracy with an interval that adds the seed-to-seed
  variance of the mean to the variance from sampling the images, and a z-test of a pair's
  difference with the same two sources of variance (normal approximation; with a handful of seeds
  the seed variance is itself a rough estimate).

``correct`` arrays are boolean, ``(runs, images)``: whether run r classified image i correctly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))  # two-sided 95 % quantile of the standard normal


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``successes / n`` (fractions, not %)."""
    if not 0 <= successes <= n or n <= 0:
        raise ValueError(f"a proportion needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    ci = stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided p-value of the exact McNemar test from the discordant counts.

    ``only_a``: images model A gets right and B wrong; ``only_b``: the reverse.
    """
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


@dataclass
class Accuracy:
    """A model's accuracy (%) over its runs: mean, seed std (0 for one run), 95 % interval."""

    mean: float
    std: float
    low: float
    high: float
    runs: list[float]


def accuracy(correct: np.ndarray) -> Accuracy:
    """Mean accuracy of ``(runs, images)`` correctness with its 95 % interval (see module docstring)."""
    correct = _as_runs(correct)
    runs, n = correct.shape
    per_run = correct.mean(axis=1)
    mean = float(per_run.mean())
    if runs == 1:
        low, high = wilson_interval(int(correct.sum()), n)
        std = 0.0
    else:
        std = float(per_run.std(ddof=1))
        half = Z95 * math.sqrt(std**2 / runs + correct.mean(axis=0).var(ddof=1) / n)
        low, high = max(mean - half, 0.0), min(mean + half, 1.0)
    return Accuracy(100 * mean, 100 * std, 100 * low, 100 * high, [100 * float(a) for a in per_run])


@dataclass
class Difference:
    """Accuracy of A minus B (% points) with its 95 % interval and the test's p-value;
    ``only_a``/``only_b`` count the images exactly one model gets right (averaged over pairs of runs)."""

    delta: float
    low: float
    high: float
    p_value: float
    only_a: int
    only_b: int
    test: str


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> Difference:
    """Test whether A and B differ on the same images (exact McNemar for one run each, else z-test)."""
    a, b = _as_runs(correct_a), _as_runs(correct_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the models were evaluated on different numbers of images ({a.shape[1]} vs {b.shape[1]})")
    pairings = a.shape[0] * b.shape[0]  # discordant counts are averaged over the pairings of runs
    only_a = round(int((a[:, None] & ~b[None]).sum()) / pairings)
    only_b = round(int((~a[:, None] & b[None]).sum()) / pairings)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)  # per image, over runs
    delta = float(mean_a.mean() - mean_b.mean())
    seed_var = sum(x.mean(axis=1).var(ddof=1) / x.shape[0] for x in (a, b) if x.shape[0] > 1)
    var = seed_var + (mean_a - mean_b).var(ddof=1) / a.shape[1]  # one run each: the paired (Wald) variance
    half = Z95 * math.sqrt(var)
    if a.shape[0] == 1 and b.shape[0] == 1:
        p, test = mcnemar_exact(only_a, only_b), "exact McNemar"
    else:
        p = 1.0 if var == 0 else float(2 * stats.norm.sf(abs(delta) / math.sqrt(var)))
        test = "z-test (seeds and images)"
    return Difference(100 * delta, 100 * (delta - half), 100 * (delta + half), p, only_a, only_b, test)


def _as_runs(correct: np.ndarray) -> np.ndarray:
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim == 1:
        correct = correct[None]
    if correct.ndim != 2 or correct.shape[1] == 0:
        raise ValueError(f"correctness must be (runs, images) with at least one image, got shape {correct.shape}")
    return correct
