"""Clinical metrics against hand-computed cases, threshold choice, and bootstrap intervals."""
from __future__ import annotations

import numpy as np
import pytest

from distributed import metrics as m

# 4 positives, 4 negatives. At threshold 0.5: tp=3 (0.9, 0.8, 0.6), fn=1 (0.4), fp=1 (0.7), tn=3.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1])


def test_hand_computed_confusion_and_rates():
    assert m.confusion(Y, S) == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert m.sensitivity(Y, S) == 0.75 and m.specificity(Y, S) == 0.75
    assert m.ppv(Y, S) == 0.75 and m.npv(Y, S) == 0.75
    # AUC: of 16 positive/negative pairs, only (0.4 < 0.7), (0.6 < 0.7) are ordered wrongly: 14/16.
    assert m.roc_auc(Y, S) == pytest.approx(14 / 16)
    assert m.sensitivity(Y, S, threshold=0.35) == 1.0


def test_one_class_gives_a_clear_error_not_nan():
    with pytest.raises(m.MetricError, match="one class"):
        m.roc_auc(np.ones(5), np.linspace(0, 1, 5))
    with pytest.raises(m.MetricError, match="no positive cases"):
        m.sensitivity(np.zeros(4), np.full(4, 0.9))
    with pytest.raises(m.MetricError, match="no cases"):
        m.roc_auc([], [])


def test_thresholds():
    assert m.youden_threshold(Y, S) in (0.6, 0.7, 0.4)
    t = m.threshold_for_sensitivity(Y, S, 1.0)
    assert t == 0.4 and m.sensitivity(Y, S, t) == 1.0
    t75 = m.threshold_for_sensitivity(Y, S, 0.75)
    assert t75 == 0.6 and m.specificity(Y, S, t75) >= m.specificity(Y, S, t)


def test_bootstrap_contains_point_and_narrows_with_n():
    rng = np.random.default_rng(1)

    def cohort(n):
        y = rng.integers(0, 2, n)
        return y, np.clip(0.35 * y + rng.normal(0.33, 0.2, n), 0, 1)

    small, large = cohort(100), cohort(2000)
    p1, lo1, hi1 = m.bootstrap_ci(m.roc_auc, *small, n_resamples=300)
    p2, lo2, hi2 = m.bootstrap_ci(m.roc_auc, *large, n_resamples=300)
    assert lo1 <= p1 <= hi1 and lo2 <= p2 <= hi2
    assert (hi2 - lo2) < 0.5 * (hi1 - lo1)
    assert m.bootstrap_ci(m.roc_auc, *small, n_resamples=50, seed=3) == m.bootstrap_ci(
        m.roc_auc, *small, n_resamples=50, seed=3)
