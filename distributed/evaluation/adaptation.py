"""Site adaptation's numbers: a calibration and an operating threshold fitted on a site's small labelled
sample, and bootstrap intervals that say how sure that operating point is. No TensorFlow here;
`python -m distributed.adapt` is the command.

The sample is small (50-200 images), so a point estimate fitted and measured on the same images flatters
itself. Each bootstrap round therefore refits the whole procedure (calibration and threshold) on a
stratified resample and measures it on the images the resample left out (out-of-bag), the way Efron and
Tibshirani estimate a fitted rule's error: the spread of those figures is what another sample of the same
size from the same site would give. Interval half-widths shrink about as 1 / sqrt(n), which gives the sample
size that would narrow them to a target.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxrscale.errors import CxrError
from distributed.evaluation.scores import ThresholdRule
from distributed.model import metrics as m
from distributed.model.calibration import Calibration, fit_calibration
from distributed.model.heads import Head, ModelError, sigmoid

MIN_PER_CLASS = 10  # fewer labelled images of a class cannot place a threshold
TARGET_HALF_WIDTH = 0.05  # the interval half-width the sample-size advice aims at


def fit_site(labels: np.ndarray, logits: np.ndarray, head: Head, method: str,
             rule: ThresholdRule) -> tuple[Calibration, float]:
    """The calibration `method` and the `rule`'s threshold (a calibrated probability of the positive class),
    both fitted on the labelled images' logits (n, head.units)."""
    calibration = fit_calibration(method, labels, logits, head)
    threshold = rule.choose(labels, calibration.apply(head, logits)[:, 1])
    return calibration, float(threshold)


def _at(labels: np.ndarray, probs: np.ndarray, threshold: float, head: Head) -> dict[str, float]:
    """Sensitivity, specificity and accuracy at `threshold`, and ECE, of images of both classes."""
    p = probs[:, 1]
    out = {name: float(m.THRESHOLD_METRICS[name](labels, p, threshold))
           for name in ("sensitivity", "specificity", "accuracy")}
    out["ece"] = m.probability_quality(labels, probs, head)["ece"]
    return out


def adapt_site(labels: np.ndarray, logits: np.ndarray, head: Head, *, method: str, rule: ThresholdRule,
               n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Fit the site's calibration and threshold on every labelled image, and bootstrap the procedure.

    Returns {"calibration", "threshold", "apparent" (the figures on the fitting images themselves),
    "out_of_bag" ({metric: {"value": mean, "low", "high"}}, 95 % percentile intervals of sensitivity,
    specificity and accuracy), "threshold_interval",
    "narrowing" (images needed for +-TARGET_HALF_WIDTH per metric), "n", "class_counts"}.
    """
    y = np.asarray(labels).astype(int).ravel()
    z = np.asarray(logits, np.float64)
    if not head.binary:
        raise CxrError("site adaptation chooses a binary operating threshold; this model has a "
                       f"{head.describe()} head")
    counts = [int(np.sum(y == c)) for c in (0, 1)]
    if min(counts) < MIN_PER_CLASS:
        raise CxrError(f"the labelled sample has {counts[0]} negative and {counts[1]} positive images: at least "
                       f"{MIN_PER_CLASS} of each are needed to place a threshold (100 or more are advised)")
    if rule.kind == "fixed":
        raise CxrError("--threshold: a fixed threshold is not adapted to the site; give youden, sensitivity:X "
                       "or specificity:X (or pass --threshold to predict)")
    try:
        calibration, threshold = fit_site(y, z, head, method, rule)
    except ModelError as err:
        raise CxrError(str(err)) from None
    probs = calibration.apply(head, z)
    rng = np.random.default_rng(seed)
    # no ECE out of bag: on the ~37 % of a small sample a round leaves out, the binned estimator's own bias
    # exceeds the miscalibration it would measure (benchmarks.shift measures it on a site's other images)
    rounds: dict[str, list[float]] = {k: [] for k in ("sensitivity", "specificity", "accuracy")}
    thresholds = []
    positive = head.positive_logit(z)
    for idx in m.stratified_resamples(y, n_bootstrap, rng):
        out = np.setdiff1d(np.arange(len(y)), idx)
        if len(np.unique(y[out])) < 2:
            continue
        try:
            cal_b, t_b = fit_site(y[idx], z[idx], head, method, rule)
        except (ModelError, CxrError, m.MetricError):
            continue
        measured = _at(y[out], cal_b.apply(head, z[out]), t_b, head)
        for key in rounds:
            rounds[key].append(measured[key])
        # the round's threshold on the final calibration's scale: the logit where its own map crosses t_b
        crossing = positive[np.argmin(np.abs(cal_b.apply(head, z)[:, 1] - t_b))]
        thresholds.append(float(calibration.apply(Head("binary", 1), np.array([[crossing]]))[0, 1]))
    if not thresholds:
        raise CxrError("no bootstrap round could refit the calibration and threshold: the labelled sample is "
                       "too small or has one class only")
    oob = {k: {"value": float(np.nanmean(v)), "low": float(np.nanpercentile(v, 2.5)),
               "high": float(np.nanpercentile(v, 97.5))} for k, v in rounds.items()}
    n = len(y)
    narrowing = {k: {"half_width": (iv["high"] - iv["low"]) / 2,
                     "images_for_target": int(math.ceil(n * ((iv["high"] - iv["low"]) / 2 / TARGET_HALF_WIDTH) ** 2))}
                 for k, iv in oob.items()}
    return {"calibration": calibration.to_dict(), "threshold": threshold, "rule": str(rule),
            "rule_description": rule.describe().replace("on validation", "on the site's labelled sample"),
            "n": n, "class_counts": counts, "apparent": _at(y, probs, threshold, head),
            "before": m.probability_quality(y, head.activate(z), head),
            "out_of_bag": oob, "bootstrap_rounds": len(thresholds),
            "threshold_interval": {"low": float(np.percentile(thresholds, 2.5)),
                                   "high": float(np.percentile(thresholds, 97.5))},
            "narrowing": narrowing, "target_half_width": TARGET_HALF_WIDTH,
            "auc": float(m.roc_auc(y, sigmoid(positive)))}


def adapt_findings(targets: np.ndarray, logits: np.ndarray, findings: list[str], run_temperatures: list[float],
                   *, rule: ThresholdRule, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """A multi-label model's site adaptation, finding by finding: `adapt_site` on each finding's known labels
    (targets (n, K) of 1, 0 and -1 unknown) with its own logit column, a temperature per finding. A finding
    with fewer than MIN_PER_CLASS positive or negative labelled images keeps the run's temperature and its
    validation threshold, and says so.

    Returns {"findings": [per finding: {"finding", "adapted", and adapt_site's figures or "reason"}],
    "temperature": [one per finding], "n", "rule", "rule_description"}."""
    targets = np.asarray(targets).astype(int)
    z = np.asarray(logits, np.float64)
    rows, temperatures = [], []
    for k, name in enumerate(findings):
        known = targets[:, k] >= 0
        y = targets[known, k]
        counts = [int(np.sum(y == 0)), int(np.sum(y == 1))]
        if min(counts) < MIN_PER_CLASS:
            rows.append({"finding": name, "adapted": False, "class_counts": counts,
                         "reason": f"{counts[0]} negative and {counts[1]} positive labelled images; at least "
                                   f"{MIN_PER_CLASS} of each are needed, so the run's calibration and validation "
                                   "threshold stay"})
            temperatures.append(float(run_temperatures[k]))
            continue
        site = adapt_site(y, z[known, k:k + 1], Head("binary", 1), method="temperature", rule=rule,
                          n_bootstrap=n_bootstrap, seed=seed + k)
        rows.append({"finding": name, "adapted": True, **site})
        temperatures.append(float(site["calibration"]["params"]["temperature"]))
    if not any(r["adapted"] for r in rows):
        raise CxrError(f"no finding has {MIN_PER_CLASS} positive and {MIN_PER_CLASS} negative labelled images: "
                       "nothing to adapt (" + "; ".join(f"{r['finding']}: {r['class_counts'][1]} positive, "
                                                        f"{r['class_counts'][0]} negative" for r in rows) + ")")
    return {"findings": rows, "temperature": temperatures, "n": int(len(targets)), "min_per_class": MIN_PER_CLASS,
            "rule": str(rule),
            "rule_description": rule.describe().replace("on validation", "on the site's labelled sample")}
