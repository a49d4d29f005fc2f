"""The one transform from a radiograph file's bytes to model input: decode, grey, resize, contrast.

It is used when a dataset is prepared and again when a model predicts, so training and serving see the
same pixels. Everything here is a pure function of its inputs (no files, no globals that change results).

Output: uint8 array of shape (size, size, 1). Scaling to [0, 1] and backbone normalisation are the
model's job (they live inside the model graph).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from preprocessing import dicom
from preprocessing.jpeg import jpeg_frame_size, jpeg_structure_error

RESIZE_MODES = ("letterbox", "stretch")
CONTRAST_MODES = ("clahe", "equalize", "none")
_JPEG_MAGIC = b"\xff\xd8\xff"
_REDUCED_GREY = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
                 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


class ImageRejected(ValueError):
    """An input that cannot become a training image; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class TransformParams:
    """Every parameter of the transform; all of them are recorded in the prepared dataset's manifest.

    size: output side in pixels (output is size x size x 1).
    resize: "letterbox" keeps the aspect ratio and pads with black; "stretch" ignores it (the thesis's way).
    contrast: "clahe" (local, clip-limited), "equalize" (global histogram equalisation, the thesis's way)
        or "none". Applied to the image content before padding, so padding does not skew the histogram.
    clahe_clip_limit, clahe_tile_grid: OpenCV CLAHE parameters.
    min_side: inputs whose shorter side is below this many pixels are rejected.
    modalities, views, body_parts: DICOM Modality, ViewPosition and BodyPartExamined codes accepted (empty:
        any; UNKNOWN: the element is absent); JPEG and PNG files carry none and are not checked.
    allow_burned_in_annotation: accept DICOMs whose BurnedInAnnotation is YES (text in the pixels is PHI).
    """

    size: int = 224
    resize: str = "stretch"
    contrast: str = "clahe"
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    min_side: int = 64
    modalities: tuple[str, ...] = dicom.RADIOGRAPHY_MODALITIES
    views: tuple[str, ...] = ()
    allow_burned_in_annotation: bool = False
    body_parts: tuple[str, ...] = dicom.CHEST_BODY_PARTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(str(m).upper() for m in self.modalities))
        object.__setattr__(self, "views", tuple(str(v).upper() for v in self.views))
        object.__setattr__(self, "body_parts", tuple(str(v).upper() for v in self.body_parts))
        if self.size < 32:
            raise ValueError(f"size must be at least 32 px, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.contrast not in CONTRAST_MODES:
            raise ValueError(f"contrast must be one of {', '.join(CONTRAST_MODES)}, got {self.contrast!r}")
        if self.clahe_clip_limit <= 0 or self.clahe_tile_grid < 1:
            raise ValueError("clahe clip limit must be > 0 and tile grid >= 1")
        if self.min_side < 1:
            raise ValueError(f"min side must be at least 1 px, got {self.min_side}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformParams":
        """From a manifest's record. One written before the DICOM checks existed (no `modalities` key)
        accepted any modality and view, and so does its transform now; one written before the body-part
        check (no `body_parts` key) accepted any body part, and so does its transform."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "modalities" not in data:
            values["modalities"] = ()
        if "body_parts" not in data:
            values["body_parts"] = ()
        return cls(**values)


@dataclass(frozen=True)
class Decoded:
    """A decoded greyscale image. pixels: uint8 (H, W); original_shape: (H, W) of the file before any
    reduced-size decoding; fmt: "jpeg", "png", "dicom", ...; patient_id: DICOM PatientID (raw, never
    written anywhere; callers hash it) or None; modality, view, burned_in, transfer_syntax: the DICOM
    header's codes (`preprocessing.dicom`), None for other formats."""

    pixels: np.ndarray
    original_shape: tuple[int, int]
    fmt: str
    patient_id: str | None = None
    modality: str | None = None
    view: str | None = None
    burned_in: str | None = None
    transfer_syntax: str | None = None
    acquired: str | None = None  # DICOM acquisition time (YYYYMMDDHHMMSS), for --split-by time only


def is_dicom(data: bytes, name: str = "") -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map any numeric image to uint8 by a linear min-max stretch (8-bit input is returned unchanged).

    Used for 16-bit PNGs and DICOM, whose stored range (often 10-12 bits) says nothing about display.
    """
    if pixels.dtype == np.uint8:
        return pixels
    arr = pixels.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey(pixels: np.ndarray) -> np.ndarray:
    """Collapse OpenCV's BGR / BGRA / grey layouts to a single grey plane; alpha is dropped."""
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        return pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY)
    raise ImageRejected(f"unsupported pixel layout {pixels.shape}")


def reduction_factor(shape: tuple[int, int], size: int, resize: str) -> int:
    """Largest JPEG DCT-domain reduction (1, 2, 4 or 8) that still leaves at least `size` pixels where the
    resize needs them: the long side for letterbox, both sides for stretch. Never upsamples after it."""
    need = max(shape) if resize == "letterbox" else min(shape)
    for factor in (8, 4, 2):
        if need // factor >= size:
            return factor
    return 1


def decode_raster(data: bytes, size: int, resize: str) -> Decoded:
    """Decode JPEG/PNG/BMP/TIFF bytes to grey. Large JPEGs are decoded at reduced size by libjpeg, which is
    several times faster than a full decode followed by a resize."""
    buf = np.frombuffer(data, np.uint8)
    if data.startswith(_JPEG_MAGIC):
        problem = jpeg_structure_error(data)
        if problem:
            raise ImageRejected(f"corrupt or truncated JPEG: {problem}")
        shape = jpeg_frame_size(data)
        factor = reduction_factor(shape, size, resize) if shape else 1
        flag = _REDUCED_GREY.get(factor, cv2.IMREAD_GRAYSCALE)
        pixels = cv2.imdecode(buf, flag)
        if pixels is None:
            raise ImageRejected("corrupt JPEG (OpenCV could not decode it)")
        return Decoded(pixels, shape or pixels.shape[:2], "jpeg")
    pixels = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageRejected("not a decodable image (unrecognised format or corrupt data)")
    fmt = "png" if data.startswith(b"\x89PNG") else "raster"
    grey = to_uint8(_grey(pixels))
    return Decoded(grey, grey.shape[:2], fmt)


def decode_dicom(data: bytes, params: TransformParams | None = None) -> Decoded:
    """Decode a single-frame greyscale DICOM that passes the header checks of `params` (default: radiography
    modalities, any view, no burnt-in text): rescale slope/intercept and the VOI window applied, MONOCHROME1
    inverted so that bone is bright, then stretched to uint8."""
    params = params or TransformParams()
    try:
        image = dicom.decode_dicom(data, params.modalities, params.views, params.allow_burned_in_annotation,
                                   params.body_parts)
    except dicom.DicomRejected as err:
        raise ImageRejected(str(err)) from None
    return Decoded(to_uint8(image.values), image.shape, "dicom", image.patient_id, image.modality, image.view,
                   image.burned_in, image.transfer_syntax, image.acquired)


def decode(data: bytes, size: int = 224, resize: str = "letterbox", name: str = "",
           params: TransformParams | None = None) -> Decoded:
    """Decode any supported file's bytes to a grey uint8 image; raises `ImageRejected` with the reason.
    `params` gives the DICOM header checks (their defaults when None)."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    return decode_dicom(data, params) if is_dicom(data, name) else decode_raster(data, size, resize)


@functools.lru_cache(maxsize=8)
def _clahe(clip_limit: float, tile_grid: int) -> cv2.CLAHE:
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))


def resize_content(pixels: np.ndarray, size: int, resize: str) -> np.ndarray:
    """Resize a grey (H, W) image: letterbox scales the long side to `size` (the result is smaller than
    size x size on the short side); stretch gives exactly size x size."""
    h, w = pixels.shape
    if resize == "stretch":
        target = (size, size)
        scale = min(size / h, size / w)
    else:
        scale = size / max(h, w)
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(pixels, target, interpolation=interpolation)


def apply_contrast(pixels: np.ndarray, params: TransformParams) -> np.ndarray:
    if params.contrast == "clahe":
        return _clahe(params.clahe_clip_limit, params.clahe_tile_grid).apply(pixels)
    if params.contrast == "equalize":
        return cv2.equalizeHist(pixels)
    return pixels


def gamma_table(gamma: float) -> np.ndarray:
    """uint8 lookup table of x -> 255 (x / 255) ** gamma (gamma < 1 brightens): `gamma_table(g)[pixels]`."""
    return np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)


def pad_to_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Centre an (h, w) image with h, w <= size on a black size x size canvas."""
    h, w = pixels.shape
    top, left = (size - h) // 2, (size - w) // 2
    return cv2.copyMakeBorder(pixels, top, size - h - top, left, size - w - left,
                              cv2.BORDER_CONSTANT, value=0)


def transform_decoded(decoded: Decoded, params: TransformParams) -> np.ndarray:
    """Grey image -> model input uint8 (size, size, 1). Rejects images that are too small or blank."""
    return transform_steps(decoded, params)[1]


def transform_steps(decoded: Decoded, params: TransformParams) -> tuple[np.ndarray, np.ndarray]:
    """`transform_decoded`, also returning the resized grey content before the contrast step and the padding
    (preparation hashes it: a cheaper source for the perceptual hash than the decoded pixels)."""
    h, w = decoded.original_shape
    if min(h, w) < params.min_side:
        raise ImageRejected(f"image too small: {w}x{h} px, the shorter side must be >= {params.min_side} px")
    pixels = decoded.pixels
    if int(pixels.min()) == int(pixels.max()):
        raise ImageRejected("blank image (every pixel has the same value)")
    resized = resize_content(pixels, params.size, params.resize)
    return resized, pad_to_square(apply_contrast(resized, params), params.size)[:, :, np.newaxis]


def transform(data: bytes, params: TransformParams, name: str = "") -> np.ndarray:
    """Raw file bytes -> uint8 (size, size, 1): the whole transform, for preparation and prediction alike.

    `name` is only used to recognise DICOM files without the standard preamble by their extension.
    Raises `ImageRejected` with a human-readable reason for inputs that cannot be used.
    """
    return transform_decoded(decode(data, params.size, params.resize, name, params), params)
