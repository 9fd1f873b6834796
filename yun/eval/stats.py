"""Scores with intervals, paired differences with tests, and verdicts in plain words.

Per endpoint: the mean item score with a 95% interval (Wilson for right/wrong items,
a percentile bootstrap over items otherwise). Per pair, on the items both answered: the
mean paired difference with a bootstrap interval of it, and a paired test: McNemar's exact
test on the discordant pairs for right/wrong items, a sign-flip permutation test
otherwise. p-values of many comparisons are corrected with Holm's step-down method.
scipy does the tests and intervals; Holm's correction (eight lines) is ours, as scipy has
only Benjamini-Hochberg.

The verdict follows the (corrected) test. On few items the percentile bootstrap interval
is narrower than the exact test is strict, so an interval that just excludes 0 can stand
beside "no significant difference": read the p-value, and add items.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np


def _scipy_stats() -> Any:
    """scipy.stats, imported on first use: `yun eval` needs it, a plain install need not
    have it (every yun module imports without the optional extras)."""
    try:
        from scipy import stats
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("yun eval needs scipy: pip install 'yun[eval]'") from e
    return stats


CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4000


@dataclass(frozen=True)
class Score:
    """One endpoint on one task: mean score (0-1) over `n` answered items."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "wilson" or "bootstrap"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """A minus B on the `n` items both answered (means 0-1; `diff` = mean_a - mean_b)."""

    a: str
    b: str
    task: str
    n: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    test: str  # "mcnemar" or "permutation"
    p_value: float
    a_only: int | None = None  # McNemar's discordant counts: A right and B wrong
    b_only: int | None = None  # B right and A wrong
    p_adjusted: float | None = None
    alpha: float = 1 - CONFIDENCE

    @property
    def significant(self) -> bool:
        p = self.p_adjusted if self.p_adjusted is not None else self.p_value
        return p < self.alpha

    def verdict(self) -> str:
        """"A beats B on TASK: +4.1 points, 95% CI [1.2, 7.0] (p=...)", or "no significant
        difference"; the winner's side is always the positive one."""
        pv = f"p={_p(self.p_value)}" + (f", Holm-adjusted {_p(self.p_adjusted)}"
                                         if self.p_adjusted is not None else "")
        if not self.significant:
            return (f"{self.a} vs {self.b} on {self.task}: no significant difference "
                    f"({100 * self.diff:+.1f} points, {_ci(self.low, self.high)}, {pv})")
        if self.diff > 0:
            win, lose, d, low, high = self.a, self.b, self.diff, self.low, self.high
        else:
            win, lose, d, low, high = self.b, self.a, -self.diff, -self.high, -self.low
        return f"{win} beats {lose} on {self.task}: {100 * d:+.1f} points, {_ci(low, high)} ({pv})"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "verdict": self.verdict()}


def _ci(low: float, high: float) -> str:
    return f"95% CI [{100 * low:.1f}, {100 * high:.1f}]"


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's binomtest)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = _scipy_stats().binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items (a point when all are equal)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if np.all(x == x[0]):  # no spread: every resample has the same mean
        return float(x[0]), float(x[0])
    res = _scipy_stats().bootstrap((x,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                        confidence_level=confidence, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def score(values: Sequence[float], confidence: float = CONFIDENCE) -> Score:
    """Mean of per-item scores with its interval: Wilson when every item is 0 or 1."""
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    if is_binary(values):
        low, high = wilson_interval(int(round(sum(values))), n, confidence)
        return Score(mean, low, high, n, "wilson")
    low, high = bootstrap_interval(values, confidence)
    return Score(mean, low, high, n, "bootstrap")


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against Binomial(b+c, 1/2)."""
    if a_only + b_only == 0:
        return 1.0
    return float(_scipy_stats().binomtest(a_only, a_only + b_only, 0.5).pvalue)


def permutation_p(diffs: Sequence[float], seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(diffs) = 0 (random sign flips; exact
    enumeration for up to 13 items, scipy's choice)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0 or np.all(d == 0):
        return 1.0
    res = _scipy_stats().permutation_test((d,), np.mean, permutation_type="samples", n_resamples=9999,
                               alternative="two-sided", rng=np.random.default_rng(seed))
    return float(res.pvalue)


def compare(a: str, b: str, task: str, scores_a: Sequence[float], scores_b: Sequence[float],
            confidence: float = CONFIDENCE) -> PairedComparison:
    """Paired comparison of two endpoints on the same items (same order, both answered)."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"paired scores differ in length: {len(scores_a)} vs {len(scores_b)}")
    x, y = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    d = x - y
    n = int(d.size)
    mean_a, mean_b = (float(x.mean()), float(y.mean())) if n else (float("nan"),) * 2
    diff = mean_a - mean_b
    low, high = bootstrap_interval(d, confidence)
    common = dict(a=a, b=b, task=task, n=n, mean_a=mean_a, mean_b=mean_b, diff=diff,
                  low=low, high=high, alpha=1 - confidence)
    if is_binary(scores_a) and is_binary(scores_b):
        a_only, b_only = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
        return PairedComparison(**common, test="mcnemar", p_value=mcnemar_exact(a_only, b_only),
                                a_only=a_only, b_only=b_only)
    return PairedComparison(**common, test="permutation", p_value=permutation_p(d))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def with_holm(comparisons: list[PairedComparison]) -> list[PairedComparison]:
    """The comparisons with Holm-adjusted p-values, when there is more than one."""
    if len(comparisons) < 2:
        return comparisons
    from dataclasses import replace

    adjusted = holm([c.p_value for c in comparisons])
    return [replace(c, p_adjusted=p) for c, p in zip(comparisons, adjusted)]
