"""The out-of-distribution guard: its score is probabilistic PCA's, it round-trips, and on real radiographs
it passes another site's chest films and flags other anatomy, photographs and renderings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA

from benchmarks.ood_set import adult_chest, write_ood_set
from cxrscale.errors import CxrError
from distributed.model.guard import DEFAULT_SIDE, Guard, describe, fit_guard
from preprocessing.transform import ImageRejected, TransformParams, transform
from tests.conftest import radiograph_like

PARAMS = TransformParams(size=64, resize="stretch")


def test_score_is_the_probabilistic_pca_likelihood(tmp_path):
    images = [transform_array(radiograph_like(seed, (120, 100))) for seed in range(80)]
    guard = fit_guard(iter(images[:60]), iter(images[60:]), quantile=0.9)
    x = describe(np.stack(images[:60])).astype(np.float64)
    pca = PCA(n_components=0.95, svd_solver="full").fit(x)
    probe = np.stack(images[60:])
    expected = -pca.score_samples(describe(probe).astype(np.float64)) / x.shape[1]
    np.testing.assert_allclose(guard.scores(probe), expected, rtol=1e-6)
    assert np.mean(guard.outside(guard.scores(probe))) == pytest.approx(0.1, abs=0.051)  # the 0.9 quantile
    guard.save(tmp_path / "guard.npz")
    loaded = Guard.load(tmp_path / "guard.npz")
    np.testing.assert_array_equal(loaded.scores(probe), guard.scores(probe))
    assert loaded.threshold == guard.threshold and loaded.fitted == {"train": 60, "val": 20, "image_size": 64}
    assert describe(probe).shape == (20, 2 * DEFAULT_SIDE ** 2)


def test_bad_fits_and_files_are_refused(tmp_path):
    few = [transform_array(radiograph_like(seed, (120, 100))) for seed in range(10)]
    with pytest.raises(CxrError, match="needs at least 32 training and 20 validation images, got 10 and 10"):
        fit_guard(iter(few), iter(few))
    with pytest.raises(CxrError, match="quantile must be in"):
        fit_guard(iter(few), iter(few), quantile=1.0)
    broken = tmp_path / "guard.npz"
    broken.write_bytes(b"not numpy")
    with pytest.raises(CxrError, match=r"guard.npz is not a readable out-of-distribution guard"):
        Guard.load(broken)


def transform_array(pixels: np.ndarray) -> np.ndarray:
    import cv2

    return transform(cv2.imencode(".png", pixels)[1].tobytes(), PARAMS, "x.png")


def load(paths: list[Path], params: TransformParams = PARAMS) -> np.ndarray:
    return np.stack([transform(p.read_bytes(), params, p.name) for p in paths])


def test_real_radiographs_pass_and_other_images_are_flagged(shared_data, tmp_path):
    """Fitted on 1,200 real Kermany training radiographs (threshold on 300 more), the guard flags at most 5 %
    of the external development set (another acquisition batch) and every image of other anatomy (real CR and
    CT), every photograph and every rendering."""
    rng = np.random.default_rng(0)
    train_files = sorted((shared_data / "kermany224" / "train").glob("*/*.jpeg"))
    picked = [train_files[i] for i in rng.choice(len(train_files), 1500, replace=False)]
    guard = fit_guard(iter(load(picked[:1200])), iter(load(picked[1200:])))
    external = load(sorted((shared_data / "kermany224-external-dev").glob("*/*.jpeg")))
    flagged_external = float(np.mean(guard.outside(guard.scores(external))))
    ood = write_ood_set(tmp_path / "ood", shared_data)
    any_header = TransformParams(size=64, resize="stretch", modalities=(), body_parts=())
    other = {p.name: load([p], any_header)[0] for group in ood.values() for p in group}
    scores = dict(zip(other, guard.scores(np.stack(list(other.values())))))
    adult = guard.scores(load([adult_chest(shared_data)]))[0]
    print(f"external dev flagged {flagged_external:.3f}; threshold {guard.threshold:.2f}; adult chest CR "
          f"{adult:.2f}; " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    assert flagged_external <= 0.05
    assert all(score > guard.threshold for score in scores.values()), scores
    # the headers refuse the DICOMs before the guard sees them
    for dicom in ood["dicom"]:
        with pytest.raises(ImageRejected, match="body part examined EXTREMITY|modality CT"):
            load([dicom])
