"""What the sample holds: its splits and counts, Kermany-style file names, and the seed of every image, so
that an image's pixels depend only on (seed, split, class, index)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from preprocessing.sample.render import FINDINGS, encode_jpeg, render_findings, render_radiograph, stamp_synthetic

CLASSES = ("NORMAL", "PNEUMONIA")
KNOWN_SPLITS = ("train", "val", "test")
# Aspect (width / height) range used with aspect_jitter=True.
ASPECT_RANGE = (0.8, 1.25)
# Non-train splits are "small": this fraction of the train counts (at least 1).
EXTRA_SPLIT_FRACTION = 0.2

# Fixed small integer codes used as SeedSequence entropy words; never reorder.
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_CLASS_CODE = {"NORMAL": 0, "PNEUMONIA": 1}
# Stream tags: distinct second entropy word per purpose. (Needed because
# SeedSequence treats trailing zero words as absent: [1, 2, 3] == [1, 2, 3, 0].)
_STREAM_IMAGE = 0
_STREAM_NAMES = 1
_STREAM_FINDINGS = 2
FINDING_PREVALENCE = 0.35   # each finding's share of the multi-label sample, drawn independently


# --------------------------------------------------------------------------- #
# File naming (Kermany conventions)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PlannedImage:
    """One file the generator will write.

    relpath: POSIX path relative to the output folder; index: position within
    (split, label), which alone (with seed) determines the pixels; pattern:
    "bacteria"/"virus" for PNEUMONIA, None for NORMAL.
    """

    relpath: str
    split: str
    label: str
    index: int
    pattern: str | None


def _normal_names(rng: np.random.Generator, n: int, first_number: int) -> tuple[list[str], int]:
    """NORMAL file names and the last patient number used.

    ``IM-NNNN-0001.jpeg`` or ``NORMAL2-IM-NNNN-0001.jpeg``; some patients have a
    second image named ``...-0002.jpeg`` or ``...-0001-0002.jpeg``. Patient
    numbers are unique across both prefixes so any patient-id parser agrees.
    """
    names: list[str] = []
    number = first_number
    total = 0
    while total < n:
        size = int(rng.choice([1, 2], p=[0.82, 0.18]))
        number += int(rng.integers(1, 4))
        prefix = "NORMAL2-" if rng.random() < 0.35 else ""
        long_style = bool(rng.random() < 0.5)
        stem = f"{prefix}IM-{number:04d}"
        group = [f"{stem}-0001.jpeg"]
        group.append(f"{stem}-0001-0002.jpeg" if long_style else f"{stem}-0002.jpeg")
        take = min(size, n - total)
        names.extend(group[:take])
        total += take
    return names, number


def _pneumonia_names(rng: np.random.Generator, n: int, first_person: int,
                     first_k: int) -> tuple[list[tuple[str, str]], int, int]:
    """PNEUMONIA (name, pattern) pairs, and the last person / image numbers used.

    ``personN_bacteria_K.jpeg`` / ``personN_virus_K.jpeg``: N is the patient,
    K a running image number across the class (as in the real dataset); a
    patient has one pattern and 1-3 images.
    """
    out: list[tuple[str, str]] = []
    person, k = first_person, first_k
    total = 0
    while total < n:
        size = int(rng.choice([1, 2, 3], p=[0.55, 0.30, 0.15]))
        person += int(rng.integers(1, 4))
        kind = "bacteria" if rng.random() < 0.65 else "virus"
        take = min(size, n - total)
        for _ in range(take):
            k += int(rng.integers(1, 3))
            out.append((f"person{person}_{kind}_{k}.jpeg", kind))
        total += take
    return out, person, k


def split_counts(split: str, n_normal: int, n_pneumonia: int) -> dict[str, int]:
    """Images per class for ``split``: train gets the full counts, others ~20%."""
    if split == "train":
        return {"NORMAL": n_normal, "PNEUMONIA": n_pneumonia}

    def small(n: int) -> int:
        return 0 if n == 0 else max(1, int(round(n * EXTRA_SPLIT_FRACTION)))

    return {"NORMAL": small(n_normal), "PNEUMONIA": small(n_pneumonia)}


def plan_sample(n_normal: int, n_pneumonia: int, seed: int,
                splits: Sequence[str]) -> list[PlannedImage]:
    """Every file a call would write, in a fixed order (no pixels rendered).

    Patient numbers continue from one split to the next, so no patient is in
    two splits (like the real train/test folders).
    """
    plan: list[PlannedImage] = []
    number, person, k = 0, 0, 0
    for split in ordered_splits(splits):
        counts = split_counts(split, n_normal, n_pneumonia)
        sc = _SPLIT_CODE[split]
        rng_n = np.random.default_rng([seed, _STREAM_NAMES, sc, _CLASS_CODE["NORMAL"], 1])
        names, number = _normal_names(rng_n, counts["NORMAL"], number)
        for i, name in enumerate(names):
            plan.append(PlannedImage(f"{split}/NORMAL/{name}", split, "NORMAL", i, None))
        rng_p = np.random.default_rng([seed, _STREAM_NAMES, sc, _CLASS_CODE["PNEUMONIA"], 1])
        pairs, person, k = _pneumonia_names(rng_p, counts["PNEUMONIA"], person, k)
        for i, (name, kind) in enumerate(pairs):
            plan.append(PlannedImage(f"{split}/PNEUMONIA/{name}", split, "PNEUMONIA", i, kind))
    return plan


def ordered_splits(splits: Sequence[str]) -> list[str]:
    """Splits in canonical order (train, val, test) so naming is order-independent."""
    return [s for s in KNOWN_SPLITS if s in splits]


def image_rng(seed: int, split: str, label: str, index: int) -> np.random.Generator:
    """The generator that renders image ``index`` of ``label`` in ``split``."""
    return np.random.default_rng([seed, _STREAM_IMAGE, _SPLIT_CODE[split],
                                  _CLASS_CODE[label], index])


def _image_size(rng: np.random.Generator, size: int, aspect_jitter: bool) -> tuple[int, int]:
    """(height, width) in pixels; with jitter the longer side is ``size`` and
    width/height is log-uniform in ASPECT_RANGE."""
    if not aspect_jitter:
        return size, size
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    if aspect >= 1.0:
        return int(round(size / aspect)), size
    return size, int(round(size * aspect))


def render_planned(item: PlannedImage, size: int, seed: int, aspect_jitter: bool) -> bytes:
    """JPEG bytes of one planned image (pure function of its arguments)."""
    rng = image_rng(seed, item.split, item.label, item.index)
    hw = _image_size(rng, size, aspect_jitter)
    img = render_radiograph(rng, hw, item.label == "PNEUMONIA", pattern=item.pattern)
    return encode_jpeg(stamp_synthetic(img))


# --------------------------------------------------------------------------- #
# The multi-label sample
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PlannedFindings:
    """One image of the multi-label sample: relpath (images/NNNNN.jpeg), index, patient (two images each) and
    the findings it shows (a subset of `render.FINDINGS`)."""

    relpath: str
    index: int
    patient: str
    findings: tuple[str, ...]


def plan_findings(n_images: int, seed: int) -> list[PlannedFindings]:
    """Every image of the multi-label sample, in order: each finding drawn independently with probability
    `FINDING_PREVALENCE` from the image's own seed, so an image does not depend on how many are asked for."""
    plan = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, _STREAM_FINDINGS, i, 1])
        findings = tuple(f for f in FINDINGS if rng.random() < FINDING_PREVALENCE)
        plan.append(PlannedFindings(f"images/{i:05d}.jpeg", i, f"p{i // 2:05d}", findings))
    return plan


def render_planned_findings(item: PlannedFindings, size: int, seed: int) -> bytes:
    """JPEG bytes of one image of the multi-label sample (pure function of its arguments)."""
    rng = np.random.default_rng([seed, _STREAM_FINDINGS, item.index, 2])
    return encode_jpeg(stamp_synthetic(render_findings(rng, size, item.findings)))
