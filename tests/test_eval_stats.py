"""Uncertainty helpers: Wilson interval, exact McNemar, paired bootstrap, pass@k."""

import pytest

from otr_cli.eval.stats import mcnemar_exact, paired_bootstrap_ci, pass_at_k, wilson_interval


def test_wilson_interval_contains_the_estimate_and_stays_in_bounds():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.2 < high < 0.35
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


def test_mcnemar_exact_counts_only_discordant_pairs():
    # 5 problems only B solves, none only A: p = 2 * (1/2)^5.
    a = [True] * 10 + [False] * 5
    b = [True] * 15
    assert mcnemar_exact(a, b) == {"a_only": 0, "b_only": 5, "p_value": pytest.approx(0.0625)}
    assert mcnemar_exact(a, a)["p_value"] == 1.0
    balanced = mcnemar_exact([True, False] * 5, [False, True] * 5)
    assert balanced["p_value"] == pytest.approx(1.0)


def test_mcnemar_rejects_unpaired_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_interval_brackets_the_delta_and_is_seeded():
    a = [True] * 30 + [False] * 70
    b = [True] * 50 + [False] * 50
    low, high = paired_bootstrap_ci(a, b)
    assert low < 0.2 < high and low > 0.0
    assert paired_bootstrap_ci(a, b) == (low, high)


def test_pass_at_k_matches_its_definition():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_paired_comparison_aligns_on_shared_problems_and_reports_every_figure():
    from otr_cli.eval.stats import paired_comparison, shared_outcomes

    reference = {"p1": True, "p2": False, "p3": False, "p4": True, "only_ref": True}
    other = {"p1": True, "p2": True, "p3": True, "p4": False, "only_other": False}
    a, b = shared_outcomes(reference, other)
    assert (a, b) == ([True, False, False, True], [True, True, True, False])
    result = paired_comparison(a, b)
    assert (result["n"], result["reference_accuracy"], result["accuracy"]) == (4, 0.5, 0.75)
    assert result["delta"] == pytest.approx(0.25)
    assert (result["reference_only"], result["other_only"]) == (1, 2)
    assert result["mcnemar_p"] == pytest.approx(1.0)
    assert result["delta_ci95"][0] <= 0.25 <= result["delta_ci95"][1]
