"""Scores of a prepared split and every number computed from them: the validation-chosen threshold, the
metrics at it and at 0.5 with bootstrap intervals, and the gallery's picks. Shared by evaluate, optimize and
the benchmarks; no files written here."""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distributed.model import metrics as m
from distributed.model.heads import Head
from distributed.model.scorer import Scorer
from cxrscale.errors import CxrError
from preprocessing import schema
from preprocessing.shifts import SHIFTS, score_under_shifts

DEFAULT_BOOTSTRAP = 1000


# --- threshold rules ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdRule:
    """How the binary operating threshold is chosen on validation: youden, robust (Youden's J at its worst
    across validation as it is and under preprocessing.shifts' acquisition shifts), sensitivity:X,
    specificity:X, or a fixed number."""

    kind: str
    value: float | None = None
    source: str | None = None  # for a fixed threshold: where it came from, when not from the user

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.value:g}"
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    def describe(self) -> str:
        return {"youden": "maximises sensitivity + specificity - 1 (Youden's J) on validation",
                "robust": f"maximises the smallest Youden's J across validation as it is and under "
                          f"{len(SHIFTS)} acquisition shifts ({', '.join(SHIFTS)})",
                "sensitivity": f"highest specificity keeping sensitivity >= {self.value} on validation",
                "specificity": f"highest sensitivity keeping specificity >= {self.value} on validation",
                "fixed": f"chosen by {self.source}" if self.source else "fixed by the user"}[self.kind]

    @property
    def needs_shifts(self) -> bool:
        """Whether `choose` needs validation scored under the acquisition shifts too (`score_split(shifted=)`)."""
        return self.kind == "robust"

    def choose(self, y_val: np.ndarray, p_val: np.ndarray, shifted: np.ndarray | None = None) -> float:
        """The threshold on validation labels and positive-class probabilities (never test data); `shifted`,
        (shifts, n), the same cases' probabilities under each acquisition shift, for the robust rule."""
        try:
            if self.kind == "fixed":
                return float(self.value)
            if self.kind == "youden":
                return m.youden_threshold(y_val, p_val)
            if self.kind == "robust":
                if shifted is None:
                    raise CxrError("--threshold robust: the validation split was not scored under the acquisition "
                                   "shifts this rule needs")
                return m.worst_case_youden_threshold(y_val, np.vstack([np.asarray(p_val)[np.newaxis], shifted]))
            if self.kind == "sensitivity":
                return m.threshold_for_sensitivity(y_val, p_val, self.value)
            # specificity >= X for the negatives is sensitivity >= X for the flipped problem
            return 1.0 - m.threshold_for_sensitivity(1 - np.asarray(y_val), 1.0 - np.asarray(p_val), self.value) \
                + np.finfo(np.float32).eps
        except m.MetricError as err:
            raise CxrError(f"--threshold {self}: cannot be chosen on the validation split ({err}); "
                           "pass a number instead") from None


def parse_threshold(text: str) -> ThresholdRule:
    """argparse type for --threshold."""
    kind, _, value = text.partition(":")
    try:
        if kind in ("youden", "robust") and not value:
            return ThresholdRule(kind)
        if kind in ("sensitivity", "specificity") and value and 0 < float(value) <= 1:
            return ThresholdRule(kind, float(value))
        if not value and 0 <= float(text) <= 1:
            return ThresholdRule("fixed", float(text))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected youden, robust, sensitivity:X or specificity:X with X in "
                                     "(0, 1], or a probability in [0, 1]")


def evaluated_rule(run_dir: Path | None) -> ThresholdRule | None:
    """The rule the run's own evaluation (RUN/eval/metrics.json) chose its threshold by, so that evaluating it
    again, compressing it or benchmarking it without --threshold reads it at the operating point it is served
    at (a recipe's `robust`, say); None for a run not evaluated yet (or its record unreadable)."""
    metrics = Path(run_dir) / "eval" / "metrics.json" if run_dir else None
    if not (metrics and metrics.is_file()):
        return None
    try:
        return recorded_rule(json.loads(metrics.read_text()))
    except (OSError, ValueError):
        return None


def recorded_rule(metrics: Any) -> ThresholdRule | None:
    """The threshold rule an evaluation record (metrics.json's contents) names; None when it names none, or
    not a single rule (a multi-label run's thresholds partly adapted to a site)."""
    try:
        rule = metrics["threshold"]["rule"]
        return parse_threshold(str(rule)) if rule else None
    except (KeyError, TypeError, argparse.ArgumentTypeError):
        return None


# --- scoring a split ------------------------------------------------------------------------------------

@dataclass
class SplitScores:
    split: str
    labels: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, head.columns)
    ids: list[str]
    head: Head  # the model's: what the columns mean
    uncalibrated: np.ndarray | None = None  # (n, K) before the model's built-in calibration, when asked and known
    shifted: np.ndarray | None = None  # (shifts, n, K) under each of preprocessing.shifts.SHIFTS, when asked

    @property
    def shifted_positive(self) -> np.ndarray | None:
        """(shifts, n): the positive class's probabilities under each shift, when scored so (the robust rule's
        input for a binary model)."""
        return None if self.shifted is None else self.shifted[..., 1]

    def before_calibration(self) -> SplitScores | None:
        if self.uncalibrated is None:
            return None
        return SplitScores(self.split, self.labels, self.uncalibrated, self.ids, self.head)


def score_split(scorer: Scorer, data_dir: Path, split: str, batch_size: int = 32, *,
                uncalibrated: bool = False, shifted: bool = False) -> SplitScores:
    """The model's probabilities for every record of a prepared split, in file order; with `uncalibrated`,
    also those before its built-in calibration (same forward pass; None for a model without one); with
    `shifted`, also under each acquisition shift of preprocessing.shifts, applied to the prepared images
    a batch at a time (the robust threshold rule's input)."""
    ds = schema.dataset(data_dir, split, with_ids=True).batch(batch_size)
    labels, probs, before, ids, under = [], [], [], [], []
    for images, y, rid in ds.as_numpy_iterator():
        if uncalibrated:
            p, b = scorer.predict_with_uncalibrated(images, batch_size)
            before.append(b)
        else:
            p = scorer.predict(images, batch_size)
        if shifted:
            under.append(score_under_shifts(images, lambda batch: scorer.predict(batch, batch_size)))
        probs.append(p)
        labels.append(y)
        ids += [r.decode() for r in rid]
    if not labels:
        raise CxrError(f"the {split} split of {data_dir} is empty")
    raw = np.concatenate(before) if before and before[0] is not None else None
    return SplitScores(split, np.concatenate(labels).astype(int), np.concatenate(probs), ids, scorer.head, raw,
                       np.concatenate(under, axis=1) if shifted else None)


def load_records(data_dir: Path, split: str, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """The uint8 images of the given record positions of a split (a second pass, so that scoring a large
    split never holds all its images in memory)."""
    wanted, found = set(int(i) for i in indices), {}
    for i, (image, _) in enumerate(schema.dataset(data_dir, split).as_numpy_iterator()):
        if i in wanted:
            found[i] = image
            if len(found) == len(wanted):
                break
    return found


# --- metrics --------------------------------------------------------------------------------------------

def compute_metrics(val: SplitScores, test: SplitScores, classes: list[str], rule: ThresholdRule, *,
                    n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Every number of the evaluation: the validation-chosen threshold and the evaluated split's metrics at
    it and at 0.5, with bootstrap intervals (binary); one-vs-rest and macro metrics (K classes)."""
    if test.probs.shape[1] != len(classes):
        raise CxrError(f"the model outputs {test.probs.shape[1]} classes but the data has {len(classes)} "
                       f"({', '.join(classes)})")
    out: dict[str, Any] = {"classes": classes, "split": test.split, "n": len(test.labels),
                           "class_counts": {c: int(np.sum(test.labels == i)) for i, c in enumerate(classes)}}
    if test.head.binary:
        threshold = rule.choose(val.labels, val.probs[:, 1], val.shifted_positive)
        out["threshold"] = {"rule": str(rule), "description": rule.describe(), "value": threshold,
                            "chosen_on": val.split}
        y, p = test.labels, test.probs[:, 1]
        for key, t in (("at_threshold", threshold), ("at_0.5", 0.5)):
            summary = m.binary_summary(y, p, t)
            summary["intervals"] = m.bootstrap_intervals(m.interval_metric_functions(t), y, p,
                                                         n_resamples=n_bootstrap, seed=seed)
            out[key] = summary
        out["validation_at_threshold"] = m.binary_summary(val.labels, val.probs[:, 1], threshold)
        out["calibration_bins"] = m.calibration_bins(y, p)
    else:
        out["threshold"] = {"rule": "argmax", "description": "the most probable class (K > 2)", "value": None,
                            "chosen_on": None}
        out["multiclass"] = m.multiclass_summary(test.labels, test.probs, classes)
        out["multiclass"]["intervals"] = m.bootstrap_intervals(m.multiclass_metric_functions(), test.labels,
                                                               test.probs, n_resamples=n_bootstrap, seed=seed)
    return out


def threshold_stability(rule: ThresholdRule, y_val: np.ndarray, p_val: np.ndarray, y: np.ndarray, p: np.ndarray, *,
                        shifted: np.ndarray | None = None, n_resamples: int = DEFAULT_BOOTSTRAP,
                        seed: int = 0) -> dict[str, Any] | None:
    """How much the operating point rests on which images the validation split happened to draw: the rule
    re-chosen on stratified bootstrap resamples of validation, the 95 % percentile interval of those
    thresholds, and of sensitivity, specificity and accuracy on the evaluated split (all of it) at each.
    `shifted`: (shifts, n) validation probabilities under the acquisition shifts, for the robust rule, resampled
    with the same images.

    The bootstrap intervals of the test metrics hold the threshold fixed, so they miss this: on a validation
    split with few cases near the boundary (a near-separable one, or a small class), a few images decide
    where the threshold lands, and at a shifted site that can move specificity by more than its own
    interval. None for a fixed threshold (not chosen on validation) and when no resample could choose one
    (too few cases of a class)."""
    if rule.kind == "fixed":
        return None
    y_val, p_val = np.asarray(y_val).astype(int), np.asarray(p_val, np.float64)
    rng = np.random.default_rng(seed)
    chosen = []
    for idx in m.stratified_resamples(y_val, n_resamples, rng):
        try:
            chosen.append(rule.choose(y_val[idx], p_val[idx], None if shifted is None else shifted[:, idx]))
        except CxrError:
            continue
    if not chosen:
        return None

    def interval(values) -> dict[str, float]:
        return {"low": float(np.percentile(values, 2.5)), "high": float(np.percentile(values, 97.5))}

    at = {}
    for name in ("sensitivity", "specificity", "accuracy"):
        try:  # a metric the evaluated split cannot define (a class absent from it) is left out
            at[name] = interval([m.THRESHOLD_METRICS[name](y, p, t) for t in chosen])
        except m.MetricError:
            continue
    return {"resamples": len(chosen), **interval(chosen), "median": float(np.median(chosen)), "at_evaluated": at}


def describe_stability(threshold: dict[str, Any], split: str) -> str | None:
    """One sentence for the report and the model card on `threshold_stability`'s figures, or None."""
    stability = threshold.get("stability")
    if not stability:
        return None
    at = stability["at_evaluated"]
    spread = ", ".join(f"{name} {at[name]['low']:.3f}-{at[name]['high']:.3f}" for name in at)
    return (f"Chosen again on {stability['resamples']} bootstrap resamples of the validation split, the threshold "
            f"falls in {stability['low']:.3f}-{stability['high']:.3f} (95 %)" +
            (f", and across that range the {split} split reads {spread}" if spread else "") +
            ": how far the operating point rests on the images validation happened to draw.")


def split_row(scores: SplitScores, threshold: float | None, origin: str, *, n_bootstrap: int = DEFAULT_BOOTSTRAP,
              seed: int = 0, intervals: dict[str, Any] | None = None) -> dict[str, Any]:
    """One split's line of the side-by-side comparison: its size and origin, ROC-AUC, accuracy, sensitivity
    and specificity at the (validation-chosen) threshold with bootstrap intervals (`intervals`: already
    computed for this split at this threshold), and ECE; K classes: accuracy and top-label ECE."""
    row: dict[str, Any] = {"split": scores.split, "origin": origin, "n": len(scores.labels),
                           "ece": m.probability_quality(scores.labels, scores.probs, scores.head)["ece"]}
    if scores.head.binary and threshold is not None and intervals is not None:
        row["intervals"] = {k: intervals[k] for k in m.INTERVAL_METRICS if k in intervals}
    elif scores.head.binary and threshold is not None:
        row["intervals"] = m.bootstrap_intervals(m.interval_metric_functions(threshold), scores.labels,
                                                 scores.probs[:, 1], n_resamples=n_bootstrap, seed=seed)
    else:
        summary = m.multiclass_summary(scores.labels, scores.probs, [str(i) for i in range(scores.probs.shape[1])])
        row["intervals"] = {"accuracy": {"value": summary["accuracy"], "low": None, "high": None}}
    return row


NO_VIEW = "not DICOM"


def split_views(data_dir: Path) -> dict[str, str]:
    """Record id -> DICOM view position from a prepared dataset's split.csv ('' for JPEG and PNG; an empty map
    for datasets prepared before views were recorded)."""
    path = Path(data_dir) / schema.SPLIT_CSV
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["id"]: row.get("view") or "" for row in csv.DictReader(fh)}


def per_view_metrics(scores: SplitScores, views: dict[str, str], classes: list[str], threshold: float | None, *,
                     n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, Any] | None:
    """{view: {"n", "class_counts", metric: {"value", "low", "high"} ...}} for a split holding more than one view
    (None otherwise): accuracy, sensitivity, specificity and ROC-AUC at the operating threshold (binary), or
    accuracy and balanced accuracy (K classes), each with its bootstrap interval, or why it is undefined."""
    groups = np.array([views.get(i, "") or NO_VIEW for i in scores.ids])
    names = sorted(set(groups.tolist()))
    if len(names) < 2:
        return None
    if scores.head.binary:
        fns = m.interval_metric_functions(0.5 if threshold is None else threshold)
    else:
        fns = {k: v for k, v in m.multiclass_metric_functions().items() if k in ("accuracy", "balanced_accuracy")}
    out: dict[str, Any] = {}
    for name in names:
        idx = np.flatnonzero(groups == name)
        y = scores.labels[idx]
        p = scores.probs[idx, 1] if scores.head.binary else scores.probs[idx]
        out[name] = {"n": int(len(idx)), "class_counts": {c: int(np.sum(y == k)) for k, c in enumerate(classes)},
                     **m.bootstrap_intervals(fns, y, p, n_resamples=n_bootstrap, seed=seed)}
    return out


def gallery_picks(scores: SplitScores, threshold: float | None, per_group: int) -> list[dict[str, Any]]:
    """The most confident right and the most confident wrong cases of each true class. Binary decisions at a
    threshold rank by the score's distance from the threshold in the direction of the call."""
    pred = scores.head.decide(scores.probs, threshold)
    confidence = scores.probs[np.arange(len(pred)), pred]
    if threshold is not None:
        margin = np.where(pred == 1, scores.probs[:, 1] - threshold, threshold - scores.probs[:, 1])
    else:
        margin = confidence
    picks = []
    for c in range(scores.probs.shape[1]):
        for right in (True, False):
            idx = np.flatnonzero((scores.labels == c) & ((pred == c) == right))
            for i in idx[np.argsort(-margin[idx], kind="stable")][:per_group]:
                picks.append({"index": int(i), "id": scores.ids[i], "true_index": c, "predicted_index": int(pred[i]),
                              "confidence": float(confidence[i]), "probabilities": scores.probs[i].tolist(),
                              "correct": right})
    return picks
