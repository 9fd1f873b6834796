"""yun eval's statistics against hand-computed values and textbook cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from yun.eval import stats


def test_wilson_interval_matches_the_closed_form():
    k, n, z = 7, 10, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = stats.wilson_interval(k, n)
    assert low == pytest.approx(centre - half, abs=1e-9)
    assert high == pytest.approx(centre + half, abs=1e-9)
    assert (low, high) == pytest.approx((0.3968, 0.8922), abs=1e-4)  # Wilson's 7/10


def test_wilson_interval_of_all_wrong_starts_at_zero_and_is_not_empty():
    low, high = stats.wilson_interval(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.1 < high < 0.2  # 3.84 / 23.84 = 0.161


def test_mcnemar_exact_equals_the_binomial_tail_by_hand():
    # 8 discordant pairs, 7 for A: p = 2 * P(X >= 7), X ~ Bin(8, 1/2) = 2 * 9/256
    assert stats.mcnemar_exact(7, 1) == pytest.approx(2 * (8 + 1) / 256)
    assert stats.mcnemar_exact(1, 7) == pytest.approx(2 * (8 + 1) / 256)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(3, 3) == 1.0


def test_holm_adjusts_step_down_and_stays_monotone():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06 monotone), 0.5 (x1)
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_permutation_p_is_exact_sign_flip_for_few_items():
    # 5 items, all differences +1: only the all-plus and all-minus flips are as extreme
    assert stats.permutation_p([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    assert stats.permutation_p([0, 0, 0]) == 1.0
    d = [0.5, 0.2, -0.1, 0.4, 0.3, 0.6]
    flips = np.array(np.meshgrid(*[[-1, 1]] * 6)).reshape(6, -1).T
    means = np.abs((flips * d).mean(axis=1))
    assert stats.permutation_p(d) == pytest.approx(np.mean(means >= abs(np.mean(d)) - 1e-12))


def test_bootstrap_interval_covers_the_mean_and_collapses_without_spread():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, 200)
    low, high = stats.bootstrap_interval(x)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert low < x.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert stats.bootstrap_interval([0.3] * 10) == (0.3, 0.3)


def test_score_uses_wilson_for_right_wrong_and_bootstrap_otherwise():
    s = stats.score([1, 0, 1, 1, 0, 1, 1, 0, 1, 1])
    assert (s.method, s.mean, s.n) == ("wilson", 0.7, 10)
    assert (s.low, s.high) == pytest.approx(stats.wilson_interval(7, 10))
    g = stats.score([0.5, 1.0, 0.25, 0.75])
    assert g.method == "bootstrap" and g.low <= g.mean <= g.high


def test_compare_binary_counts_discordant_pairs_and_reports_the_difference():
    a = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0] * 3
    b = [1, 0, 0, 0, 1, 0, 0, 1, 0, 1] * 3
    c = stats.compare("A", "B", "t", a, b)
    assert c.test == "mcnemar" and c.n == 30
    assert (c.a_only, c.b_only) == (15, 3)
    assert c.diff == pytest.approx(np.mean(a) - np.mean(b)) == pytest.approx(0.4)
    assert c.p_value == pytest.approx(stats.mcnemar_exact(15, 3))
    assert c.low <= c.diff <= c.high and c.low > 0
    assert c.significant
    assert c.verdict().startswith("A beats B on t: +40.0 points, 95% CI [")


def test_compare_names_the_winner_when_b_is_better():
    c = stats.compare("A", "B", "t", [0] * 20, [1] * 20)
    assert c.verdict().startswith("B beats A on t: +100.0 points")


def test_an_endpoint_compared_with_itself_is_never_significantly_different():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = list(rng.integers(0, 2, size=int(rng.integers(1, 60))).astype(float))
        c = stats.compare("A", "A2", "t", x, x)
        assert (c.diff, c.low, c.high, c.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert not c.significant and "no significant difference" in c.verdict()
        g = list(rng.uniform(0, 1, 12))
        assert stats.compare("A", "A2", "t", g, g).p_value == 1.0


def test_holm_correction_can_turn_a_significant_result_insignificant():
    alone = stats.compare("A", "B", "t", [1] * 9 + [0], [0] * 3 + [1] + [0] * 6)
    assert (alone.a_only, alone.b_only) == (8, 0)  # p = 2 / 256 = 0.0078
    assert alone.significant
    many = stats.with_holm([alone] + [stats.compare("A", "B", f"u{i}", [1, 0], [1, 0])
                                      for i in range(9)])
    assert many[0].p_adjusted == pytest.approx(min(1.0, 10 * alone.p_value))
    assert not many[0].significant
    assert "Holm-adjusted" in many[0].verdict()
