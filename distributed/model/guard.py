"""The out-of-distribution guard: does an image look like the images the model was trained on?

A classifier answers for every input, a tibia or a photograph as readily as a chest film. The guard scores
the model's input image itself, before the model, so it works the same for every model format (Keras,
SavedModel, ONNX, TFLite) and needs neither TensorFlow nor the model:

- Each prepared image becomes a small descriptor: its grey levels and its local edge energy (absolute
  Laplacian), each averaged down to `side` x `side`. The grey levels catch the wrong anatomy or framing,
  the edge energy catches texture a radiograph does not have (noise, text, photographs, flat renderings).
- A probabilistic PCA (Tipping and Bishop 1999; scikit-learn's `PCA.score_samples`) is fitted to the
  training split's descriptors; the score is the negative log-likelihood per descriptor value, so higher is
  less like the training images.
- The threshold is a high quantile of the validation split's scores (never the test split's), so about
  1 - quantile of same-source images are flagged, and the share flagged on another site says how far it is.

Chosen over the model's own outputs (its maximum probability, its energy score) by measurement
(docs/benchmarks.md, "At another site"). No TensorFlow here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cxrscale.errors import CxrError

GUARD_FILE = "guard.npz"
DEFAULT_QUANTILE = 0.995
DEFAULT_SIDE = 8
DEFAULT_VARIANCE = 0.95  # share of the training descriptors' variance the principal subspace keeps
MAX_FIT_IMAGES = 20000  # a random sample of a larger training split is plenty for a few hundred dimensions
OUTSIDE = "outside what the model was trained on"


def describe(images: np.ndarray, side: int = DEFAULT_SIDE) -> np.ndarray:
    """uint8 images (n, H, W[, 1]) -> float32 descriptors (n, 2 * side * side): grey level and absolute
    Laplacian, each averaged to side x side."""
    import cv2

    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    out = np.empty((len(images), 2 * side * side), np.float32)
    for i, image in enumerate(images):
        grey = image.astype(np.float32) / 255.0
        edges = np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=3))
        out[i, :side * side] = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA).ravel()
        out[i, side * side:] = cv2.resize(edges, (side, side), interpolation=cv2.INTER_AREA).ravel()
    return out


@dataclass(frozen=True)
class Guard:
    """A fitted guard: the probabilistic PCA of the training descriptors and the validation threshold."""

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d), orthonormal rows
    variances: np.ndarray  # (k,) the descriptors' variance along each component
    noise_variance: float  # the mean variance of the discarded directions
    threshold: float  # scores above it are outside
    side: int = DEFAULT_SIDE
    quantile: float = DEFAULT_QUANTILE
    fitted: dict[str, Any] = field(default_factory=dict)  # what it was fitted on: image counts, image size

    def scores(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, H, W[, 1]) -> (n,) float64 scores: higher is less like the training images."""
        return self.score_descriptors(describe(images, self.side))

    def score_descriptors(self, descriptors: np.ndarray) -> np.ndarray:
        x = np.asarray(descriptors, np.float64) - self.mean
        z = x @ self.components.T
        residual = np.maximum(np.sum(x * x, axis=1) - np.sum(z * z, axis=1), 0.0)
        d, k = x.shape[1], len(self.variances)
        log_det = np.sum(np.log(self.variances)) + (d - k) * np.log(self.noise_variance)
        nll = 0.5 * (np.sum(z * z / self.variances, axis=1) + residual / self.noise_variance
                     + log_det + d * np.log(2 * np.pi))
        return nll / d

    def outside(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def summary(self) -> dict[str, Any]:
        return {"method": "probabilistic PCA of grey-level and edge-energy thumbnails", "side": self.side,
                "components": int(len(self.variances)), "threshold": float(self.threshold),
                "quantile": self.quantile, "fitted": dict(self.fitted)}

    def save(self, path: Path) -> None:
        from cxrscale.files import atomic_path

        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, mean=self.mean, components=self.components, variances=self.variances,
                     noise_variance=self.noise_variance, threshold=self.threshold, side=self.side,
                     quantile=self.quantile, fitted_images=np.array([self.fitted.get("train", 0),
                                                                      self.fitted.get("val", 0)]),
                     image_size=self.fitted.get("image_size", 0))

    @classmethod
    def load(cls, path: Path) -> "Guard":
        try:
            with np.load(path) as f:
                train, val = (int(v) for v in f["fitted_images"])
                return cls(f["mean"], f["components"], f["variances"], float(f["noise_variance"]),
                           float(f["threshold"]), int(f["side"]), float(f["quantile"]),
                           {"train": train, "val": val, "image_size": int(f["image_size"])})
        except (OSError, KeyError, ValueError) as err:
            raise CxrError(f"{path} is not a readable out-of-distribution guard ({err}): run "
                           "python -m distributed.evaluate again to refit it") from None


def fit_guard(train_images: Iterable[np.ndarray], val_images: Iterable[np.ndarray], *,
              quantile: float = DEFAULT_QUANTILE, side: int = DEFAULT_SIDE, variance: float = DEFAULT_VARIANCE,
              seed: int = 0) -> Guard:
    """Fit on the training split's images (uint8 (H, W, 1) images, read once; a random MAX_FIT_IMAGES of a
    larger split) and choose the threshold as the `quantile` of the validation images' scores."""
    from sklearn.decomposition import PCA

    if not 0.5 <= quantile < 1:
        raise CxrError(f"the guard's quantile must be in [0.5, 1), got {quantile}")
    rng = np.random.default_rng(seed)
    sample: list[np.ndarray] = []
    size = 0
    for seen, image in enumerate(train_images):  # reservoir sampling: one pass, bounded memory
        size = image.shape[0]
        if len(sample) < MAX_FIT_IMAGES:
            sample.append(describe(image[np.newaxis], side)[0])
        else:
            j = rng.integers(0, seen + 1)
            if j < MAX_FIT_IMAGES:
                sample[j] = describe(image[np.newaxis], side)[0]
    x = np.stack(sample) if sample else np.zeros((0, 2 * side * side), np.float32)
    val = np.array([describe(image[np.newaxis], side)[0] for image in val_images], np.float32)
    if len(x) < 2 * side * side // 4 or len(val) < 20:
        raise CxrError(f"the out-of-distribution guard needs at least {2 * side * side // 4} training and 20 "
                       f"validation images, got {len(x)} and {len(val)}")
    pca = PCA(n_components=variance, svd_solver="full", random_state=seed).fit(x.astype(np.float64))
    noise = max(float(pca.noise_variance_), 1e-12)
    guard = Guard(pca.mean_, pca.components_, np.maximum(pca.explained_variance_, noise), noise, np.inf, side,
                  quantile, {"train": len(x), "val": len(val), "image_size": size})
    threshold = float(np.quantile(guard.score_descriptors(val), quantile))
    return Guard(guard.mean, guard.components, guard.variances, noise, threshold, side, quantile, guard.fitted)
