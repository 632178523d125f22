"""The report's statistics as functions: one mean ± std rule, t CIs, paired differences (CI, wins,
Wilcoxon p), group convergence, effective labels on a synthetic scratch curve. No results files."""

import math

import numpy as np
import pytest
from scipy import stats

from transfer_lab import report as report_module
from transfer_lab.analysis import summary as analysis_summary
from transfer_lab.analysis.aggregate import ci95, converged_label, describe
from transfer_lab.analysis.effective_labels import effective_labels, monotone_curve
from transfer_lab.analysis.paired import paired_stats, verdict, wilcoxon_p

NAN = float("nan")


def same(a, b, rel=1e-6):
    """Equal numbers, or both NaN (NaN is the answer for an undefined spread)."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel)


@pytest.mark.parametrize("mean_std", [report_module.mean_std, analysis_summary.mean_std],
                         ids=["report", "analysis"])
@pytest.mark.parametrize("values, want", [
    ([0.5], (0.5, NAN)),  # one seed: no spread, not a spread of 0
    ([0.5, 0.7], (0.6, math.sqrt(0.02))),
    ([0.5, None, NAN, 0.7], (0.6, math.sqrt(0.02))),  # unmeasured values are skipped
    ([], (NAN, NAN)),
])
def test_report_and_analysis_share_one_mean_std_rule(mean_std, values, want):
    got = mean_std(values)
    assert same(got[0], want[0]) and same(got[1], want[1])


@pytest.mark.parametrize("n", [2, 3, 5, 10, 31, 100])
def test_ci95_is_the_student_t_half_width(n):
    assert ci95(1.0, n) == pytest.approx(stats.t.ppf(0.975, n - 1) / math.sqrt(n))


@pytest.mark.parametrize("std, n", [(NAN, 1), (0.3, 1), (NAN, 5)])
def test_ci95_is_undefined_without_a_spread(std, n):
    assert math.isnan(ci95(std, n))


def test_describe_counts_finite_values_only():
    d = describe([0.5, None, 0.7])
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.6)
    assert d["ci95"] == pytest.approx(12.7062047 * math.sqrt(0.02) / math.sqrt(2))


# (differences, mean, CI half-width, wins, exact two-sided Wilcoxon p), all by hand:
# [.02 .05 -.01 .04]: sd² = (.005² + .025² + .035² + .015²) / 3 = .0007, t(3) = 3.182446;
#   only rank 1 is negative: P(T⁻ ≤ 1) = |{∅, {1}}| / 2⁴ → p = 2 · 2/16
# [.1 .12 .08]: sd = .02, t(2) = 4.302653; no negative rank: p = 2 · 1/8
PAIRED = [([0.02, 0.05, -0.01, 0.04], 0.025, 3.182446 * math.sqrt(0.0007) / 2, 3, 0.25),
          ([0.1, 0.12, 0.08], 0.1, 4.302653 * 0.02 / math.sqrt(3), 3, 0.25),
          ([-0.1, -0.3, -0.2, -0.4, -0.5, -0.6], -0.35, 2.570582 * math.sqrt(0.035) / math.sqrt(6), 0,
           2 / 64)]


@pytest.mark.parametrize("diffs, mean, half, wins, p", PAIRED)
def test_paired_statistics_by_hand(diffs, mean, half, wins, p):
    s = paired_stats(diffs)
    assert s["paired_diff_mean"] == pytest.approx(mean)
    assert s["paired_diff_ci95"] == pytest.approx(half, rel=1e-5)
    assert s["wins"] == wins and s["n_pairs"] == len(diffs)
    assert s["p_value"] == pytest.approx(p) and s["p_method"] == "exact"
    assert s["p_value"] == pytest.approx(stats.wilcoxon(diffs).pvalue)


SMALL = "not significant: n too small for p < 0.05"  # fewer than 6 pairs: p ≥ 2/2^5 > 0.05


@pytest.mark.parametrize("diffs, word", [
    ([0.02, 0.05, -0.01, 0.04, 0.03, -0.02], "not significant"),  # CI crosses 0
    ([0.1, 0.12, 0.08], SMALL),  # CI [0.050, 0.150] excludes 0, but the exact p is at least 0.25
    ([-0.1, -0.3, -0.2, -0.4, -0.5, -0.6], "significant"),  # CI excludes 0 and p = 2/64
    ([0.1, 0.1, 0.1, 0.1, 0.1, -0.01], "not significant"),  # CI [.035, .129] excludes 0; p .0625
    ([0.3], SMALL),  # one pair: no CI at all
    ([0.0, 0.0, 0.0], SMALL),
])
def test_significant_needs_the_ci_to_exclude_0_and_p_below_005(diffs, word):
    s = paired_stats(diffs)
    assert verdict(s) == word
    assert s["significant"] == (word == "significant")


@pytest.mark.parametrize("diffs, wins", [([0.1, -0.1, 0.0, 0.2], 2), ([0.0, 0.0], 0), ([-0.1], 0)])
def test_wins_count_strict_improvements_only(diffs, wins):
    assert paired_stats(diffs)["wins"] == wins


@pytest.mark.parametrize("diffs, method", [
    ([0.05, -0.05, 0.1], "exact permutation"),        # tied |d|: scipy permutes the signs
    ([0.05, 0.0, 0.1, 0.2], "exact permutation"),     # a zero difference
    (list(np.linspace(0.01, 0.6, 60)), "normal approximation"),
])
def test_wilcoxon_says_how_its_p_was_computed_and_agrees_with_scipy(diffs, method):
    p, how = wilcoxon_p(diffs)
    assert how == method and p == pytest.approx(stats.wilcoxon(diffs).pvalue)


def test_all_zero_differences_give_p_one():
    assert wilcoxon_p([0.0, 0.0, 0.0]) == (1.0, "all differences 0")


@pytest.mark.parametrize("flags, label", [
    ([True, True], "all"), ([True, False], "partial"), ([False, np.False_], "none"),
    ([None, None], "unknown"), ([True, None], "unknown"), ([False, None], "partial"),
    ([np.True_, True], "all"),
])
def test_group_convergence(flags, label):
    assert converged_label(flags) == label


# scratch: linear in log2(budget), 0.5 at 5 labels/class to 0.8 at 40
LINEAR = ([5, 10, 20, 40], [0.5, 0.6, 0.7, 0.8])


@pytest.mark.parametrize("acc, want, bound", [
    (0.65, math.sqrt(10 * 20), ""),  # halfway in accuracy = halfway in log budget
    (0.6, 10.0, ""), (0.5, 5.0, ""), (0.8, 40.0, ""),
    (0.85, 40.0, ">"),  # beyond scratch's best: a bound, not an extrapolation
    (0.4, 5.0, "<"),
])
def test_effective_labels_interpolate_on_log_budget(acc, want, bound):
    eff, b = effective_labels(*monotone_curve(*LINEAR), acc)
    assert eff == pytest.approx(want) and b == bound


@pytest.mark.parametrize("acc, want", [(0.65, 10.0), (0.7, 20 * 2 ** (1 / 3))])
def test_a_noisy_scratch_curve_is_made_monotone_first(acc, want):
    # 10 labels beat 20 by seed noise: the isotonic fit pools them at 0.65
    budgets, curve = monotone_curve([40, 10, 5, 20], [0.8, 0.7, 0.5, 0.6])
    assert list(budgets) == [5, 10, 20, 40] and curve.tolist() == pytest.approx([0.5, 0.65, 0.65, 0.8])
    assert effective_labels(budgets, curve, acc)[0] == pytest.approx(want)
