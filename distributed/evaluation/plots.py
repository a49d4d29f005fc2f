"""Evaluation figures for the clinical report, written as PNGs (matplotlib, no TensorFlow).

Inputs follow one convention: `y_true` int class indices (n,), `probs` class probabilities (n, K) with the
positive class at index 1 when K = 2, `classes` the K class names. Binary inputs give one curve for the
positive class; K > 2 give one one-vs-rest curve per class. Every function writes its PNG atomically and
returns the path; bad inputs raise ValueError.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from distributed.model.metrics import calibration_bins, expected_calibration_error  # noqa: F401 (re-exported)
from distributed.model.metrics import confusion as _counts
from cxrscale.figures import plt, save_figure, styled
from distributed.model.heads import Head

RIGHT, WRONG = "#1a7f37", "#c62828"


def _check(y_true, probs, classes: Sequence[str], head: Head) -> tuple[np.ndarray, np.ndarray]:
    """Validated (y int (n,), probs float (n, head.columns) in [0, 1])."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D class indices, got shape {y.shape}")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, K), got shape {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} rows of probabilities")
    if len(y) == 0:
        raise ValueError("no cases to plot")
    if p.shape[1] != len(classes) or p.shape[1] != head.columns or head.multilabel:
        raise ValueError(f"probs has {p.shape[1]} columns and {len(classes)} class names were given; a "
                         f"{head.describe()} head has {head.columns} (these plots are for single-label heads)")
    if not np.all(np.isfinite(p)) or p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise ValueError("probs must be finite probabilities in [0, 1]")
    if not np.all(np.isin(y, np.arange(len(classes)))):
        raise ValueError(f"y_true must hold class indices 0..{len(classes) - 1}")
    return y.astype(int), np.clip(p, 0.0, 1.0)


def _one_vs_rest(y: np.ndarray, p: np.ndarray, classes: Sequence[str],
                 head: Head) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(class, rest, is-class labels, P(class)) per curve: the positive class alone when binary."""
    if head.binary:
        return [(classes[1], classes[0], y == 1, p[:, 1])]
    return [(name, "other classes", y == k, p[:, k]) for k, name in enumerate(classes)]


def _ranked_curves(y_true, probs, classes, head: Head, what: str):
    """The one-vs-rest curves whose labels hold both sides, and the names of classes absent from the labels."""
    curves = _one_vs_rest(*_check(y_true, probs, classes, head), classes, head)
    drawable = [c for c in curves if c[2].any() and not c[2].all()]
    if not drawable:
        raise ValueError(f"{what} needs both classes in the labels (this split holds one class only)")
    return drawable, [c[0] for c in curves if not c[2].any()]


def _operating_points(ax, is_pos: np.ndarray, score: np.ndarray, points, xy) -> None:
    """Mark each (label, threshold), positive where score >= threshold, at `xy(sens, spec, ppv)` = (x, y, text)."""
    for i, (label, t) in enumerate(points):
        c = _counts(is_pos.astype(int), score, t)
        sens, spec = c["tp"] / (c["tp"] + c["fn"]), c["tn"] / (c["tn"] + c["fp"])
        ppv = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else math.nan
        x, y, text = xy(sens, spec, ppv)
        ax.plot(x, y, "osD^v"[i % 5], color=f"C{i + 1}", ms=8, mec="black", clip_on=False, zorder=5,
                label=f"{label} t={t:.2f}: sens {sens:.2f}, {text}")


def _note_absent(ax, absent: list[str]) -> None:
    for name in absent:
        ax.plot([], [], " ", label=f"{name}: not in the labels, no curve")


@styled
def roc(y_true, probs, classes: Sequence[str], path, *, head: Head,
        operating_points: Sequence[tuple[str, float]] = ()) -> Path:
    """ROC curve(s) with AUC, the chance diagonal and (binary only) operating points."""
    curves, absent = _ranked_curves(y_true, probs, classes, head, "ROC")
    fig, ax = plt.subplots(figsize=(6.4, 6.4))
    binary = head.binary
    for i, (name, _, is_pos, score) in enumerate(curves):
        fpr, tpr, _ = roc_curve(is_pos, score)
        ax.plot(fpr, tpr, color="C0" if binary else f"C{i}", lw=2,
                label=f"{name}{':' if binary else ' vs rest,'} AUC {roc_auc_score(is_pos, score):.3f}")
    _note_absent(ax, absent)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance (AUC 0.5)")
    if binary:
        _operating_points(ax, curves[0][2], curves[0][3], operating_points,
                          lambda sens, spec, ppv: (1 - spec, sens, f"spec {spec:.2f}"))
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="1 − specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           title=f"ROC curve — {classes[1]} vs {classes[0]}" if binary else "ROC curves, one vs rest")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


@styled
def precision_recall(y_true, probs, classes: Sequence[str], path, *, head: Head,
                     operating_points: Sequence[tuple[str, float]] = ()) -> Path:
    """Precision-recall curve(s) with average precision, the prevalence baseline and (binary) operating points."""
    curves, absent = _ranked_curves(y_true, probs, classes, head, "precision-recall")
    fig, ax = plt.subplots(figsize=(6.8, 6.0))
    binary = head.binary
    for i, (name, _, is_pos, score) in enumerate(curves):
        precision, recall, _ = precision_recall_curve(is_pos, score)
        ap, prevalence = average_precision_score(is_pos, score), is_pos.mean()
        color = "C0" if binary else f"C{i}"
        label = f"{name}: AP {ap:.3f}" if binary else f"{name} vs rest: AP {ap:.3f} (prevalence {prevalence:.2f})"
        ax.plot(recall, precision, color=color, lw=2, drawstyle="steps-post", label=label)
        ax.axhline(prevalence, ls="--" if binary else ":", color="grey" if binary else color, lw=1,
                   label=f"prevalence {prevalence:.2f}" if binary else None)
    if not binary:
        ax.plot([], [], ":", color="grey", lw=1, label="dotted: each class's prevalence")
    _note_absent(ax, absent)
    if binary:
        _operating_points(ax, curves[0][2], curves[0][3], operating_points,
                          lambda sens, spec, ppv: (sens, ppv, f"PPV {ppv:.2f}"))
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall (sensitivity)", ylabel="precision (positive predictive value)",
           title=f"Precision-recall — {classes[1]}" if binary else "Precision-recall, one vs rest")
    ax.legend(loc="lower left")
    return save_figure(fig, path)


@styled
def confusion(matrix, classes: Sequence[str], path, *, title: str = "") -> Path:
    """Confusion matrix as counts and as fractions of each true class (rows = true, columns = predicted)."""
    m = np.asarray(matrix)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"matrix must be {k} x {k} for {k} classes, got shape {m.shape}")
    if np.any(m < 0) or not np.all(np.equal(np.mod(m, 1), 0)):
        raise ValueError("matrix must hold non-negative integer counts")
    m = m.astype(int)
    totals = m.sum(axis=1, keepdims=True)
    fractions = np.divide(m, totals, out=np.full(m.shape, np.nan), where=totals > 0)
    side = 1.1 * k + 2.4
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    panels = [(m, "counts (images)", "Blues", lambda v: f"{v:,}", max(m.max(), 1)),
              (fractions, "fraction of each true class", "Greens", lambda v: f"{v:.1%}", 1.0)]
    for ax, (values, label, cmap, fmt, vmax) in zip(axes, panels):
        ax.imshow(np.nan_to_num(values), cmap=cmap, vmin=0, vmax=vmax)
        for (r, c), v in np.ndenumerate(values):
            text = "n/a" if np.isnan(v) else fmt(v)
            dark = not np.isnan(v) and v > 0.55 * vmax
            ax.text(c, r, text, ha="center", va="center", fontsize=11, color="white" if dark else "black")
        ax.set_xticks(range(k), classes, rotation=30 if k > 2 else 0, ha="right" if k > 2 else "center")
        ax.set_yticks(range(k), classes)
        ax.set(xlabel="predicted class", ylabel="true class", title=label)
        ax.grid(False)
    fig.suptitle(title or f"Confusion matrix (n = {m.sum():,})", fontsize=12)
    return save_figure(fig, path)


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]: [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]."""
    return np.minimum((p * n_bins).astype(int), n_bins - 1)


@styled
def reliability(y_true, probs, classes: Sequence[str], path, *, head: Head, n_bins: int = 10, before=None) -> Path:
    """Reliability diagram with ECE, over a histogram of the predicted probabilities (K > 2: top-label);
    `before`: the same cases' probabilities before calibration, drawn as a second, fainter curve."""
    y, p = _check(y_true, probs, classes, head)
    if head.binary:
        hit, conf = y == 1, p[:, 1]
        conf_before = None if before is None else np.asarray(before)[:, 1]
        xlabel, ylabel = f"mean predicted probability of {classes[1]}", f"observed fraction {classes[1]}"
        subject = classes[1]
    else:
        hit, conf = p.argmax(axis=1) == y, p.max(axis=1)
        conf_before = None if before is None else np.asarray(before).max(axis=1)
        xlabel, ylabel, subject = "confidence (top-class probability)", "observed accuracy", "top-label confidence"
    ece = expected_calibration_error(hit, conf, n_bins)
    bins = calibration_bins(hit, conf, n_bins)  # the same bins as the ECE and metrics.json
    observed, predicted = [b["fraction_positive"] for b in bins], [b["mean_predicted"] for b in bins]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 7.4), sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    if conf_before is not None:
        hit_before = hit if head.binary else (np.asarray(before).argmax(axis=1) == y)
        old = calibration_bins(hit_before, conf_before, n_bins)
        top.plot([b["mean_predicted"] for b in old], [b["fraction_positive"] for b in old], "s--", color="C1",
                 lw=1.5, alpha=0.7, clip_on=False,
                 label=f"before calibration (ECE {expected_calibration_error(hit_before, conf_before, n_bins):.3f})")
    top.plot(predicted, observed, "o-", color="C0", lw=2, clip_on=False,
             label=f"{'calibrated ' if conf_before is not None else ''}model ({n_bins} equal-width bins)")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel=ylabel,
            title=f"Reliability — {subject}\nECE {ece:.3f} (n = {len(y):,})")
    top.legend(loc="upper left")
    counts = np.bincount(_bin_index(conf, n_bins), minlength=n_bins)
    bars = bottom.bar((np.arange(n_bins) + 0.5) / n_bins, counts, width=0.9 / n_bins, color="C0", alpha=0.6)
    bottom.bar_label(bars, [f"{c:,}" if c else "" for c in counts], fontsize=8, padding=1)
    bottom.set(xlabel=xlabel, ylabel="images (count)", ylim=(0, counts.max() * 1.25))
    return save_figure(fig, path)


@styled
def score_histograms(y_true, probs, classes: Sequence[str], path, *, head: Head,
                     threshold: float | None = None) -> Path:
    """Histograms of P(class) for the cases of that class vs the rest; the threshold line is binary only."""
    y, p = _check(y_true, probs, classes, head)
    panels = _one_vs_rest(y, p, classes, head)
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.6 if ncols == 1 else 5.2 * ncols, 4.6 * nrows), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, (name, rest, is_pos, score) in zip(axes.flat, panels):
        tallest = max(ax.hist(score[mask], bins=bins, alpha=0.55, color=color, edgecolor="white",
                              label=f"{label} (n = {mask.sum():,})")[0].max(initial=0)
                      for mask, label, color in ((~is_pos, rest, "C0"), (is_pos, name, "C3")))
        if threshold is not None and head.binary:
            ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.2f}")
        ax.set(xlim=(0, 1), ylim=(0, max(tallest, 1) * 1.4), xlabel=f"predicted probability of {name}",
               ylabel="images", title=f"Scores — {name}" + ("" if head.binary else " vs rest"))
        ax.legend(loc="upper center", title="true class")
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    return save_figure(fig, path)


def _grey_or_rgb(image) -> tuple[np.ndarray, dict]:
    """The image as imshow wants it, with imshow's arguments (greyscale shown on a fixed 0..255 scale)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"gallery images must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return a, {"cmap": "gray", "vmin": 0, "vmax": 255}
    if a.ndim == 3 and a.shape[2] == 3:
        return a, {}
    raise ValueError(f"gallery images must be (H, W), (H, W, 1) or (H, W, 3), got shape {a.shape}")


@styled
def gallery(items: Sequence[dict], path, *, columns: int = 4, title: str = "") -> Path:
    """Grid of images titled "true: X | pred: Y (0.97)", green when right and red when wrong."""
    if not items:
        raise ValueError("gallery needs at least one image")
    for item in items:
        if missing := {"image", "true", "predicted", "confidence"} - item.keys():
            raise ValueError(f"gallery item lacks {', '.join(sorted(missing))}")
    images = [_grey_or_rgb(item["image"]) for item in items]
    ncols = max(1, min(columns, len(items)))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.7 * nrows), squeeze=False)
    for ax, item, (image, show) in zip(axes.flat, items, images):
        ax.imshow(image, **show)
        right = item["true"] == item["predicted"]
        head, tail = f"true: {item['true']}", f"pred: {item['predicted']} ({item['confidence']:.2f})"
        ax.set_title(head + (" | " if len(head + tail) <= 38 else "\n") + tail,  # long names: two lines
                     color=RIGHT if right else WRONG, fontsize=9, fontweight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set(color=RIGHT if right else WRONG, linewidth=2)
        if item.get("caption"):
            ax.set_xlabel(item["caption"], fontsize=8)
    for ax in axes.flat[len(items):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=12)
    fig.get_layout_engine().set(wspace=0.05, hspace=0.05)
    return save_figure(fig, path)


_PANELS = (("Loss", "cross-entropy loss (nats)", (("loss", "train"), ("val_loss", "validation"))),
           ("Accuracy", "accuracy (fraction correct)", (("accuracy", "train"), ("val_accuracy", "validation"))),
           ("Validation AUC", "ROC AUC", (("val_auc", "validation"),)))


def _column(rows: Sequence[dict], key: str) -> np.ndarray:
    """Floats of `key` in each row; NaN where missing or not a number."""
    def number(v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan
    return np.array([number(r.get(key)) for r in rows])


@styled
def training_curves(rows: list[dict], path) -> Path:
    """Loss, accuracy and validation AUC per epoch (history.csv rows), the best-val-AUC epoch marked."""
    if not rows:
        raise ValueError("training_curves needs at least one history row")
    epoch = _column(rows, "epoch")
    epoch = np.where(np.isnan(epoch), np.arange(1, len(rows) + 1), epoch)
    series = {key: _column(rows, key) for _, _, curves in _PANELS for key, _ in curves}
    panels = [pnl for pnl in _PANELS if any(np.isfinite(series[key]).any() for key, _ in pnl[2])]
    if not panels:
        raise ValueError("history rows hold none of loss, accuracy, val_loss, val_accuracy, val_auc")
    auc = series["val_auc"]
    best = int(np.nanargmax(auc)) if np.isfinite(auc).any() else None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.0), squeeze=False)
    for ax, (name, ylabel, curves) in zip(axes.flat, panels):
        for key, label in curves:
            ok = np.isfinite(series[key])
            if ok.any():
                ax.plot(epoch[ok], series[key][ok], color="C0" if label == "train" else "C1", lw=2, label=label,
                        marker="o" if ok.sum() <= 30 else None, ms=4)
        if best is not None:
            ax.axvline(epoch[best], color="grey", ls="--", lw=1,
                       label=f"best val AUC {auc[best]:.3f} (epoch {epoch[best]:g})")
        ax.set_xlim(epoch.min() - 0.5, epoch.max() + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        ax.legend(loc="best")
    return save_figure(fig, path)
