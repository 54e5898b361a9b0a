"""Paired differences with Student-t intervals, checked by hand."""

import math

import pytest

from mtl_opt.experiments.paired_stats import mean_std, paired_difference


def test_interval_matches_a_hand_computation():
    variant = [1.0, 2.0, 4.0]
    baseline = [0.0, 0.0, 1.0]
    # d = [1, 2, 3]: mean 2, sample std 1, n = 3; t_{0.975, 2} = 4.302652729749464
    r = paired_difference(variant, baseline, confidence=0.95)
    half = 4.302652729749464 * 1.0 / math.sqrt(3)
    assert (r.n, r.mean, r.std) == (3, 2.0, 1.0)
    assert r.ci_low == pytest.approx(2.0 - half, rel=1e-12)
    assert r.ci_high == pytest.approx(2.0 + half, rel=1e-12)
    # paired t statistic 2 / (1/sqrt 3) = 3.4641; two-sided p for df = 2
    assert r.p_value == pytest.approx(0.07417990022744858, rel=1e-9)


def test_ninety_percent_interval_is_narrower():
    a, b = [3.0, 1.0, 4.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0]
    wide, narrow = paired_difference(a, b), paired_difference(a, b, confidence=0.9)
    assert narrow.ci_high - narrow.ci_low < wide.ci_high - wide.ci_low
    assert narrow.mean == wide.mean == pytest.approx(0.8)


def test_constant_differences_give_a_point_interval():
    r = paired_difference([2.0, 3.0], [1.0, 2.0])
    assert (r.ci_low, r.ci_high, r.std, r.p_value) == (1.0, 1.0, 0.0, 0.0)
    same = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert (same.mean, same.p_value) == (0.0, 1.0)


def test_mean_std_uses_the_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)


@pytest.mark.parametrize(
    "a, b, kwargs, message",
    [
        ([1.0], [0.0], {}, "at least 2 seeds"),
        ([1.0, 2.0], [0.0], {}, "same seeds"),
        ([1.0, float("nan")], [0.0, 0.0], {}, "non-finite"),
        ([1.0, 2.0], [0.0, 0.0], {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_input_raises(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b, **kwargs)
