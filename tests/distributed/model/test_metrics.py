"""Clinical metrics against hand-computed cases, threshold choice, and bootstrap intervals."""
from __future__ import annotations

import numpy as np
import pytest

from distributed.model import metrics as m

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
    # Youden J = sensitivity + specificity - 1 at each cut: 0.9 -> .25, 0.8 -> .5, 0.7 -> .25, 0.6 -> .5,
    # 0.4 -> .75, 0.3 -> .5, 0.2 -> .25, 0.1 -> 0: only 0.4 maximises it.
    assert m.youden_threshold(Y, S) == 0.4
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


def test_more_hand_computed_metrics():
    # Y/S above at 0.5: tp=3 fp=1 tn=3 fn=1
    assert m.accuracy(Y, S) == 0.75 and m.balanced_accuracy(Y, S) == 0.75
    assert m.f1(Y, S) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # AP: ranked 0.9+ 0.8+ 0.7- 0.6+ 0.4+ ...: precisions at each positive 1, 1, 3/4, 4/5 -> mean
    assert m.average_precision(Y, S) == pytest.approx((1 + 1 + 3 / 4 + 4 / 5) / 4)
    expected_ll = -np.mean(np.where(Y == 1, np.log(S), np.log(1 - S)))
    assert m.log_loss(Y, S) == pytest.approx(expected_ll)
    assert m.brier(Y, S) == pytest.approx(np.mean((S - Y) ** 2))


def test_roc_auc_is_scikit_learns_with_ties_and_masks():
    from sklearn.metrics import roc_auc_score

    # Y/S above: of the 16 positive-negative pairs only (0.6, 0.7) and (0.4, 0.7) are ordered wrongly
    assert m.roc_auc(Y, S) == pytest.approx(14 / 16)
    rng = np.random.default_rng(3)
    for n in (12, 300):
        y = (rng.random(n) < 0.3).astype(int)
        y[:2] = [0, 1]
        s = np.round(rng.random(n) + 0.4 * y, 1)  # many ties, across the classes too
        assert m.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    targets = np.stack([y, 1 - y, np.where(rng.random(n) < 0.2, -1, y)], axis=1)
    scores = rng.random((n, 3)) + 0.3 * targets
    seen = targets[:, 2] >= 0
    assert m.label_roc_aucs(targets, scores) == pytest.approx(
        [roc_auc_score(y, scores[:, 0]), roc_auc_score(1 - y, scores[:, 1]),
         roc_auc_score(targets[seen, 2], scores[seen, 2])], abs=1e-12)
    with pytest.raises(m.MetricError, match="NaN"):
        m.roc_auc(Y, np.where(Y == 1, np.nan, S))


def test_curves_thresholds_and_average_precision_are_scikit_learns():
    """The ROC points, the thresholds chosen on them and the average precision are counted here (the bootstraps
    call them thousands of times) and must be scikit-learn's, ties included."""
    from sklearn.metrics import average_precision_score, roc_curve

    rng = np.random.default_rng(5)
    for n, decimals in ((9, 1), (40, 1), (500, 2), (500, 6)):
        y = (rng.random(n) < 0.35).astype(int)
        y[:2] = [0, 1]
        s = np.round(rng.random(n) + 0.3 * y, decimals)
        fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
        ours = m._roc_points(y, s)
        assert all(np.array_equal(a, b) for a, b in zip(ours, (fpr, tpr, thresholds)))
        assert m.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        j = int(np.argmax(tpr - fpr))
        assert m.youden_threshold(y, s) == min(thresholds[j], 1.0)
        for target in (0.5, 0.9, 1.0):
            assert m.threshold_for_sensitivity(y, s, target) == min(thresholds[np.flatnonzero(tpr >= target)[0]], 1.0)
    # the point before any score (threshold +inf) counts: all positives below every negative gives 1.0
    assert m.youden_threshold(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert m.threshold_for_sensitivity(np.ones(4, int), np.array([0.3, 0.1, 0.3, 0.8]), 0.75) == 0.3


def test_calibration_error():
    # bins [0.2, 0.3) holds 0.25 x4 with 1 positive, [0.7, 0.8) holds 0.75 x4 with 3: perfectly calibrated
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert m.expected_calibration_error(y, p) == pytest.approx(0.0)
    assert m.expected_calibration_error(np.array([1, 0, 1, 0]), np.ones(4)) == pytest.approx(0.5)
    bins = m.calibration_bins(y, p)
    assert [(b["count"], b["fraction_positive"]) for b in bins] == [(4, 0.25), (4, 0.75)]


def test_summaries_record_undefined_metrics_with_reasons():
    one_class = m.binary_summary(np.ones(6), np.linspace(0.1, 0.9, 6), 0.5)
    assert one_class["roc_auc"] is None and "one class" in one_class["undefined"]["roc_auc"]
    assert one_class["specificity"] is None and "no negative cases" in one_class["undefined"]["specificity"]
    assert one_class["sensitivity"] == 0.5  # 0.58, 0.74, 0.9 of the six are >= 0.5
    assert not any(isinstance(v, float) and np.isnan(v) for v in one_class.values())


def test_multiclass_summary_by_hand():
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.4, .5, .1], [.1, .8, .1], [.2, .7, .1], [.1, .2, .7], [.5, .1, .4]])
    s = m.multiclass_summary(y, probs, classes)
    assert s["accuracy"] == pytest.approx(4 / 6)  # row 2 -> b, row 6 -> a are wrong
    assert s["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert s["per_class"]["b"]["sensitivity"] == 1.0 and s["per_class"]["b"]["ppv"] == pytest.approx(2 / 3)
    assert s["per_class"]["a"]["specificity"] == pytest.approx(3 / 4)
    assert s["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    onehot = np.eye(3)[y]
    assert s["brier"] == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    ci = m.bootstrap_intervals(m.multiclass_metric_functions(), y, probs, n_resamples=100)
    assert ci["accuracy"]["low"] <= s["accuracy"] <= ci["accuracy"]["high"]
    with pytest.raises(m.MetricError, match="shape"):
        m.multiclass_summary(y, probs[:, :2], classes)


def test_worst_case_youden_threshold():
    # A second scoring of the same cases in which three normals score higher (0.7 -> 0.85, 0.3 -> 0.5,
    # 0.2 -> 0.45). Youden's 0.4 keeps J = 0.75 on S but 0.25 under the shift; at 0.6 both read 0.5, and no
    # other cut does better than 0.25 on the worse of the two.
    shifted = np.array([0.9, 0.8, 0.6, 0.4, 0.85, 0.5, 0.45, 0.1])
    assert m.worst_case_youden_threshold(Y, [S, shifted]) == 0.6
    assert m.worst_case_youden_threshold(Y, [S]) == m.youden_threshold(Y, S) == 0.4
    rng = np.random.default_rng(7)
    for n in (40, 200):
        y = rng.integers(0, 2, n)
        scorings = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.2, (3, n)), 0, 1), 2)  # rounded: ties
        assert m.worst_case_youden_threshold(y, scorings[:1]) == m.youden_threshold(y, scorings[0])
        t = m.worst_case_youden_threshold(y, scorings)

        def worst_j(cut: float) -> float:
            return min(m.sensitivity(y, s, cut) + m.specificity(y, s, cut) - 1 for s in scorings)

        assert worst_j(t) == pytest.approx(max(worst_j(c) for c in np.unique(scorings)))
    with pytest.raises(m.MetricError, match="both classes"):
        m.worst_case_youden_threshold(np.ones(8), [S])
    with pytest.raises(m.MetricError, match="8 labels but scorings of 7 cases"):
        m.worst_case_youden_threshold(Y, [S[:7]])
    with pytest.raises(m.MetricError, match="NaN"):
        m.worst_case_youden_threshold(Y, [S, np.where(S > 0.5, np.nan, S)])
