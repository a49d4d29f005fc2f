"""Patient-grouped stratified splitting, Kermany patient keys, and the duplicate audit's pure parts."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from preprocessing.audit import exact_duplicate_groups, near_duplicate_pairs, perceptual_hash, pixel_digest
from preprocessing.sources import patient_from_name
from preprocessing.split import EXCLUDED, assign_splits, group_ids, leaking_groups
from tests.conftest import radiograph_like


@pytest.mark.parametrize("name, key", [
    ("person1372_bacteria_3501.jpeg", "person1372"),
    ("person10_virus_35.jpeg", "person10"),
    ("IM-0115-0001.jpeg", "im-0115"),
    ("IM-0505-0001-0002.jpeg", "im-0505"),
    ("NORMAL2-IM-0007-0001.jpeg", "normal2-im-0007"),
    ("scan_17.png", None),
])
def test_kermany_patient_keys(name, key):
    assert patient_from_name(name) == key


def synthetic_cohort(seed: int, n_patients: int = 400):
    rng = np.random.default_rng(seed)
    labels, patients = [], []
    for p in range(n_patients):
        label = int(rng.random() < 0.74)  # Kermany-like imbalance
        for _ in range(int(rng.integers(1, 5))):
            labels.append(label)
            patients.append(f"p{p}")
    return np.array(labels), patients


def test_no_patient_in_two_splits_and_proportions_hold():
    labels, patients = synthetic_cohort(0)
    groups = group_ids(patients)
    splits = assign_splits(labels, groups, [None] * len(labels), {"val": 0.1, "test": 0.2}, seed=3)
    assert leaking_groups(groups, splits) == []
    for split, fraction in (("val", 0.1), ("test", 0.2), ("train", 0.7)):
        share = (splits == split).mean()
        assert abs(share - fraction) < 0.02, (split, share)
        for label in (0, 1):  # stratified: each class keeps its share in every split
            class_share = (splits[labels == label] == split).mean()
            assert abs(class_share - fraction) < 0.03, (split, label, class_share)


def test_split_is_deterministic_and_seeded():
    labels, patients = synthetic_cohort(1)
    groups = group_ids(patients)
    a = assign_splits(labels, groups, [None] * len(labels), {"val": 0.1, "test": 0.1}, seed=0)
    b = assign_splits(labels, groups, [None] * len(labels), {"val": 0.1, "test": 0.1}, seed=0)
    c = assign_splits(labels, groups, [None] * len(labels), {"val": 0.1, "test": 0.1}, seed=1)
    assert (a == b).all() and not (a == c).all()


def test_given_splits_are_kept_and_pull_their_groups():
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1] * 10)
    patients = [f"p{i // 2}" for i in range(len(labels))]  # pairs of images per patient
    fixed = [None] * len(labels)
    fixed[0] = "test"  # patient p0's other image (index 1) is in the pool
    splits = assign_splits(labels, group_ids(patients), fixed, {"val": 0.2}, seed=0)
    assert splits[0] == "test" and splits[1] == EXCLUDED  # the given test split is not enlarged
    assert set(splits[2:]) <= {"train", "val"}
    kept = assign_splits(labels, group_ids(patients), fixed, {"val": 0.2}, seed=0, overlap="train")
    assert kept[0] == "test" and kept[1] == "train"
    assert leaking_groups(group_ids(patients), kept) == [0] and leaking_groups(group_ids(patients), splits) == []


def test_duplicate_links_join_groups():
    groups = group_ids(["a", "b", "c", "d"], links=[(0, 3)])
    assert groups[0] == groups[3] and len(set(groups.tolist())) == 3


def test_exact_and_near_duplicates():
    images = [radiograph_like(s, (256, 256)) for s in range(6)]
    copy = images[2].copy()
    jpeg = cv2.imdecode(cv2.imencode(".jpg", images[4], [cv2.IMWRITE_JPEG_QUALITY, 70])[1], 0)
    rescaled = cv2.resize(cv2.resize(jpeg, (300, 300)), (256, 256))
    all_images = images + [copy, rescaled]
    digests = [pixel_digest(i) for i in all_images]
    assert exact_duplicate_groups(digests) == [[2, 6]]
    hashes = np.array([perceptual_hash(i) for i in all_images])
    pairs = {(i, j) for i, j, _ in near_duplicate_pairs(hashes, 24)}
    assert pairs == {(2, 6), (4, 7)}
    assert near_duplicate_pairs(hashes, -1) == []


def test_perceptual_hash_is_the_dct_hash_against_np_median():
    """The hash compares its 256 low frequencies with their median, computed without np.median (whose generic
    path cost more than the DCT): bit for bit the hash np.median gives, on images with ties and without."""
    import cv2

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (rng.integers(64, 400), rng.integers(64, 400)), dtype=np.uint8)
              for _ in range(40)] + [radiograph_like(k) for k in range(5)] + [np.full((80, 90), 7, np.uint8)]
    for image in images:
        small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
        low = cv2.dct(small)[:16, :16].ravel()
        expected = np.packbits(low > np.median(low)).view(">u8").astype(np.uint64)
        np.testing.assert_array_equal(perceptual_hash(image), expected)


def test_the_resized_image_hashes_to_the_decoded_ones_findings_on_real_radiographs(shared_data):
    """Preparation hashes the resized image (>= 64 px) instead of the decoded pixels, to save the hash's own
    shrinking: on the shared full-resolution radiographs, at the sizes and resizes users pick, the near- and
    exact-duplicate findings are the same, and different radiographs stay far beyond the near-duplicate
    distance."""
    from preprocessing.audit import DEFAULT_NEAR_DISTANCE
    from preprocessing.transform import decode, resize_content

    files = sorted((shared_data / "kermany-fullres").glob("*/*.jpeg"))
    assert len(files) >= 400
    for size, resize in ((224, "stretch"), (128, "letterbox")):
        decoded = [decode(f.read_bytes(), size, resize, f.name).pixels for f in files]
        before = np.array([perceptual_hash(d) for d in decoded])
        after = np.array([perceptual_hash(resize_content(d, size, resize)) for d in decoded])
        pairs = [near_duplicate_pairs(h, DEFAULT_NEAR_DISTANCE) for h in (before, after)]
        assert [(i, j) for i, j, _ in pairs[0]] == [(i, j) for i, j, _ in pairs[1]]
        # nothing near the line: the closest different pair of either is far beyond it
        exact = {tuple(g) for g in exact_duplicate_groups([pixel_digest(d) for d in decoded])}
        closest = [k for i, j, k in near_duplicate_pairs(after, 2 * DEFAULT_NEAR_DISTANCE) if (i, j) not in exact]
        assert not closest or min(closest) > DEFAULT_NEAR_DISTANCE + 8, closest


def multilabel_cohort(seed: int, patients: int = 3000, labels: int = 6):
    """Patients with 1-30 images (a long tail, as NIH's), labels of very different prevalence, correlated within
    a patient; one label rare (about 1 %), and some masked (-1) targets."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.3, 0.15, 0.08, 0.05, 0.03, 0.01])[:labels]
    targets, keys = [], []
    for p in range(patients):
        tendency = rng.random(labels) < prevalence * 2
        for _ in range(int(min(rng.pareto(1.2) + 1, 30))):
            row = (tendency & (rng.random(labels) < 0.5)).astype(int)
            row[rng.random(labels) < 0.02] = -1
            targets.append(row)
            keys.append(f"p{p}")
    return np.array(targets), keys


def test_multilabel_splits_keep_patients_whole_and_every_labels_prevalence():
    targets, patients = multilabel_cohort(0)
    groups = group_ids(patients)
    splits = assign_splits(targets, groups, [None] * len(targets), {"val": 0.1, "test": 0.2}, seed=2)
    assert leaking_groups(groups, splits) == []
    overall = (targets == 1).mean(axis=0)
    for split, fraction in (("val", 0.1), ("test", 0.2), ("train", 0.7)):
        chosen = splits == split
        assert abs(chosen.mean() - fraction) < 0.01, (split, chosen.mean())
        deviation = np.abs((targets[chosen] == 1).mean(axis=0) - overall) / overall
        assert deviation[:-1].max() < 0.05 and deviation[-1] < 0.2, (split, deviation)
    again = assign_splits(targets, groups, [None] * len(targets), {"val": 0.1, "test": 0.2}, seed=2)
    other = assign_splits(targets, groups, [None] * len(targets), {"val": 0.1, "test": 0.2}, seed=3)
    assert (again == splits).all() and not (other == splits).all()


def test_multilabel_given_splits_are_kept_exactly():
    targets, patients = multilabel_cohort(1, patients=300)
    groups = group_ids(patients)
    fixed = [("test" if k % 7 == 0 else None) for k in range(len(targets))]
    splits = assign_splits(targets, groups, fixed, {"val": 0.1}, seed=0)
    given = np.array([f == "test" for f in fixed])
    assert (splits[given] == "test").all() and (splits[~given] != "test").all()
    assert leaking_groups(groups, splits) == []  # a given test patient's pool images are excluded, not split
    assert (splits[~given & np.isin(groups, groups[given])] == EXCLUDED).all()


def test_iterative_stratification_weighs_groups_by_their_images():
    """One patient with many images positive for a label weighs as many images, not one row: two patients with
    9 positive images each and 18 single-image negatives split 1:1 put one big patient on each side."""
    from preprocessing.split import iterative_groups

    counts = np.array([[9], [9]] + [[0]] * 18)
    sizes = np.array([9, 9] + [1] * 18)
    chosen = iterative_groups(counts, sizes, np.array([0.5, 0.5]), seed=0)
    assert sorted(chosen[:2].tolist()) == [0, 1]
    assert [sizes[chosen == s].sum() for s in (0, 1)] == [18, 18]
