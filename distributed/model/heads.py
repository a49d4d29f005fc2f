"""The head rule, once: what a classifier's output means, and everything that follows from it.

A `Head` is a small frozen value: its `kind` and its output `units`.

    kind        units  activation  probabilities (columns)            labels in training
    binary      1      sigmoid     [1 - p, p]: P(class 0), P(class 1)  float (n, 1), 0 or 1
    binary      2      softmax     the two softmax outputs             int class index (n,)
    multiclass  K >= 3 softmax     the K softmax outputs               int class index (n,)
    multilabel  K >= 1 sigmoid     K independent P(label k)            float multi-hot (n, K)

Every other module asks the head instead of looking at `output_shape[-1]` or at the number of classes: the
builders take its output layer, training its loss, accuracy metric and label form, calibration its
activation and binary logit, scoring its probabilities and decisions, Grad-CAM its class score, and the
reports whether there is one positive class. A model says which head it has through its output layer
(`Head.of_model`); a run folder records it in config.json (`Head.to_dict`), so a process that never loads
TensorFlow (a `.tflite` served by `distributed.predict`) still knows it.

This module is numpy only at import time; the Keras pieces (`output`, `loss`, `accuracy`) import Keras
when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrscale.errors import CxrError

KINDS = ("binary", "multiclass", "multilabel")
LOGITS_NAME = "logits"        # the float32 Dense that every head ends in before its activation
OUTPUT_NAME = "predictions"   # the float32 activation (or a calibration's last layer) after it


class ModelError(CxrError):
    """A user's mistake in choosing or configuring a model: its name, image size, weights file, a layer name,
    or a head that cannot be (a wrong kind or number of classes)."""


@dataclass(frozen=True)
class Head:
    """kind: "binary", "multiclass" or "multilabel"; units: the model's output units (see the table above)."""

    kind: str
    units: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ModelError(f"unknown head kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        units = int(self.units)
        if (self.kind == "binary" and units not in (1, 2)) or (self.kind == "multiclass" and units < 3) \
                or units < 1:
            raise ModelError(f"a {self.kind} head cannot have {self.units} output units")

    # --- how a head is chosen or read back ---------------------------------------------------------------

    @classmethod
    def for_classes(cls, num_classes: int, *, two_unit_softmax: bool = False, multilabel: bool = False) -> "Head":
        """The head of a classifier of `num_classes` classes (or labels, `multilabel`). Two classes get one
        sigmoid unit, P(class 1), unless `two_unit_softmax` (the thesis's VGG16 head)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise ModelError(f"the number of classes must be a whole number, got {num_classes!r}")
        if multilabel:
            if num_classes < 1:
                raise ModelError("a multi-label classifier needs at least 1 label")
            return cls("multilabel", int(num_classes))
        if num_classes < 2:
            raise ModelError(f"a classifier needs at least 2 classes; got num_classes={num_classes!r} "
                            "(check the dataset's class folders or manifest)")
        if num_classes == 2:
            return cls("binary", 2 if two_unit_softmax else 1)
        return cls("multiclass", int(num_classes))

    @classmethod
    def of_outputs(cls, units: int, activation: str = "softmax") -> "Head":
        """The head of an output of `units` units ending in `activation` ("sigmoid", "softmax", or another
        name for a calibration's last layer, which keeps the units' meaning)."""
        units = int(units)
        if units == 1:
            return cls("binary", 1)
        if activation == "sigmoid":
            return cls("multilabel", units)
        return cls("binary", 2) if units == 2 else cls("multiclass", units)

    @classmethod
    def of_model(cls, model) -> "Head":
        """The head of a Keras model, read from its output layer: its units and its activation."""
        units = int(model.outputs[0].shape[-1])
        layer = model.layers[-1]
        activation = getattr(getattr(layer, "activation", None), "__name__", type(layer).__name__)
        return cls.of_outputs(units, activation)

    @classmethod
    def of_logits(cls, model) -> "Head":
        """The head of a model's `logits` layer, before any calibration layers: a 2-unit softmax calibrated
        by Platt or isotonic ends in one sigmoid unit, but its logits still have two."""
        head = cls.of_model(model)
        names = {layer.name for layer in model.layers}
        if LOGITS_NAME not in names:
            return head
        units = int(model.get_layer(LOGITS_NAME).output.shape[-1])
        return head if units == head.units else cls(head.kind, units)

    def in_form(self, units: int) -> "Head | None":
        """This head for a form of the model that outputs `units`: itself, or, for an export that outputs its
        probability columns (one sigmoid unit widened to [1 - p, p] by optimize.export), the same kind with
        that many units; None when `units` fits neither."""
        if units == self.units:
            return self
        return Head(self.kind, units) if units == self.columns else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "units": self.units}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, units: int | None = None) -> "Head":
        """The head a run recorded; for a record older than heads (no "head"), the one its output `units`
        meant then (1 sigmoid unit or K softmax units)."""
        if data:
            return cls(str(data["kind"]), int(data["units"]))
        if units is None:
            raise ModelError("the run record names no head and no output units")
        return cls.of_outputs(units)

    # --- what the head means -----------------------------------------------------------------------------

    @property
    def binary(self) -> bool:
        """One positive class: thresholds, Platt and isotonic calibration, ROC of P(class 1)."""
        return self.kind == "binary"

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"

    @property
    def columns(self) -> int:
        """Probability columns: 2 for a binary head (P(class 0), P(class 1)), else one per unit."""
        return 2 if self.binary else self.units

    @property
    def activation(self) -> str:
        return "sigmoid" if self.units == 1 or self.multilabel else "softmax"

    @property
    def label_form(self) -> str:
        """How training feeds labels: "binary" float (n, 1), "index" int (n,), "multihot" float (n, K)."""
        if self.multilabel:
            return "multihot"
        return "binary" if self.units == 1 else "index"

    def describe(self) -> str:
        if self.binary:
            return f"binary ({'1 sigmoid unit' if self.units == 1 else '2-unit softmax'})"
        return f"{self.kind} ({self.units} {self.activation} units)"

    # --- numpy: outputs to probabilities and decisions -----------------------------------------------------

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs (n, units) or (n,) -> probabilities (n, columns), float."""
        out = np.asarray(outputs)
        if not np.issubdtype(out.dtype, np.floating):
            out = out.astype(np.float32)
        if out.ndim == 1:
            out = out[:, None]
        if out.ndim != 2 or out.shape[1] != self.units:
            raise ValueError(f"a {self.describe()} head outputs (n, {self.units}); got {out.shape}")
        if self.units == 1:
            return np.concatenate([1.0 - out, out], axis=1)
        return out

    def activate(self, logits: np.ndarray) -> np.ndarray:
        """The head's own activation of logits (n, units) -> probabilities (n, columns), float64."""
        z = np.asarray(logits, np.float64)
        z = z[:, None] if z.ndim == 1 else z
        if self.activation == "sigmoid":
            return self.probabilities(sigmoid(z))
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def positive_logit(self, logits: np.ndarray) -> np.ndarray:
        """A binary head's logit of class 1 (n,): z of a sigmoid unit, z1 - z0 of a 2-unit softmax."""
        if not self.binary:
            raise ModelError(f"a {self.describe()} head has no single positive-class logit")
        z = np.asarray(logits, np.float64)
        z = z[:, None] if z.ndim == 1 else z
        return z[:, 0] if self.units == 1 else z[:, 1] - z[:, 0]

    def decide(self, probs: np.ndarray, threshold: float | np.ndarray | None = None) -> np.ndarray:
        """Decisions from probabilities (n, columns): binary, class 1 where P(class 1) >= threshold (argmax
        when None); multi-class, the argmax (n,); multi-label, (n, K) 0/1 at each label's threshold (0.5
        when None)."""
        p = np.asarray(probs)
        if self.multilabel:
            return (p >= (0.5 if threshold is None else np.asarray(threshold))).astype(int)
        if self.binary and threshold is not None:
            return (p[:, 1] >= threshold).astype(int)
        return p.argmax(axis=1)

    # --- Keras: the output layers, the loss and the accuracy metric ----------------------------------------

    def output(self, features, *, l2: float = 0.0):
        """The head on a feature tensor: `logits` (float32 Dense of `units`) then `predictions` (float32
        activation). float32 so that mixed-precision models still output float32 probabilities (a softmax
        or sigmoid in half precision saturates and the loss loses precision)."""
        from distributed.model.kerasenv import keras

        regularizer = keras.regularizers.l2(l2) if l2 else None
        logits = keras.layers.Dense(self.units, kernel_regularizer=regularizer, dtype="float32",
                                    name=LOGITS_NAME)(features)
        return keras.layers.Activation(self.activation, dtype="float32", name=OUTPUT_NAME)(logits)

    def loss(self, label_smoothing: float = 0.0, label_weights: "list[tuple[float, float]] | None" = None):
        """The loss for this head's labels (`label_form`), on probabilities as the models output them.
        label_smoothing e (Szegedy et al. 2016): targets become y (1 - e) + e / K, so the model is never pushed
        to certainty on a label that may be wrong or an image unlike the deployment site's.
        A multi-label head's loss is `masked_binary_crossentropy`, with label_weights (negative, positive)
        per label when given (`distributed.training.data.label_weights`)."""
        from distributed.model.kerasenv import keras

        if self.multilabel:
            return masked_binary_crossentropy(self.units, label_smoothing, label_weights)
        if self.activation == "sigmoid":
            return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing, name="binary_crossentropy")
        if not label_smoothing:
            return keras.losses.SparseCategoricalCrossentropy(name="sparse_categorical_crossentropy")
        import tensorflow as tf

        smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        units = self.units

        def smoothed_sparse_categorical_crossentropy(y_true, y_pred):  # tf_keras's sparse loss cannot smooth
            return smoothed(tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), units), y_pred)

        return smoothed_sparse_categorical_crossentropy

    def accuracy(self):
        """The training accuracy metric, named "accuracy" for every head (multi-label: of the known labels)."""
        from distributed.model.kerasenv import keras

        if self.multilabel or self.activation == "sigmoid":  # also right for mixup's blended targets
            return keras.metrics.MeanMetricWrapper(masked_binary_accuracy, name="accuracy")
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def class_score(self, logits, classes):
        """Grad-CAM's score (n,) of the chosen class of each image from logits (n, units), a tensor: z or -z
        for a 1-unit sigmoid head (class 1 or 0), the class's (or label's) logit otherwise."""
        import tensorflow as tf

        if self.units == 1:
            return tf.where(classes == 1, logits[:, 0], -logits[:, 0])
        return tf.gather(logits, classes, axis=1, batch_dims=1)

    def predicted_class(self, logits):
        """Grad-CAM's default class of each image from logits (n, units), a tensor: the decision at 0.5 for
        a sigmoid unit, the argmax otherwise (for multi-label, the most probable label)."""
        import tensorflow as tf

        if self.units == 1:
            return tf.cast(logits[:, 0] > 0, tf.int32)
        return tf.argmax(logits, axis=-1, output_type=tf.int32)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))  # overflow-free


def masked_binary_crossentropy(units: int, label_smoothing: float = 0.0,
                               label_weights: "list[tuple[float, float]] | None" = None):
    """A multi-label loss on sigmoid probabilities (n, K) against targets (n, K) of 1, 0 and -1 (unknown):
    each known label's binary cross-entropy, weighted by its (negative, positive) weight, averaged over the
    image's known labels; an unknown label adds nothing (an image with none adds 0). A plain function, so a
    saved model needs no custom object to load."""
    import tensorflow as tf

    weights = np.ones((units, 2), np.float32) if label_weights is None else np.asarray(label_weights, np.float32)
    if weights.shape != (units, 2):
        raise ModelError(f"label weights must be (negative, positive) for each of {units} labels; got {weights.shape}")
    negative, positive = tf.constant(weights[:, 0]), tf.constant(weights[:, 1])
    epsilon = 1e-7

    def masked_binary_crossentropy(y_true, y_pred):
        y_true = tf.cast(y_true, tf.float32)
        seen = tf.cast(y_true >= 0.0, tf.float32)
        y = tf.clip_by_value(y_true, 0.0, 1.0) * (1.0 - label_smoothing) + 0.5 * label_smoothing
        p = tf.clip_by_value(tf.cast(y_pred, tf.float32), epsilon, 1.0 - epsilon)
        per_label = -(positive * y * tf.math.log(p) + negative * (1.0 - y) * tf.math.log(1.0 - p))
        return tf.reduce_sum(per_label * seen, axis=-1) / tf.maximum(tf.reduce_sum(seen, axis=-1), 1.0)

    return masked_binary_crossentropy


def masked_binary_accuracy(y_true, y_pred):
    """Per image: the share of its known labels (targets in [0, 1]; -1 unknown) decided right at 0.5. A
    blended target (--mixup) counts as the label of its larger share, 0.7 as 1: Keras's BinaryAccuracy
    compares the target itself with 0 or 1, so it would count every blended one wrong."""
    import tensorflow as tf

    y_true = tf.cast(y_true, tf.float32)
    seen = tf.cast(y_true >= 0.0, tf.float32)
    right = tf.cast(tf.equal(y_pred >= 0.5, y_true >= 0.5), tf.float32)
    return tf.reduce_sum(right * seen, axis=-1) / tf.maximum(tf.reduce_sum(seen, axis=-1), 1.0)
