"""Clinical metrics of a classifier's scores (pure functions, scikit-learn where it has them; the ROC curve,
its area and the average precision are counted here, as scikit-learn counts them: see `_counts_above`).

Every binary metric takes `(y_true, y_score, ...)` like scikit-learn's metrics: y_true int class indices
(n,), y_score the positive class's probability (n,); threshold metrics predict positive where
score >= threshold. A metric that is undefined for the data (e.g. sensitivity when no positive case exists)
raises `MetricError` with the reason instead of returning NaN silently; the summaries record such a metric
as None with its reason under "undefined". K-class summaries are one-vs-rest per class plus macro averages.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from sklearn import metrics as skm

from cxrscale.errors import CxrError

if TYPE_CHECKING:
    from distributed.model.heads import Head


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


def accuracy(y_true, y_score, threshold: float = 0.5) -> float:
    c = confusion(y_true, y_score, threshold)
    return (c["tp"] + c["tn"]) / sum(c.values())


def balanced_accuracy(y_true, y_score, threshold: float = 0.5) -> float:
    """Mean of sensitivity and specificity (needs both classes)."""
    return (sensitivity(y_true, y_score, threshold) + specificity(y_true, y_score, threshold)) / 2


def f1(y_true, y_score, threshold: float = 0.5) -> float:
    """2 tp / (2 tp + fp + fn), the harmonic mean of PPV and sensitivity."""
    c = confusion(y_true, y_score, threshold)
    if 2 * c["tp"] + c["fp"] + c["fn"] == 0:
        raise MetricError("F1 is undefined: no positive cases and nothing predicted positive")
    return 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"])


def _both_classes(y_true, y_score, name: str) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_score = _check(y_true, y_score)
    if len(np.unique(y_true)) < 2:
        raise MetricError(f"{name} is undefined: the labels hold one class only")
    return y_true, y_score


def roc_auc(y_true, y_score) -> float:
    y_true, y_score = _both_classes(y_true, y_score, "ROC-AUC")
    fpr, tpr, _ = _roc_points(y_true, y_score)
    return float(np.trapezoid(tpr, fpr))


def average_precision(y_true, y_score) -> float:
    """PR-AUC as scikit-learn's average precision, the sum over thresholds of (recall gained) x precision
    (needs positive cases)."""
    y_true, y_score = _check(y_true, y_score)
    if not np.any(y_true == 1):
        raise MetricError("PR-AUC is undefined: no positive cases")
    fps, tps, _ = _counts_above(y_true, y_score)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * tps / (tps + fps)))


def _counts_above(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positives, true positives, threshold) at each distinct score taken as the threshold, highest
    first: the counts behind scikit-learn's roc_curve, roc_auc_score and average_precision_score, in its order
    (a stable sort, ties at one point, so the area through a tie is its trapezoid). Counted here because the
    bootstraps call them thousands of times per evaluation, where scikit-learn's input checks cost many times
    the counting (docs/benchmarks.md)."""
    if np.isnan(y_score).any():
        raise MetricError("the scores hold NaN")
    order = np.argsort(y_score, kind="mergesort")[::-1]
    score = y_score[order]
    ends = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tps = np.cumsum(y_true[order] == 1)[ends].astype(float)
    return 1.0 + ends - tps, tps, score[ends]


def _roc_points(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as scikit-learn's roc_curve(drop_intermediate=False): every distinct score,
    after the point (0, 0) at an infinite threshold; a rate whose class is absent is NaN, as there."""
    fps, tps, thresholds = _counts_above(y_true, y_score)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1], np.r_[np.inf, thresholds]


def log_loss(y_true, y_score) -> float:
    """Binary cross-entropy in nats (the thesis's loss), probabilities clipped away from 0 and 1."""
    y_true, y_score = _check(y_true, y_score)
    return float(skm.log_loss(y_true, np.clip(y_score, 1e-7, 1 - 1e-7), labels=[0, 1]))


def brier(y_true, y_score) -> float:
    """Mean squared difference between probability and outcome (0 is perfect, 0.25 a coin)."""
    y_true, y_score = _check(y_true, y_score)
    return float(skm.brier_score_loss(y_true, y_score, pos_label=1))


def calibration_bins(y_true, y_score, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width probability bins on [0, 1]: for each non-empty bin its count, mean predicted probability
    and observed fraction of positives (the points of a reliability diagram)."""
    y_true, y_score = _check(y_true, y_score)
    index = np.minimum((y_score * n_bins).astype(int), n_bins - 1)
    return [{"low": b / n_bins, "high": (b + 1) / n_bins, "count": int(np.sum(index == b)),
             "mean_predicted": float(np.mean(y_score[index == b])), "fraction_positive": float(np.mean(y_true[index == b]))}
            for b in range(n_bins) if np.any(index == b)]


def expected_calibration_error(y_true, y_score, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean |observed fraction - mean predicted probability| over equal-width bins."""
    bins = calibration_bins(y_true, y_score, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["fraction_positive"] - b["mean_predicted"]) for b in bins))


THRESHOLD_METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "balanced_accuracy": balanced_accuracy, "sensitivity": sensitivity,
    "specificity": specificity, "ppv": ppv, "npv": npv, "f1": f1}
SCORE_METRICS: dict[str, Callable[..., float]] = {
    "roc_auc": roc_auc, "average_precision": average_precision, "log_loss": log_loss, "brier": brier,
    "ece": expected_calibration_error}
INTERVAL_METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy")


def _evaluate_all(fns: dict[str, Callable[[np.ndarray, np.ndarray], float]], y_true, y_score) -> dict[str, Any]:
    """{name: value or None, "undefined": {name: reason}}."""
    out: dict[str, Any] = {"undefined": {}}
    for name, fn in fns.items():
        try:
            out[name] = float(fn(y_true, y_score))
        except MetricError as err:
            out[name] = None
            out["undefined"][name] = str(err)
    return out


def binary_metric_functions(threshold: float) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    fns: dict[str, Callable] = {name: (lambda y, s, fn=fn: fn(y, s, threshold)) for name, fn in THRESHOLD_METRICS.items()}
    return {**fns, **SCORE_METRICS}


def interval_metric_functions(threshold: float) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """The binary metrics reported with bootstrap intervals (INTERVAL_METRICS), at `threshold`."""
    fns = binary_metric_functions(threshold)
    return {k: fns[k] for k in INTERVAL_METRICS}


def binary_summary(y_true, y_score, threshold: float = 0.5) -> dict[str, Any]:
    """Every binary metric at `threshold`, the confusion counts, and the class counts."""
    y_true, y_score = _check(y_true, y_score)
    out = _evaluate_all(binary_metric_functions(threshold), y_true, y_score)
    return {"threshold": float(threshold), "n": int(len(y_true)), "positives": int(np.sum(y_true == 1)),
            "confusion": confusion(y_true, y_score, threshold), **out}


def multiclass_summary(y_true, probs, classes: Sequence[str]) -> dict[str, Any]:
    """K-class metrics of probabilities (n, K), predicting the argmax: accuracy, balanced accuracy, log loss,
    Brier score (mean over classes), top-label ECE, the K x K confusion matrix, and per class one-vs-rest
    sensitivity, specificity, PPV, NPV, F1, ROC-AUC and PR-AUC with their macro averages."""
    y_true = np.asarray(y_true).astype(int).ravel()
    probs = np.asarray(probs, dtype=float)
    k = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_true), k):
        raise MetricError(f"expected probabilities of shape ({len(y_true)}, {k}), got {probs.shape}")
    if len(y_true) == 0:
        raise MetricError("no cases to evaluate")
    pred = probs.argmax(axis=1)
    per_class = {}
    for c, name in enumerate(classes):
        hard = (pred == c).astype(float)  # a 0/1 "score" thresholded at 0.5 gives the argmax decision
        yc = (y_true == c).astype(int)
        fns: dict[str, Callable] = {m: (lambda y, s, fn=THRESHOLD_METRICS[m]: fn(y, hard)) for m in
                                    ("sensitivity", "specificity", "ppv", "npv", "f1")}
        fns.update(roc_auc=roc_auc, average_precision=average_precision)
        per_class[name] = _evaluate_all(fns, yc, probs[:, c])
    macro = {m: (float(np.mean(vals)) if len(vals := [pc[m] for pc in per_class.values() if pc[m] is not None]) == k
                 else None) for m in ("sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "average_precision")}
    onehot = np.eye(k)[y_true]
    return {"n": int(len(y_true)), "class_counts": {n: int(np.sum(y_true == c)) for c, n in enumerate(classes)},
            "accuracy": float(np.mean(pred == y_true)), "balanced_accuracy": macro["sensitivity"],
            "log_loss": cross_entropy(y_true, probs),
            "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
            "ece": expected_calibration_error((pred == y_true).astype(int), probs.max(axis=1)),
            "confusion_matrix": skm.confusion_matrix(y_true, pred, labels=list(range(k))).tolist(),
            "macro": macro, "per_class": per_class}


def cross_entropy(y_true, probs) -> float:
    """Mean cross-entropy in nats of class probabilities (n, K) against int labels (n,), probabilities
    clipped away from 0 as `log_loss` does."""
    probs = np.clip(np.asarray(probs, dtype=float), 1e-7, 1)
    probs = probs / probs.sum(axis=1, keepdims=True)  # rows still sum to one after the clip
    return float(skm.log_loss(np.asarray(y_true).astype(int).ravel(), probs, labels=list(range(probs.shape[1]))))


def probability_quality(labels: np.ndarray, probs: np.ndarray, head: Head) -> dict[str, float]:
    """ECE (10 equal-width bins), Brier score and log loss of probabilities (n, head.columns); of a multi-label
    head, over every known (image, label) pair pooled."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    if head.multilabel:
        targets = np.asarray(labels)
        seen = known(targets)
        y, p = targets[seen].astype(int), p[seen]
        return {"ece": expected_calibration_error(y, p), "brier": brier(y, p), "log_loss": log_loss(y, p)}
    y = np.asarray(labels).astype(int).ravel()
    if head.binary:
        return {"ece": expected_calibration_error(y, p[:, 1]), "brier": brier(y, p[:, 1]),
                "log_loss": log_loss(y, p[:, 1])}
    onehot = np.eye(p.shape[1])[y]
    return {"ece": expected_calibration_error(p.argmax(axis=1) == y, p.max(axis=1)),
            "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
            "log_loss": cross_entropy(y, p)}


def class_roc_auc(y_true, probs) -> float:
    """ROC-AUC of class probabilities (n, K): of the positive class for K = 2, the one-vs-rest macro
    average for K > 2; MetricError when a class is missing from the labels."""
    y_true, probs = np.asarray(y_true).astype(int).ravel(), np.asarray(probs, dtype=float)
    k = probs.shape[1]
    if k == 2:
        return roc_auc(y_true, probs[:, 1])
    if len(np.unique(y_true)) < k:
        raise MetricError("macro ROC-AUC is undefined: some class is missing")
    return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(k))))


def validation_metrics(y_true, probs) -> dict[str, float]:
    """The numbers training monitors after every epoch: val_loss (cross-entropy), val_accuracy (argmax) and
    val_auc (`class_roc_auc`) of probabilities (n, K). An undefined AUC (a class missing from a tiny
    validation split) is NaN here, not an error: Keras's callbacks treat NaN as "no improvement", so
    training goes on instead of stopping."""
    y_true, probs = np.asarray(y_true).astype(int).ravel(), np.asarray(probs, dtype=float)
    out = {"val_loss": cross_entropy(y_true, probs), "val_accuracy": float(np.mean(probs.argmax(axis=1) == y_true))}
    try:
        out["val_auc"] = class_roc_auc(y_true, probs)
    except MetricError:
        out["val_auc"] = float("nan")
    return out


def multiclass_metric_functions() -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """Metrics of (labels, probabilities (n, K)) for bootstrap intervals of K-class models."""
    def macro_recall(y, p):
        return float(skm.recall_score(y, p.argmax(axis=1), average="macro", labels=np.unique(y), zero_division=0))

    return {"roc_auc": class_roc_auc, "accuracy": lambda y, p: float(np.mean(p.argmax(axis=1) == y)),
            "balanced_accuracy": macro_recall}


def youden_threshold(y_true, y_score) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J) on these cases."""
    y_true, y_score = _check(y_true, y_score)
    if len(np.unique(y_true)) < 2:
        raise MetricError("a Youden threshold needs both classes")
    fpr, tpr, thresholds = _roc_points(y_true, y_score)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def worst_case_youden_threshold(y_true, scorings) -> float:
    """The threshold maximising the smallest Youden's J across several scorings of the same cases (the rows
    of `scorings`: for example one image set as it is and under acquisition shifts), so the operating point
    that holds best under the worst of them. Among equally good thresholds, the one whose J is highest on
    average over the scorings, then the highest, as `youden_threshold` takes; with one scoring it is
    `youden_threshold`."""
    y_true = np.asarray(y_true).astype(int).ravel()
    scorings = np.atleast_2d(np.asarray(scorings, dtype=float))
    if len(y_true) == 0:
        raise MetricError("no cases to evaluate")
    if scorings.shape[1] != len(y_true):
        raise MetricError(f"{len(y_true)} labels but scorings of {scorings.shape[1]} cases")
    if np.isnan(scorings).any():
        raise MetricError("the scores hold NaN")
    positive = y_true == 1
    if positive.all() or not positive.any():
        raise MetricError("a Youden threshold needs both classes")
    candidates = np.unique(scorings)  # predicting positive where score >= candidate, as everywhere here
    worst, total = np.full(len(candidates), np.inf), np.zeros(len(candidates))
    for scores in scorings:
        pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
        sensitivity = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)
        specificity = np.searchsorted(neg, candidates, side="left") / len(neg)
        j = sensitivity + specificity - 1.0
        worst, total = np.minimum(worst, j), total + j
    best = np.flatnonzero(worst == worst.max())
    best = best[total[best] == total[best].max()]
    return float(min(candidates[best[-1]], 1.0))


def threshold_for_sensitivity(y_true, y_score, target: float) -> float:
    """The highest threshold (so the highest specificity) whose sensitivity is still >= target."""
    y_true, y_score = _check(y_true, y_score)
    if not 0 < target <= 1:
        raise MetricError(f"target sensitivity must be in (0, 1], got {target}")
    if not np.any(y_true == 1):
        raise MetricError("a sensitivity-based threshold needs positive cases")
    fpr, tpr, thresholds = _roc_points(y_true, y_score)
    ok = np.flatnonzero(tpr >= target)
    return float(min(thresholds[ok[0]], 1.0))


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y_true, y_score, *, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, lower, upper) of one metric; see `bootstrap_intervals`."""
    ci = bootstrap_intervals({"m": metric}, y_true, y_score, n_resamples=n_resamples, confidence=confidence,
                             seed=seed)["m"]
    if ci["value"] is None:
        raise MetricError(ci["undefined"])
    return ci["value"], ci["low"], ci["high"]


def stratified_resamples(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Indices of `n_resamples` bootstrap resamples, each keeping every class's count (drawn with replacement
    within the class), drawn one at a time from `rng`. The classes' indices are found once, not per resample:
    the bootstraps are the evaluation's hot loop."""
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(n_resamples):
        yield np.concatenate([rng.choice(group, len(group), replace=True) for group in groups])


def bootstrap_intervals(metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]], y_true, y_score, *,
                        n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """{name: {"value", "low", "high"}} by a percentile bootstrap stratified by class: each resample keeps
    the class counts, so every resample can define the metric, and all metrics share the same resamples.
    y_score may be (n,) or (n, K). A metric undefined on the data gets {"value": None, "undefined": reason}."""
    y_true = np.asarray(y_true).astype(int).ravel()
    y_score = np.asarray(y_score, dtype=float)
    if len(y_true) == 0 or len(y_score) != len(y_true):
        raise MetricError(f"bootstrap needs matching, non-empty labels and scores ({len(y_true)} vs {len(y_score)})")
    out: dict[str, dict] = {}
    live = {}
    for name, fn in metrics.items():
        try:
            out[name] = {"value": float(fn(y_true, y_score))}
            live[name] = fn
        except MetricError as err:
            out[name] = {"value": None, "undefined": str(err)}
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in live}
    for idx in stratified_resamples(y_true, n_resamples, rng):
        for name, fn in live.items():
            values[name].append(fn(y_true[idx], y_score[idx]))
    alpha = (1 - confidence) / 2
    for name in live:
        low, high = np.quantile(values[name], [alpha, 1 - alpha]) if values[name] else (np.nan, np.nan)
        out[name].update(low=float(low), high=float(high), confidence=confidence, resamples=n_resamples)
    return out


# --- multi-label: targets (n, K) of 1 positive, 0 negative, -1 unknown; probabilities (n, K) ----------------

def known(targets) -> np.ndarray:
    """Where a multi-label target is known (0 or 1), (n, K) bool."""
    return np.asarray(targets) >= 0


def label_roc_aucs(targets, probs) -> list[float | None]:
    """ROC-AUC of each label over the images where it is known; None where the label has no positive or no
    negative among them."""
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=float)
    out: list[float | None] = []
    for k in range(targets.shape[1]):
        seen = targets[:, k] >= 0
        y = targets[seen, k].astype(int)
        out.append(roc_auc(y, probs[seen, k]) if len(np.unique(y)) == 2 else None)
    return out


def macro_roc_auc(targets, probs) -> float:
    """The mean of the labels' ROC-AUCs (`label_roc_aucs`) over the labels where it is defined; MetricError
    when none is."""
    defined = [a for a in label_roc_aucs(targets, probs) if a is not None]
    if not defined:
        raise MetricError("macro ROC-AUC is undefined: no label has both positive and negative images")
    return float(np.mean(defined))


def micro_roc_auc(targets, probs) -> float:
    """ROC-AUC of every known (image, label) pair pooled: dominated by the frequent labels."""
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=float)
    seen = known(targets)
    return roc_auc(targets[seen].astype(int), probs[seen])


def masked_cross_entropy(targets, probs) -> float:
    """Binary cross-entropy in nats of every known (image, label) pair, probabilities clipped as `log_loss`."""
    targets, probs = np.asarray(targets), np.clip(np.asarray(probs, dtype=float), 1e-7, 1 - 1e-7)
    seen = known(targets)
    y, p = targets[seen], probs[seen]
    if not len(y):
        raise MetricError("no known labels to evaluate")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def multilabel_validation_metrics(targets, probs) -> dict[str, float]:
    """What training monitors for a multi-label head: val_loss (masked cross-entropy), val_accuracy (of the
    known labels at 0.5) and val_auc, the macro ROC-AUC over the labels (NaN when undefined, as in
    `validation_metrics`)."""
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=float)
    seen = known(targets)
    out = {"val_loss": masked_cross_entropy(targets, probs),
           "val_accuracy": float(np.mean((probs[seen] >= 0.5) == (targets[seen] == 1)))}
    try:
        out["val_auc"] = macro_roc_auc(targets, probs)
    except MetricError:
        out["val_auc"] = float("nan")
    return out
