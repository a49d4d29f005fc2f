"""The one place that chooses Keras: tf_keras, the Keras 2 API, for the whole toolkit.

Horovod's Keras layer and tensorflow-model-optimization both need Keras 2. TensorFlow 2.21 ships Keras 3 as
`keras`; with TF_USE_LEGACY_KERAS=1 its `tf.keras` is tf_keras, but Horovod's callbacks still do
`from keras import backend` (Keras 3). Everything in cxrscale imports Keras from here:

    from distributed.model.kerasenv import keras, hvd_keras
"""
from __future__ import annotations

import os
import sys
import warnings

# CXR_VERBOSE=1 shows what TensorFlow prints as it starts (CPU features, CUDA probing, oneDNN), hidden otherwise.
VERBOSE = os.environ.get("CXR_VERBOSE", "") not in ("", "0")  # = cxrscale.console.verbose(), before any import

# Must be set before TensorFlow is first imported, so that tf.keras resolves to tf_keras too.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if VERBOSE else "2")

if not VERBOSE:
    # tf.lite.Interpreter announces its move to ai-edge-litert on every construction. The toolkit runs TFLite
    # on LiteRT; only tf.lite's QuantizationDebugger (optimize.compress, selective int8) still makes one.
    warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated", category=UserWarning)
    # the converter's note when a float-input model gets int8 internals, which is what the toolkit asks for
    warnings.filterwarnings("ignore", message=r"Statistics for quantized inputs were expected", category=UserWarning)

from cxrscale.console import quiet_tensorflow  # noqa: E402  (no TensorFlow in it)

with quiet_tensorflow():
    import tensorflow as _tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

    _tf.config.list_physical_devices("GPU")  # the CUDA probe, here rather than in the middle of a run


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


__all__ = ["VERBOSE", "hvd_keras", "keras"]
