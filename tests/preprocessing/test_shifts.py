"""preprocessing.shifts: each acquisition shift changes the pixels as its name says, on a source image and on
a batch of prepared ones alike."""
from __future__ import annotations

import numpy as np
import pytest

from preprocessing.shifts import SHIFTS, score_under_shifts, shifted_batch
from tests.conftest import radiograph_like


def test_shifts_change_the_pixels_as_named():
    px = radiograph_like(0, (200, 180))
    out = {name: fn(px) for name, fn in SHIFTS.items()}
    assert all(v.shape == px.shape and v.dtype == np.uint8 for v in out.values())
    assert out["gamma-0.7"].mean() > px.mean() > out["gamma-1.4"].mean()  # gamma < 1 brightens
    assert out["contrast+30"].std() > px.std() > out["contrast-30"].std()
    assert np.abs(np.diff(out["blur"].astype(float), axis=1)).mean() < np.abs(np.diff(px.astype(float), axis=1)).mean()
    assert 6 < (out["noise"].astype(float) - px).std() < 10
    assert np.array_equal(SHIFTS["noise"](px), out["noise"])  # reproducible
    assert 0 < np.abs(out["jpeg-40"].astype(float) - px).mean() < 15  # the test image is noisy: JPEG smooths it
    # zoom in: the centre enlarged (the middle pixel stays, the border's columns are the centre's); zoom out: the
    # image in the middle 90 %, black around
    assert np.abs(out["zoom-in-1.11"][100, 90].astype(float) - px[100, 90]).mean() < 12
    assert np.abs(out["zoom-in-1.11"][:, 0].astype(float) - px[:, 9]).mean() < np.abs(
        out["zoom-in-1.11"][:, 0].astype(float) - px[:, 0]).mean()
    zoomed_out = out["zoom-out-0.9"]
    assert zoomed_out[:10].max() == 0 and zoomed_out[:, :9].max() == 0 and zoomed_out[100, 90] > 0
    assert (zoomed_out > 0).mean() == pytest.approx(0.9 * 0.9, abs=0.02)


def test_a_batch_of_prepared_images_is_shifted_image_by_image():
    """The robust threshold rule shifts (n, size, size, 1) batches of prepared images: each image as the
    function shifts it alone, in its shape."""
    batch = np.stack([radiograph_like(i, (64, 64))[:, :, np.newaxis] for i in range(3)])
    for name, shift in SHIFTS.items():
        out = shifted_batch(batch, shift)
        assert out.shape == batch.shape and out.dtype == np.uint8, name
        for image, shifted in zip(batch, out):
            assert np.array_equal(shifted[:, :, 0], shift(image[:, :, 0])), name
    assert shifted_batch(batch[:0], SHIFTS["blur"]).shape == (0, 64, 64, 1)


def test_a_batch_is_scored_under_every_shift_in_order():
    batch = np.stack([radiograph_like(i, (64, 64))[:, :, np.newaxis] for i in range(3)])
    scored = score_under_shifts(batch, lambda images: images.reshape(len(images), -1).mean(axis=1))
    assert scored.shape == (len(SHIFTS), 3)
    for row, shift in zip(scored, SHIFTS.values()):
        np.testing.assert_allclose(row, shifted_batch(batch, shift).reshape(3, -1).mean(axis=1))
