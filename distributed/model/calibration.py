"""Post-hoc probability calibration, fitted on the validation split only, and built into the model.

    from distributed.model.calibration import fit_calibration, calibrated_model, logits_of
    cal = fit_calibration("temperature", y_val, logits_of(model, x_val), Head.of_model(model))
    deployable = calibrated_model(model, cal)      # outputs the calibrated probability

Methods (on the model's pre-activation output, the `logits` layer, as wide as its head's units, see
distributed.model.heads):
- auto (default): temperature, for every head.
- temperature (Guo et al. 2017): p = sigmoid(z / T) or softmax(z / T). One parameter, so it cannot overfit a
  small validation split, and it never changes the ranking (AUC) or the argmax. It does not move the decision
  boundary: a model trained with balanced class weights (the default) keeps its balanced prior (every logit
  sits about log(n_negative / n_positive) below the training prevalence's), which is why it survives a site
  whose prevalence and images differ from validation's, where an offset fitted on validation does not
  (docs/benchmarks.md, "Calibration").
- platt (binary; Platt 1999, scikit-learn's LogisticRegression on the logit, with Platt's smoothed targets):
  p = sigmoid(a z + b), a temperature and an offset; a monotone map, so the ranking is kept.
- isotonic (binary; scikit-learn's IsotonicRegression on the logit): a monotone piecewise-linear map, the
  most flexible; it needs a few hundred validation images and can tie scores (AUC may drop slightly).

A multi-label head is calibrated per label: a temperature for each, fitted on the images where that label is
known (a label whose validation images are all of one kind keeps T = 1).

The calibration is a few built-in layers after `logits` (Rescaling for temperature and Platt; frozen Dense +
clipped ReLU segments for isotonic), named with the prefix "calibration_" and ending in the output layer
"predictions", so that a SavedModel, every TFLite variant and any other consumer output the calibrated
probability, and tfmot can clone the model (no custom layers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads

import numpy as np

from cxrscale.files import write_json_atomic
from distributed.model import metrics as m
from distributed.model.heads import LOGITS_NAME, OUTPUT_NAME, Head, ModelError, sigmoid
from preprocessing import schema

log = logging.getLogger("cxrscale.calibration")

METHODS = ("auto", "temperature", "platt", "isotonic", "none")
PREFIX = "calibration_"
_MAX_TEMPERATURE_LOG = 5.0  # T within e^-5 .. e^5


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration map. params: temperature {"temperature": T} (a multi-label head: a list, one T per
    label); platt {"a", "b"}; isotonic {"x", "y"} (the knots of the piecewise-linear map from logit to
    probability); none {}."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        if data.get("method") not in METHODS or data.get("method") == "auto":
            raise ModelError(f"unknown calibration method {data.get('method')!r}; expected one of {', '.join(METHODS)}")
        return cls(data["method"], dict(data.get("params", {})))

    def apply(self, head: Head, logits: np.ndarray) -> np.ndarray:
        """Logits (n, head.units) of a model with `head` -> calibrated probabilities (n, head.columns)."""
        positive = Head("binary", 1)  # Platt and isotonic map the positive logit to P(class 1), one unit
        if self.method == "isotonic":
            return positive.probabilities(np.interp(head.positive_logit(logits), self.params["x"], self.params["y"]))
        if self.method == "platt":
            return positive.probabilities(sigmoid(self.params["a"] * head.positive_logit(logits) + self.params["b"]))
        scale = 1.0 / np.asarray(self.params["temperature"], np.float64) if self.method == "temperature" else 1.0
        return head.activate(np.asarray(logits, np.float64) * scale)


def fit_calibration(method: str, labels: np.ndarray, logits: np.ndarray, head: Head) -> Calibration:
    """Fit `method` on validation labels (n,) int (a multi-label head: targets (n, K) of 1, 0 and -1 unknown)
    and the logits (n, head.units) of a model with `head`. Raises ModelError when the method does not fit the
    head (Platt and isotonic are binary) or the split cannot support it."""
    z = np.asarray(logits, np.float64)
    z = z[:, None] if z.ndim == 1 else z
    if method not in METHODS:
        raise ModelError(f"--calibration {method!r}: choose one of {', '.join(METHODS)}")
    if method == "auto":
        method = "temperature"
    if method == "none":
        return Calibration("none")
    if head.multilabel:
        if method != "temperature":
            raise ModelError(f"--calibration {method} is for two classes; a {head.describe()} head is calibrated "
                             "by a temperature per label (--calibration temperature)")
        return Calibration("temperature", {"temperature": _label_temperatures(np.asarray(labels), z)})
    y = np.asarray(labels).astype(int).ravel()
    if len(np.unique(y)) < 2:
        raise ModelError(f"--calibration {method}: the validation split has only one class; nothing to fit on")
    if method in ("platt", "isotonic") and not head.binary:
        raise ModelError(f"--calibration {method} is for two classes; use temperature for a {head.describe()} head")
    if method == "temperature":
        return Calibration("temperature", {"temperature": _fit_temperature(y, z, head)})
    d = head.positive_logit(z)
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # Platt's own smoothed targets, (N+ + 1) / (N+ + 2) and 1 / (N- + 2), as soft labels (each image once
        # as a positive and once as a negative, weighted): on a small or separable validation split plain
        # maximum likelihood drives the slope to infinity, a step function; these keep it finite.
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        fit = LogisticRegression(C=np.inf, max_iter=1000).fit(
            np.concatenate([d, d])[:, None], np.concatenate([np.ones(len(d)), np.zeros(len(d))]),
            sample_weight=np.concatenate([target, 1 - target]))
        return Calibration("platt", {"a": float(fit.coef_[0, 0]), "b": float(fit.intercept_[0])})
    from sklearn.isotonic import IsotonicRegression

    fit = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(d, y)
    return Calibration("isotonic", {"x": [float(v) for v in fit.X_thresholds_],
                                    "y": [float(v) for v in fit.y_thresholds_]})


def calibration_summary(labels: np.ndarray, logits: np.ndarray, calibration: Calibration,
                        head: Head) -> dict[str, Any]:
    """ECE, Brier and log loss of the positive class (K > 2: top-label ECE, multi-class Brier and log loss;
    multi-label: of every known label) before and after `calibration`."""
    y = np.asarray(labels) if head.multilabel else np.asarray(labels).astype(int).ravel()
    return {"method": calibration.method, "n": int(len(y)),
            "before": m.probability_quality(y, head.activate(logits), head),
            "after": m.probability_quality(y, calibration.apply(head, logits), head)}


def fit_on_validation(model: keras.Model, data_dir, method: str, record_dir, *,
                      head: Head | None = None) -> Calibration:
    """Fit `method` on the logits of `model` (`head`: of its logits, by default read from its output layer)
    over the whole validation split of the prepared dataset `data_dir`, and write record_dir/calibration.json:
    the map, and the validation ECE, Brier and log loss before and after it. What training and
    distributed.ensemble both do at their end."""
    head = head or Head.of_logits(model)
    labels, logits = [], []
    for images, y in schema.dataset(data_dir, "val").batch(256).as_numpy_iterator():
        logits.append(logits_of(model, images))
        labels.append(y)
    if not labels:
        raise ModelError(f"{data_dir} has no validation split to calibrate on")
    labels, logits = np.concatenate(labels), np.concatenate(logits)
    if not head.multilabel:
        labels = labels.astype(int).ravel()
    calibration = fit_calibration(method, labels, logits, head)
    summary = calibration_summary(labels, logits, calibration, head)
    write_json_atomic(Path(record_dir) / "calibration.json", {**calibration.to_dict(), "fitted_on": "val",
                                                             "validation": summary})
    log.info("calibration %s on %d validation images: ECE %.3f -> %.3f, log loss %.3f -> %.3f",
             calibration.method, len(labels), summary["before"]["ece"], summary["after"]["ece"],
             summary["before"]["log_loss"], summary["after"]["log_loss"])
    return calibration


# --- in the graph ---------------------------------------------------------------------------------------

def logits_model(model: keras.Model) -> keras.Model:
    """The model up to its `logits` layer (shares the layers and weights)."""
    try:
        logits = model.get_layer(LOGITS_NAME).output
    except ValueError:
        raise ModelError(f"model {model.name!r} has no {LOGITS_NAME!r} layer: it was not built by cxrscale, so "
                         "it cannot be calibrated") from None
    return keras.Model(model.inputs, logits, name=f"{model.name}_logits")


def logits_of(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits (n, units) of uint8 images (n, H, W, C), inference mode."""
    return logits_model(model).predict(images, batch_size=batch_size, verbose=0).astype(np.float64)


def calibrated_model(model: keras.Model, calibration: Calibration, *, head: Head | None = None) -> keras.Model:
    """A model sharing `model`'s layers up to `logits`, ending in the calibration layers and `predictions`
    (float32); `head`: of its logits, by default read from the model. Works on a model that is already
    calibrated: its old calibration is replaced."""
    head = head or Head.of_logits(model)
    z = logits_model(model).output
    method, params = calibration.method, calibration.params
    if method in ("platt", "isotonic") and head.units == 2:  # a 2-unit softmax head: its logit is z1 - z0
        z = _frozen_dense(z, np.array([[-1.0], [1.0]]), np.zeros(1), f"{PREFIX}logit_difference")
        head = Head("binary", 1)
    if method == "isotonic":
        x, y = np.asarray(params["x"], np.float64), np.asarray(params["y"], np.float64)
        if len(x) < 2:  # a constant map
            x, y = np.array([0.0, 1.0]), np.array([y[0], y[0]])
        # y0 + sum_k (y_k+1 - y_k) clip((z - x_k) / (x_k+1 - x_k), 0, 1): every term but the one of the
        # segment holding z is exactly 0 or its full step, so float32 adds no cancellation error
        width = np.maximum(np.diff(x), 1e-9)
        ramps = _frozen_dense(z, (1.0 / width)[None, :], -x[:-1] / width, f"{PREFIX}segments")
        ramps = keras.layers.ReLU(max_value=1.0, name=f"{PREFIX}segments_clip", dtype="float32")(ramps)
        p = _frozen_dense(ramps, np.diff(y)[:, None], np.array([y[0]]), f"{PREFIX}isotonic")
        out = keras.layers.ReLU(max_value=1.0, name=OUTPUT_NAME, dtype="float32")(p)
        return keras.Model(model.inputs, out, name=model.name)
    if method == "temperature":  # one T, or one per label (a per-channel scale over the last axis)
        t = params["temperature"]
        scale = [1.0 / float(v) for v in t] if isinstance(t, (list, tuple)) else 1.0 / float(t)
        z = keras.layers.Rescaling(scale, name=f"{PREFIX}temperature", dtype="float32")(z)
    elif method == "platt":
        z = keras.layers.Rescaling(float(params["a"]), offset=float(params["b"]), name=f"{PREFIX}platt",
                                   dtype="float32")(z)
    out = keras.layers.Activation(head.activation, name=OUTPUT_NAME, dtype="float32")(z)
    return keras.Model(model.inputs, out, name=model.name)


def is_calibration_layer(layer) -> bool:
    return layer.name.startswith(PREFIX)


# --- internals ------------------------------------------------------------------------------------------

def _frozen_dense(x, kernel: np.ndarray, bias: np.ndarray, name: str):
    layer = keras.layers.Dense(kernel.shape[1], name=name, dtype="float32", trainable=False,
                               kernel_initializer=keras.initializers.Constant(kernel.astype(np.float32)),
                               bias_initializer=keras.initializers.Constant(bias.astype(np.float32)))
    return layer(x)


def _fit_temperature(y: np.ndarray, z: np.ndarray, head: Head) -> float:
    """T minimising the validation log loss of the head's activation of z / T."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = head.activate(z / np.exp(log_t))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))

    best = minimize_scalar(nll, bounds=(-_MAX_TEMPERATURE_LOG, _MAX_TEMPERATURE_LOG), method="bounded",
                           options={"xatol": 1e-4})
    return float(np.exp(best.x))


def _label_temperatures(targets: np.ndarray, z: np.ndarray) -> list[float]:
    """One temperature per label, minimising that label's validation log loss over the images where it is
    known; 1.0 for a label whose known images are all positive or all negative (nothing to fit on)."""
    out = []
    single = Head("binary", 1)
    for k in range(targets.shape[1]):
        seen = targets[:, k] >= 0
        y = targets[seen, k].astype(int)
        out.append(_fit_temperature(y, z[seen, k:k + 1], single) if len(np.unique(y)) == 2 else 1.0)
    return out
