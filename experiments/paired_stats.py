"""Paired comparisons across seeds: mean ± std and the paired difference with a t interval.

For variant values ``a_s`` and baseline values ``b_s`` on the same seeds ``s = 1..n``, the paired
differences ``d_s = a_s - b_s`` have mean ``d̄`` and sample standard deviation ``s_d`` (ddof = 1).
The two-sided confidence interval at level ``1 - α`` is

    d̄ ± t_{1-α/2, n-1} · s_d / √n

(Student's t, ``scipy.stats.t``), and the p-value is the paired t-test's (``scipy.stats.ttest_rel``).
Pairing by seed removes the seed-to-seed variation that both runs share (same start, same data).

When every difference is the same (``s_d = 0``) the interval is the point ``[d̄, d̄]`` and the
p-value is 1 when ``d̄ = 0`` and 0 otherwise (the t statistic is ±∞); this happens, e.g., when a
variant is an exact rescaling that Adam removes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["PairedDifference", "mean_ci", "mean_std", "paired_difference"]


def _as_floats(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} holds non-finite values {bad}")
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    xs = _as_floats(values, "the values")
    if not xs:
        raise ValueError("mean_std of no values")
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class PairedDifference:
    """``variant - baseline`` over paired seeds."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_difference(
    variant: Sequence[float], baseline: Sequence[float], *, confidence: float = 0.95
) -> PairedDifference:
    """Mean paired difference ``variant - baseline`` with a Student-t confidence interval."""
    from scipy import stats

    a = _as_floats(variant, "the variant's values")
    b = _as_floats(baseline, "the baseline's values")
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: got {len(a)} and {len(b)} values")
    if len(a) < 2:
        raise ValueError(
            f"a paired confidence interval needs at least 2 seeds, got {len(a)}; run more seeds"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean, std = mean_std(d)
    if std == 0.0:
        return PairedDifference(n, mean, 0.0, mean, mean, confidence, 1.0 if mean == 0.0 else 0.0)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * std / math.sqrt(n)
    p = float(stats.ttest_rel(a, b).pvalue)
    return PairedDifference(n, mean, std, mean - half, mean + half, confidence, p)


def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width ``t_{1-α/2, n-1} · s / √n`` of its Student-t interval (n ≥ 2)."""
    from scipy import stats

    xs = _as_floats(values, "the values")
    if len(xs) < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {len(xs)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean, std = mean_std(xs)
    return mean, float(stats.t.ppf(0.5 + confidence / 2.0, df=len(xs) - 1)) * std / math.sqrt(len(xs))
