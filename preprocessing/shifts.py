"""Acquisition shifts: pure functions on greyscale uint8 pixels, each what another site's radiographs can
differ by.

  gamma-0.7/1.4    x -> x ** gamma on [0, 1]: another detector or processing curve
  contrast+-30     +-30 % around the image mean: another window or exposure
  blur             Gaussian, sigma 0.6 % of the image side: another detector's resolution
  noise            Gaussian, sigma 8 grey levels: a noisier detector or lower dose
  jpeg-40          re-encoded as JPEG at quality 40: another PACS export
  zoom-in-1.11     the central 90 % of each side, enlarged back: a tighter collimation or a larger child
  zoom-out-0.9     the whole image at 90 % of each side, black around: a wider collimated field

benchmarks.robustness applies them to the decoded source pixels of a run's test files, before the whole
transform; the `robust` threshold rule (distributed.evaluation.scores) applies them to the prepared
validation images, the model's own input, to choose an operating point that holds under the worst of them.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Shift = Callable[[np.ndarray], np.ndarray]


def _gamma(g: float) -> Shift:
    from preprocessing.transform import gamma_table

    table = gamma_table(g)
    return lambda px: table[px]


def _contrast(factor: float) -> Shift:
    def apply(px: np.ndarray) -> np.ndarray:
        mean = float(px.mean())
        return np.clip(np.round((px.astype(np.float32) - mean) * factor + mean), 0, 255).astype(np.uint8)
    return apply


def _blur(px: np.ndarray) -> np.ndarray:
    import cv2

    sigma = 0.006 * max(px.shape[:2])
    return cv2.GaussianBlur(px, (0, 0), sigma).reshape(px.shape)


def _noise(px: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(int(px[::7, ::7].sum()) % (2**32))  # per image, reproducible
    return np.clip(np.round(px + rng.normal(0, 8.0, px.shape)), 0, 255).astype(np.uint8)


def _jpeg(quality: int) -> Shift:
    def apply(px: np.ndarray) -> np.ndarray:
        import cv2

        ok, buf = cv2.imencode(".jpg", px, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).reshape(px.shape)
    return apply


def _zoom(factor: float) -> Shift:
    """The anatomy `factor` times larger (the central 1/factor of each side, enlarged back) or, below 1,
    smaller inside black (the whole image at `factor` of each side, centred): another collimation, field of
    view or patient size in the same frame."""
    def apply(px: np.ndarray) -> np.ndarray:
        import cv2

        h, w = px.shape[:2]
        if factor >= 1:
            ch, cw = int(round(h / factor)), int(round(w / factor))
            y0, x0 = (h - ch) // 2, (w - cw) // 2
            return cv2.resize(px[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR).reshape(px.shape)
        out = np.zeros_like(px)
        ch, cw = int(round(h * factor)), int(round(w * factor))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        out[y0:y0 + ch, x0:x0 + cw] = cv2.resize(px, (cw, ch), interpolation=cv2.INTER_AREA).reshape(
            (ch, cw) + px.shape[2:])
        return out
    return apply


SHIFTS: dict[str, Shift] = {
    "gamma-0.7": _gamma(0.7), "gamma-1.4": _gamma(1.4), "contrast+30": _contrast(1.3),
    "contrast-30": _contrast(0.7), "blur": _blur, "noise": _noise, "jpeg-40": _jpeg(40),
    "zoom-in-1.11": _zoom(1 / 0.9), "zoom-out-0.9": _zoom(0.9)}


def shifted_batch(images: np.ndarray, shift: Shift) -> np.ndarray:
    """`shift` applied to each image of a (n, h, w, 1) uint8 batch."""
    return np.stack([shift(image) for image in images]) if len(images) else images


def score_under_shifts(images: np.ndarray, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`score` (a model's probabilities or logits of a batch) of the batch under each of SHIFTS, stacked:
    (len(SHIFTS), n, ...)."""
    return np.stack([score(shifted_batch(images, shift)) for shift in SHIFTS.values()])
