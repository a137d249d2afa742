"""Statistics on known data (server.stats): exact Wilcoxon p, Spearman ρ, effect sizes, CIs; and the
eval's bar (clients.eval.bar)."""

from __future__ import annotations

import pytest

from clients.eval import bar
from server import stats


def test_wilcoxon_exact_p_all_positive():
    # 8 positive differences with distinct ranks: exact two-sided p = 2 / 2^8.
    assert stats.wilcoxon_p([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(2 / 256)
    assert stats.wilcoxon_p([-1, -2, -3, -4, -5, -6, -7, -8]) == pytest.approx(2 / 256)


def test_wilcoxon_mixed_and_null():
    # Ranks 1..6 with signs + - + - + -: W+ = 1+3+5 = 9 of 21 → a large p.
    assert stats.wilcoxon_p([1, -2, 3, -4, 5, -6]) > 0.5
    assert stats.wilcoxon_p([0, 0, 0]) == 1.0
    assert stats.wilcoxon_p([]) == 1.0


def test_rank_biserial_and_cohen_dz():
    assert stats.rank_biserial([1, 2, 3]) == 1.0
    assert stats.rank_biserial([-1, -2, 0]) == -1.0
    # ranks |d|: 1→1, 2→2, 3→3; (R+ − R−) / 6 = (1 + 3 − 2) / 6.
    assert stats.rank_biserial([1, -2, 3]) == pytest.approx(2 / 6)
    assert stats.cohen_dz([1, 2, 3]) == pytest.approx(2.0)  # mean 2, sd 1
    assert stats.cohen_dz([0, 0, 0]) == 0.0
    assert stats.cohen_dz([1, 1, 1]) is None  # infinite effect: not a number
    assert stats.cohen_dz([1]) is None


def test_spearman_known_values():
    assert stats.spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])["rho"] == pytest.approx(1.0)
    # Σd² = 4 over n = 5: ρ = 1 − 6·4 / (5·24) = 0.8.
    assert stats.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])["rho"] == pytest.approx(0.8)
    assert stats.spearman([1, 2, 3], [5, 5, 5]) == {"rho": None, "p": None}


def test_paired_and_bootstrap_ci():
    steered = {f"p{i}": float(i) + 1.0 for i in range(10)}
    baseline = {f"p{i}": float(i) for i in range(10)}
    baseline["extra"] = 99.0  # unpaired: ignored
    r = stats.paired_wilcoxon(steered, baseline, seed=0)
    assert r["n"] == 10
    assert r["diff"] == pytest.approx(1.0)
    assert r["diff_ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]  # every difference is 1
    assert r["p_wilcoxon"] == pytest.approx(2 / 2 ** 10)
    assert r["rank_biserial"] == 1.0
    assert r["cohen_dz"] is None  # sd 0

    noisy = {f"p{i}": baseline[f"p{i}"] + (0.5 if i % 2 else 1.5) for i in range(10)}
    r = stats.paired_wilcoxon(noisy, baseline, seed=0)
    lo, hi = r["diff_ci95"]
    assert lo < 1.0 < hi and 0.5 <= lo and hi <= 1.5
    assert r["cohen_dz"] == pytest.approx(1.0 / 0.5270462766947299)  # sd of five 0.5s and five 1.5s
    assert stats.paired_wilcoxon(noisy, baseline, seed=0) == r  # seeded bootstrap


def test_per_prompt_means_and_dose_response():
    scores = {
        -1.0: {"a": [0.0, 0.2], "b": [0.1]},
        0.0: {"a": [0.3], "b": [0.5]},
        1.0: {"a": [0.9], "b": [0.7, float("nan")]},
        2.0: {"a": [0.8], "b": [0.6]},
    }
    assert stats.per_prompt_means(scores[1.0]) == {"a": 0.9, "b": 0.7}
    dr = bar.dose_response(scores)
    # means: −1 → 0.1, 0 → 0.4, 1 → 0.8, 2 → 0.7: ranks 1 2 4 3 → ρ = 1 − 6·2/60 = 0.8.
    assert dr["over_means"]["rho"] == pytest.approx(0.8)
    assert dr["over_samples"]["rho"] > 0.5


def test_passes_bar():
    good = {"n": 24, "diff": 0.3, "p_wilcoxon": 0.001}
    assert bar.passes_bar(good, 0.9, 1.5)["pass"] is True
    wrong_way = bar.passes_bar({"n": 24, "diff": -0.3, "p_wilcoxon": 0.001}, 0.9, 1.5)
    assert wrong_way["direction_p<0.01"] is False and wrong_way["pass"] is False
    not_sig = bar.passes_bar({"n": 24, "diff": 0.3, "p_wilcoxon": 0.02}, 0.9, 1.5)
    assert not_sig["direction_p<0.01"] is False
    assert bar.passes_bar(good, 0.8, 1.5)["spearman>0.8"] is False  # strictly greater
    assert bar.passes_bar(good, 0.9, 2.01)["ppl_ratio<=2"] is False
    missing = bar.passes_bar(good, 0.9, None)
    assert missing["ppl_ratio<=2"] is None and missing["pass"] is False
