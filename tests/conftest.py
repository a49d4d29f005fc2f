"""Shared test fixtures: the real-data location, a small image factory, one Ray for the session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

pytest_plugins = ["tests.training_fixtures"]  # trained-run fixtures shared by distributed/ and optimize/


def shared_data_root() -> Path:
    return Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Kermany radiographs in ../shared/data (or $CXR_SHARED_DATA). Skips when absent, fails
    instead when CXR_REQUIRE_SHARED_DATA=1 (as CI sets it)."""
    root = shared_data_root()
    if not (root / "kermany224" / "train").is_dir():
        message = (f"real chest X-ray data not found at {root} (expected kermany224/train/{{NORMAL,PNEUMONIA}}); "
                   "set CXR_SHARED_DATA to its folder")
        if os.environ.get("CXR_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " [CXR_REQUIRE_SHARED_DATA=1]")
        pytest.skip(message)
    return root


def radiograph_like(seed: int, shape: tuple[int, int] = (300, 260), bright_patch: bool = False) -> np.ndarray:
    """A quick grey uint8 image with structure (for tests that need distinct, decodable pictures)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = 90 + 60 * np.sin(xx / (7 + seed % 11)) * np.cos(yy / (9 + seed % 5)) + rng.normal(0, 12, shape)
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 50)
        img += 50 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r))
    if bright_patch:
        img[h // 3: h // 2, w // 4: w // 2] += 80
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), pixels):
        raise RuntimeError(f"could not write {path}")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for all in-process preprocessing runs (each `prepare` reuses it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             logging_level="ERROR")
    yield
    ray.shutdown()
