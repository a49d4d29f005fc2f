"""A `Scorer`: a classifier as uint8 images in, probabilities out, whatever format it was loaded from
(`distributed.model.scoring.load_scorer` makes one for a SavedModel, a Keras file or a `.tflite` file), with
test-time augmentation as an option. No TensorFlow here."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrscale.errors import CxrError
from distributed.model.heads import Head
from preprocessing.transform import gamma_table


@dataclass
class Scorer:
    """Probabilities (n, head.columns) of uint8 images. `keras_model` is set for Keras models (Grad-CAM needs
    it). `_predict` maps a batch to the model's raw outputs (n, head.units)."""

    path: Path
    kind: str  # "keras" or "tflite"
    input_shape: tuple[int, int, int]
    head: Head
    _predict: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    keras_model: Any = field(default=None, repr=False)
    tta: bool = False  # average the outputs over `tta_views` of every image
    # batch -> (probabilities, the head's own probabilities before the built-in calibration), both as
    # head.columns columns, in one forward pass; set for Keras models that carry calibration layers
    _predict_both: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def has_calibration(self) -> bool:
        """Whether `predict_with_uncalibrated` can give the probabilities before the built-in calibration."""
        return self._predict_both is not None

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 images (n, H, W, C) -> probabilities (n, head.columns) as float64, in batches."""
        return self._run(images, batch_size, self._predict)

    def predict_with_uncalibrated(self, images: np.ndarray,
                                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated, uncalibrated) probabilities, both (n, head.columns) float64, from one pass over the
        images; the second is None for a model without built-in calibration."""
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
            empty = np.zeros((0, self.head.columns))
            return (empty, empty.copy()) if split else empty
        outs = []
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            if self.tta:
                outs.append(np.mean([fn(view) for view in tta_views(batch)], axis=0))
            else:
                outs.append(fn(batch))
        out = np.concatenate(outs)
        if not split:
            return self.head.probabilities(out).astype(np.float64)
        k = self.head.columns  # [calibrated probabilities | uncalibrated probabilities]
        return out[:, :k].astype(np.float64), out[:, k:].astype(np.float64)


def scoring_head(recorded: Head | None, read: Head, path: Path) -> Head:
    """The head a scorer of the model at `path` uses: the one its run recorded, in the form this file outputs
    (`Head.in_form`), else the one `read` from the file itself; a recorded head the file cannot carry is
    refused, naming the file."""
    if recorded is None:
        return read
    form = recorded.in_form(read.units)
    if form is None:
        raise CxrError(f"{path} outputs {read.units} units but its run records a {recorded.describe()} head")
    return form


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
