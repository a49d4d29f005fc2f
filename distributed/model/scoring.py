"""Load a trained classifier from a run, an exported model or a `.tflite` file, and score uint8 images.

Every model of this toolkit takes uint8 images (n, H, W, C) and does its own scaling, so a `Scorer` is all
evaluation, prediction and the optimize stage need: give it pixels, get class probabilities (n, K).

No TensorFlow here: a `.tflite` model runs on LiteRT (`ai_edge_litert`), so a process that only serves one
(`distributed.predict --model model.tflite`) never loads TensorFlow. Keras models are loaded by
`distributed.model.keras_scoring`, imported only when one is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrscale.errors import CxrError
from cxrscale.console import quiet_tensorflow
from cxrscale.files import read_json
from preprocessing.transform import gamma_table

KERAS_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass
class Scorer:
    """Class probabilities of uint8 images. `keras_model` is set for Keras models (Grad-CAM needs it)."""

    path: Path
    kind: str  # "keras" or "tflite"
    input_shape: tuple[int, int, int]
    _predict: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    keras_model: Any = field(default=None, repr=False)
    tta: bool = False  # average the outputs over `tta_views` of every image
    # batch -> (output, the head's own probabilities before the built-in calibration) in one forward pass;
    # set for Keras models that carry calibration layers
    _predict_both: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def has_calibration(self) -> bool:
        """Whether `predict_with_uncalibrated` can give the probabilities before the built-in calibration."""
        return self._predict_both is not None

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 images (n, H, W, C) -> probabilities (n, K) as float64, in batches."""
        return self._run(images, batch_size, self._predict)

    def predict_with_uncalibrated(self, images: np.ndarray,
                                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated, uncalibrated) probabilities, both (n, K) float64, from one pass over the images; the
        second is None for a model without built-in calibration."""
        if self._predict_both is None:
            return self.predict(images, batch_size), None
        return self._run(images, batch_size, lambda b: np.concatenate(self._predict_both(b), axis=1), split=True)

    def _run(self, images: np.ndarray, batch_size: int, fn: Callable[[np.ndarray], np.ndarray],
             split: bool = False):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., np.newaxis]
        if images.shape[1:] != self.input_shape:
            raise CxrError(f"{self.path} takes images of shape {self.input_shape}, got {images.shape[1:]}: "
                           "the data was prepared at another size")
        if len(images) == 0:
            return (np.zeros((0, 0)), np.zeros((0, 0))) if split else np.zeros((0, 0))
        outs = []
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            if self.tta:
                outs.append(np.mean([fn(view) for view in tta_views(batch)], axis=0))
            else:
                outs.append(fn(batch))
        out = np.concatenate(outs)
        if not split:
            return output_probabilities(out).astype(np.float64)
        k = out.shape[1] // 2  # [calibrated output | uncalibrated probabilities], each widened to K columns
        return output_probabilities(out[:, :k]).astype(np.float64), out[:, k:].astype(np.float64)


# Test-time augmentation: the views are mild acquisition changes a model should be indifferent to (the
# training augmentation's range, no flip). Averaging over them smooths a prediction that hinges on one
# exposure or framing.
TTA_ZOOM = 0.92
TTA_GAMMAS = (0.8, 1.25)


def tta_views(images: np.ndarray) -> list[np.ndarray]:
    """uint8 (n, H, W, C) -> [the images, a centre crop of TTA_ZOOM of the side resized back, and each of
    TTA_GAMMAS applied], all uint8 (n, H, W, C)."""
    import cv2

    n, h, w, c = images.shape
    ch, cw = int(round(h * TTA_ZOOM)), int(round(w * TTA_ZOOM))
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = np.stack([cv2.resize(np.ascontiguousarray(im[top:top + ch, left:left + cw]), (w, h),
                                  interpolation=cv2.INTER_LINEAR).reshape(h, w, c) for im in images])
    return [images, zoomed] + [gamma_table(gamma)[images] for gamma in TTA_GAMMAS]


def run_model_path(run_dir: str | Path) -> Path:
    """The exported model of a training run (`runs/NAME/model`), or a clear error."""
    run_dir = Path(run_dir)
    read_run_config(run_dir)
    model = run_dir / "model"
    if not (model / "saved_model.pb").is_file():
        raise CxrError(f"{run_dir} has no exported model ({model}/saved_model.pb is missing): the training run "
                       "did not finish; resume it with python -m distributed.train --resume")
    return model


def read_run_config(run_dir: str | Path) -> dict:
    if not Path(run_dir).is_dir():
        raise CxrError(f"run folder not found: {run_dir}")
    return read_json(Path(run_dir) / "config.json", "training run config")


def load_scorer(path: str | Path, *, num_threads: int | None = None) -> Scorer:
    """A SavedModel folder or `.keras`/`.h5` file (loaded with tf_keras), or a `.tflite` file (LiteRT)."""
    path = Path(path)
    if not path.exists():
        raise CxrError(f"model not found: {path}")
    if path.suffix == ".tflite":
        return tflite_scorer(path, num_threads)
    if path.is_dir() and not (path / "saved_model.pb").is_file():
        raise CxrError(f"{path} is a folder but not a SavedModel (no saved_model.pb); pass a run with --run, "
                       "a SavedModel folder, a .keras/.h5 file or a .tflite file")
    if path.is_file() and path.suffix not in KERAS_FILE_SUFFIXES:
        raise CxrError(f"{path}: unknown model format {path.suffix!r}; expected a SavedModel folder, "
                       f"{', '.join(KERAS_FILE_SUFFIXES)} or .tflite")
    from distributed.model.keras_scoring import keras_scorer  # TensorFlow loads here, and only here

    return keras_scorer(path)


def litert_interpreter(path: str | Path, num_threads: int | None = None):
    """A LiteRT interpreter of a `.tflite` file (`ai_edge_litert.interpreter.Interpreter`), or a clear error."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        return Interpreter(model_path=str(path), num_threads=num_threads)
    except (ValueError, RuntimeError) as err:
        raise CxrError(f"cannot load the TFLite model {path}: {str(err).splitlines()[0]}") from None


def tflite_scorer(path: Path, num_threads: int | None = None) -> Scorer:
    """A Scorer of a TFLite file on LiteRT (whatever the file's name)."""
    interpreter = litert_interpreter(path, num_threads)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    shape = tuple(int(d) for d in inp["shape"][1:])
    if len(shape) != 3:
        raise CxrError(f"{path} takes inputs of shape {inp['shape']}, not images (H, W, C)")
    batch_size = [0]

    def predict(batch: np.ndarray) -> np.ndarray:
        if len(batch) != batch_size[0]:  # the converter fixes batch 1; resize to this batch once
            interpreter.resize_tensor_input(inp["index"], [len(batch), *shape])
            with quiet_tensorflow():  # the interpreter announces its XNNPACK delegate here
                interpreter.allocate_tensors()
            batch_size[0] = len(batch)
        interpreter.set_tensor(inp["index"], quantize_input(batch, inp))
        interpreter.invoke()
        return dequantize_output(interpreter.get_tensor(out["index"]), out)

    return Scorer(path, "tflite", shape, predict)


def quantize_input(images: np.ndarray, detail: dict) -> np.ndarray:
    """uint8 pixels -> the interpreter's input tensor: cast for float/plain-uint8 inputs, quantized with the
    tensor's (scale, zero point) for quantized integer inputs."""
    dtype = detail["dtype"]
    scale, zero = detail.get("quantization", (0.0, 0))
    identity = scale == 0.0 or (scale == 1.0 and zero == 0)
    if np.issubdtype(dtype, np.integer) and not identity:
        info = np.iinfo(dtype)
        return np.clip(np.round(images.astype(np.float32) / scale + zero), info.min, info.max).astype(dtype)
    return images.astype(dtype)


def dequantize_output(values: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(values.dtype, np.integer) and scale:
        return (values.astype(np.float32) - zero) * scale
    return values.astype(np.float32)


def output_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model output -> class probabilities of shape (n, K).

    (n, 1) or (n,) sigmoid outputs P(class 1) become [1 - p, p]; (n, K) softmax outputs are returned as
    floats unchanged.
    """
    out = np.asarray(outputs)
    if not np.issubdtype(out.dtype, np.floating):
        out = out.astype(np.float32)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ValueError(f"expected model outputs of shape (n, 1) or (n, K), got {out.shape}")
    if out.shape[1] == 1:
        return np.concatenate([1.0 - out, out], axis=1)
    return out


def predicted_classes(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Binary: positive where P(positive) >= threshold; K classes: the argmax."""
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)
