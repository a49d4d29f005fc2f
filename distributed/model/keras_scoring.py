"""Score with a Keras model (a SavedModel folder or a `.keras`/`.h5` file), loaded with tf_keras.

Imported by `distributed.model.scoring.load_scorer` only when a Keras model is asked for, so that scoring a
`.tflite` model never loads TensorFlow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads

import numpy as np
import tensorflow as tf

from cxrscale.errors import CxrError
from distributed.model.calibration import is_calibration_layer, logits_model
from distributed.model.heads import Head
from distributed.model.scorer import Scorer, scoring_head


def keras_scorer(path: Path, *, head: Head | None = None) -> Scorer:
    """A Scorer of the Keras model at `path` (the caller has checked that it is one); `head` as the run
    recorded it, else read from the model's output layer."""
    try:
        model = keras.models.load_model(str(path), compile=False)
    except (OSError, ValueError, ImportError) as err:
        raise CxrError(f"cannot load the Keras model {path}: {str(err).splitlines()[0]}") from None
    shape = tuple(int(d) for d in model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise CxrError(f"{path} takes inputs of shape {model.input_shape}, not images (H, W, C)")

    def predict(batch: np.ndarray) -> np.ndarray:
        return model(tf.convert_to_tensor(batch, dtype=model.inputs[0].dtype), training=False).numpy()

    form = scoring_head(head, Head.of_model(model), path)
    return Scorer(path, "keras", shape, form, predict, model, _predict_both=_two_output_predict(model, form))


def _two_output_predict(model, head: Head) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """For a model with calibration layers: batch -> (its output as K columns, the probabilities of its
    logits through the head's own sigmoid/softmax), from one forward pass of a two-output view of the model."""
    if not any(is_calibration_layer(layer) for layer in model.layers):
        return None
    both = keras.Model(model.inputs, [model.output, logits_model(model).output])
    logit_head = Head(head.kind, Head.of_logits(model).units)  # a calibrated 2-unit softmax: its logits keep 2

    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, logits = both(tf.convert_to_tensor(batch, dtype=model.inputs[0].dtype), training=False)
        return head.probabilities(out.numpy()), logit_head.activate(logits.numpy())

    return predict


