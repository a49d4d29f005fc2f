"""The one place that chooses Keras: tf_keras, the Keras 2 API, for the whole toolkit.

Horovod's Keras layer and tensorflow-model-optimization both need Keras 2. TensorFlow 2.21 ships Keras 3 as
`keras`; with TF_USE_LEGACY_KERAS=1 its `tf.keras` is tf_keras, but Horovod's callbacks still do
`from keras import backend` (Keras 3). Everything in cxrscale imports Keras from here:

    from distributed.model.kerasenv import keras, hvd_keras
"""
from __future__ import annotations

import os
import sys

# Must be set before TensorFlow is first imported, so that tf.keras resolves to tf_keras too.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_keras as keras  # noqa: E402


def hvd_keras():
    """Import `horovod.tensorflow.keras` with `keras` resolving to tf_keras while it loads.

    Horovod binds `from keras import backend as K` at import time and its callbacks call K.get_value /
    K.set_value / K.constant on it; with Keras 3 bound there, MetricAverageCallback and the LR callbacks
    fail. The alias is removed again afterwards, so nothing else sees `keras` changed.
    """
    if "horovod.tensorflow.keras" in sys.modules:
        return sys.modules["horovod.tensorflow.keras"]
    saved = sys.modules.get("keras")
    sys.modules["keras"] = keras
    try:
        import horovod.tensorflow.keras as hvd
    finally:
        if saved is None:
            sys.modules.pop("keras", None)
        else:
            sys.modules["keras"] = saved
    return hvd


__all__ = ["keras", "hvd_keras"]
