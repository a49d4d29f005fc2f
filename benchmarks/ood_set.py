"""Images a chest X-ray model must not be trusted on, for the out-of-distribution guard's tests and benchmark.

`write_ood_set(folder, shared_data)` writes them as files a user would hand to `distributed.predict`:

- real radiographs of other anatomy from `shared_data/dicom-real` (the NEMA WG04 set): the extremity CR and
  the head CT slice, each as its DICOM and as a PNG of its display pixels (a PNG carries no header to refuse);
- natural photographs that ship with the installed libraries (scikit-learn's sample images, matplotlib's
  sample photograph), so no download is needed;
- rendered non-radiographs: noise, a page of text, a checkerboard, a grey ramp and a flat disc.

Also `adult_chest(shared_data)`: the adult chest CR of the same set, which is a chest film but not a
paediatric one (what the guard says of it is measured, not asserted: docs/evaluation.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

OTHER_ANATOMY = ("RG3_J2KR.dcm", "693_J2KR.dcm")  # extremity CR, head CT
ADULT_CHEST = "RG1_UNCR.dcm"


def _display_pixels(dicom_file: Path) -> np.ndarray:
    """A DICOM's pixels as the toolkit decodes them (any modality or body part), uint8."""
    from preprocessing.transform import TransformParams, decode

    params = TransformParams(modalities=(), body_parts=())
    return decode(dicom_file.read_bytes(), 1024, "letterbox", dicom_file.name, params).pixels


def _photographs() -> list[Path]:
    import matplotlib
    import sklearn.datasets

    images = sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    return images + [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def _renderings(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    text = np.full((480, 640), 245, np.uint8)
    for row, line in enumerate(("RADIOLOGY REPORT", "Patient: test", "Findings: none", "Impression: -")):
        cv2.putText(text, line, (20, 80 + 90 * row), cv2.FONT_HERSHEY_SIMPLEX, 1.6, 20, 3)
    disc = np.zeros((400, 400), np.uint8)
    cv2.circle(disc, (200, 200), 140, 200, -1)
    return {"noise": rng.integers(0, 256, (400, 400), dtype=np.uint8),
            "text": text,
            "checkerboard": ((np.indices((400, 400)) // 40).sum(0) % 2 * 255).astype(np.uint8),
            "ramp": np.tile(np.linspace(0, 255, 400).astype(np.uint8), (400, 1)),
            "disc": disc}


def write_ood_set(folder: Path, shared_data: Path) -> dict[str, list[Path]]:
    """Write the set into `folder`; {"dicom": [...], "other_anatomy_png": [...], "photograph": [...],
    "rendered": [...]}."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"dicom": [], "other_anatomy_png": [], "photograph": [], "rendered": []}
    for name in OTHER_ANATOMY:
        source = shared_data / "dicom-real" / name
        out["dicom"].append(Path(shutil.copy(source, folder / name)))
        png = folder / f"{Path(name).stem}.png"
        cv2.imwrite(str(png), _display_pixels(source))
        out["other_anatomy_png"].append(png)
    for photo in _photographs():
        out["photograph"].append(Path(shutil.copy(photo, folder / photo.name)))
    for name, pixels in _renderings().items():
        path = folder / f"rendered-{name}.png"
        cv2.imwrite(str(path), pixels)
        out["rendered"].append(path)
    return out


def adult_chest(shared_data: Path) -> Path:
    return shared_data / "dicom-real" / ADULT_CHEST
