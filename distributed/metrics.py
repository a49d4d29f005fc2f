"""Clinical metrics of a classifier's scores (pure functions, scikit-learn where it has them).

Every function takes `(y_true, y_score, ...)` like scikit-learn's metrics: y_true int class indices (n,),
y_score the positive class's probability (n,) for two classes. A metric that is undefined for the data
(e.g. sensitivity when no positive case exists) raises `MetricError` with the reason instead of
returning NaN silently.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn import metrics as skm

from preprocessing.runtime import CxrError


class MetricError(CxrError):
    """A metric that the given labels cannot define (one class only, empty input)."""


def _check(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(int).ravel()
    y_score = np.asarray(y_score, dtype=float).ravel()
    if len(y_true) == 0:
        raise MetricError("no cases to evaluate")
    if len(y_true) != len(y_score):
        raise MetricError(f"{len(y_true)} labels but {len(y_score)} scores")
    return y_true, y_score


def confusion(y_true, y_score, threshold: float = 0.5) -> dict[str, int]:
    """tp, fp, tn, fn of predicting positive where score >= threshold."""
    y_true, y_score = _check(y_true, y_score)
    pred = y_score >= threshold
    pos = y_true == 1
    return {"tp": int(np.sum(pred & pos)), "fp": int(np.sum(pred & ~pos)),
            "tn": int(np.sum(~pred & ~pos)), "fn": int(np.sum(~pred & pos))}


def _rate(y_true, y_score, threshold: float, hit: str, miss: str, name: str, empty: str) -> float:
    """confusion[hit] / (confusion[hit] + confusion[miss]); MetricError naming `empty` when that is 0 / 0."""
    c = confusion(y_true, y_score, threshold)
    if c[hit] + c[miss] == 0:
        raise MetricError(f"{name} is undefined: {empty}")
    return c[hit] / (c[hit] + c[miss])


def sensitivity(y_true, y_score, threshold: float = 0.5) -> float:
    """Recall of the positive class, tp / (tp + fn)."""
    return _rate(y_true, y_score, threshold, "tp", "fn", "sensitivity", "no positive cases")


def specificity(y_true, y_score, threshold: float = 0.5) -> float:
    """tn / (tn + fp)."""
    return _rate(y_true, y_score, threshold, "tn", "fp", "specificity", "no negative cases")


def ppv(y_true, y_score, threshold: float = 0.5) -> float:
    """Precision, tp / (tp + fp)."""
    return _rate(y_true, y_score, threshold, "tp", "fp", "PPV", "nothing predicted positive")


def npv(y_true, y_score, threshold: float = 0.5) -> float:
    """tn / (tn + fn)."""
    return _rate(y_true, y_score, threshold, "tn", "fn", "NPV", "nothing predicted negative")


def roc_auc(y_true, y_score) -> float:
    y_true, y_score = _check(y_true, y_score)
    if len(np.unique(y_true)) < 2:
        raise MetricError("ROC-AUC is undefined: the labels hold one class only")
    return float(skm.roc_auc_score(y_true, y_score))


def youden_threshold(y_true, y_score) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J) on these cases."""
    y_true, y_score = _check(y_true, y_score)
    if len(np.unique(y_true)) < 2:
        raise MetricError("a Youden threshold needs both classes")
    fpr, tpr, thresholds = skm.roc_curve(y_true, y_score, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def threshold_for_sensitivity(y_true, y_score, target: float) -> float:
    """The highest threshold (so the highest specificity) whose sensitivity is still >= target."""
    y_true, y_score = _check(y_true, y_score)
    if not 0 < target <= 1:
        raise MetricError(f"target sensitivity must be in (0, 1], got {target}")
    if not np.any(y_true == 1):
        raise MetricError("a sensitivity-based threshold needs positive cases")
    fpr, tpr, thresholds = skm.roc_curve(y_true, y_score, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= target)
    return float(min(thresholds[ok[0]], 1.0))


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y_true, y_score, *, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, lower, upper) by a percentile bootstrap stratified by class: each resample keeps
    the class counts, so every resample can define the metric."""
    y_true, y_score = _check(y_true, y_score)
    point = metric(y_true, y_score)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    values = []
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        values.append(metric(y_true[idx], y_score[idx]))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(point), float(low), float(high)
