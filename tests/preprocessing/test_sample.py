"""Tests for the built-in synthetic sample (preprocessing.sample).

Real OpenCV, real files in tmp folders, no mocks. Small images (128 px) keep
the whole module to a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocessing.sample import (MARKER_NAME, README_NAME, generate_sample, image_rng, main, plan_sample,
                                  render_radiograph)

REPO_ROOT = Path(__file__).resolve().parents[2]
PNEUMONIA_RE = re.compile(r"person(\d+)_(bacteria|virus)_\d+\.jpeg")
NORMAL_RE = re.compile(r"(NORMAL2-)?IM-(\d+)-\d+(-\d+)?\.jpeg")

# Shared sample: enough images for a stable AUC, small enough to be fast.
N_NORMAL, N_PNEUMONIA, SIZE, SEED = 40, 60, 128, 0
SPLITS = ("train", "test")


def _files(root: Path) -> dict[str, bytes]:
    """All files under root as {posix relative path: bytes}."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _auc(labels: list[int], scores: list[float]) -> float:
    """ROC AUC of scores for labels (1 = positive); sklearn if available."""
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:  # Mann-Whitney U / (n_pos * n_neg), ties count half
        pos = [s for s, y in zip(scores, labels) if y == 1]
        neg = [s for s, y in zip(scores, labels) if y == 0]
        wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
        return wins / (len(pos) * len(neg))
    return float(roc_auc_score(labels, scores))


def _lung_boxes(shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of two boxes where the lung fields typically lie."""
    h, w = shape
    m = np.zeros(shape, bool)
    rows = slice(int(0.28 * h), int(0.72 * h))
    m[rows, int(0.18 * w):int(0.42 * w)] = True
    m[rows, int(0.58 * w):int(0.82 * w)] = True
    return m


def _lung_structure(img: np.ndarray) -> float:
    """Mean of lung-box pixels after subtracting a heavy blur (grey levels)."""
    f = img.astype(np.float32)
    high_pass = f - cv2.GaussianBlur(f, (0, 0), img.shape[0] / 6)
    return float(high_pass[_lung_boxes(img.shape)].mean())


def _read_grey(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, f"OpenCV could not decode {path}"
    return img


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sample") / "data"
    counts = generate_sample(out, N_NORMAL, N_PNEUMONIA, SIZE, SEED, SPLITS)
    return out, counts


def test_counts_and_layout(sample):
    out, counts = sample
    assert counts == {"train": {"NORMAL": 40, "PNEUMONIA": 60},
                      "test": {"NORMAL": 8, "PNEUMONIA": 12}}
    for split, per_class in counts.items():
        for label, n in per_class.items():
            assert len(list((out / split / label).glob("*.jpeg"))) == n
    assert sorted(p.name for p in out.iterdir()) == [README_NAME, MARKER_NAME, "test", "train"]
    readme = (out / README_NAME).read_text(encoding="utf-8")
    assert "SYNTHETIC" in readme and "NOT real radiographs" in readme and "cxrscale" in readme
    marker = json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["synthetic"] is True and len(marker["files"]) == 120


def test_default_class_balance_is_one_to_three():
    # Planning names renders nothing, so the defaults are cheap to check.
    plan = plan_sample(60, 180, 0, ("train",))
    labels = Counter(item.label for item in plan)
    assert labels == {"NORMAL": 60, "PNEUMONIA": 180}


def test_kermany_names_and_multi_image_patients(sample):
    out, _ = sample
    patients_by_split = {}
    for split in SPLITS:
        normal = [p.name for p in (out / split / "NORMAL").iterdir()]
        pneu = [p.name for p in (out / split / "PNEUMONIA").iterdir()]
        assert all(NORMAL_RE.fullmatch(n) for n in normal), normal
        assert all(PNEUMONIA_RE.fullmatch(n) for n in pneu), pneu
        n_ids = Counter(NORMAL_RE.fullmatch(n).group(2) for n in normal)
        p_ids = Counter(PNEUMONIA_RE.fullmatch(n).group(1) for n in pneu)
        patients_by_split[split] = (set(n_ids), set(p_ids))
        if split == "train":
            # Several patients with more than one image, in both classes.
            assert sum(c > 1 for c in n_ids.values()) >= 2
            assert sum(c > 1 for c in p_ids.values()) >= 3
            assert max(p_ids.values()) == 3
            assert any(n.startswith("NORMAL2-") for n in normal)
            assert any(n.startswith("IM-") for n in normal)
            assert any(re.fullmatch(r".*-0001-0002\.jpeg", n) for n in normal)
            kinds = {PNEUMONIA_RE.fullmatch(n).group(2) for n in pneu}
            assert kinds == {"bacteria", "virus"}
            # One patient, one pneumonia kind.
            kind_of = {}
            for n in pneu:
                pid, kind = PNEUMONIA_RE.fullmatch(n).groups()
                assert kind_of.setdefault(pid, kind) == kind
    # No patient appears in both train and test.
    assert not patients_by_split["train"][0] & patients_by_split["test"][0]
    assert not patients_by_split["train"][1] & patients_by_split["test"][1]


def test_images_are_8bit_grey_jpeg_of_expected_size(sample):
    out, _ = sample
    for path in out.rglob("*.jpeg"):
        data = path.read_bytes()
        assert data[:2] == b"\xff\xd8"  # JPEG SOI
        assert b"SYNTHETIC cxrscale" in data[:200]  # COM segment near the start
        img = _read_grey(path)
        assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE)
        assert 10 < img.mean() < 245  # neither blank nor saturated


def test_two_runs_are_byte_identical(sample, tmp_path):
    out, _ = sample
    again = tmp_path / "again"
    generate_sample(again, N_NORMAL, N_PNEUMONIA, SIZE, SEED, SPLITS)
    assert _files(again) == _files(out)


def test_images_do_not_depend_on_count(sample, tmp_path):
    out, _ = sample
    small = tmp_path / "small"
    generate_sample(small, 5, 7, SIZE, SEED)
    small_files = {k: v for k, v in _files(small).items() if k.endswith(".jpeg")}
    big_files = _files(out)
    assert len(small_files) == 12
    for rel, data in small_files.items():
        assert big_files.get(rel) == data, rel


def test_render_radiograph_is_pure_and_sized():
    a = render_radiograph(np.random.default_rng(7), 96, True)
    b = render_radiograph(np.random.default_rng(7), 96, True)
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    assert np.array_equal(a, b)
    c = render_radiograph(np.random.default_rng(7), (100, 80), False)
    assert c.shape == (100, 80)
    with pytest.raises(ValueError):
        render_radiograph(np.random.default_rng(0), 96, True, pattern="fungal")


def test_aspect_jitter_gives_non_square_images(tmp_path):
    out = tmp_path / "jitter"
    generate_sample(out, 6, 6, 96, 1, aspect_jitter=True)
    shapes = [_read_grey(p).shape for p in out.rglob("*.jpeg")]
    assert all(max(s) == 96 for s in shapes)
    assert all(0.78 <= s[1] / s[0] <= 1.27 for s in shapes)
    assert any(s[0] != s[1] for s in shapes)


def test_lung_structure_separates_classes_but_brightness_does_not(sample):
    out, _ = sample
    labels, structure, brightness = [], [], []
    for label, y in (("NORMAL", 0), ("PNEUMONIA", 1)):
        for path in sorted((out / "train" / label).glob("*.jpeg")):
            img = _read_grey(path)
            labels.append(y)
            structure.append(_lung_structure(img))
            brightness.append(float(img.mean()))
    structure_auc = _auc(labels, structure)
    brightness_auc = _auc(labels, brightness)
    assert structure_auc > 0.8, structure_auc
    assert brightness_auc < 0.85, brightness_auc
    pos = np.mean([s for s, y in zip(structure, labels) if y])
    neg = np.mean([s for s, y in zip(structure, labels) if not y])
    assert pos > neg


def test_files_follow_the_documented_seeding(sample):
    # Image i of a class/split is rendered from image_rng(seed, split, label, i).
    out, _ = sample
    item = next(p for p in plan_sample(N_NORMAL, N_PNEUMONIA, SEED, SPLITS)
                if p.split == "train" and p.label == "NORMAL" and p.index == 0)
    expected = render_radiograph(image_rng(SEED, "train", "NORMAL", 0), SIZE, False)
    decoded = _read_grey(out / item.relpath)
    # JPEG is lossy; skip the top rows holding the burned-in "SYNTHETIC" label.
    diff = np.abs(expected[24:].astype(int) - decoded[24:].astype(int))
    assert diff.mean() < 2.0


def test_rerun_is_idempotent(sample):
    out, counts = sample
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert generate_sample(out, N_NORMAL, N_PNEUMONIA, SIZE, SEED, SPLITS) == counts
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_other_parameters_replace_a_previous_sample(tmp_path):
    out = tmp_path / "s"
    generate_sample(out, 4, 6, 64, 0, ("train", "test"))
    generate_sample(out, 3, 5, 64, 1)
    reference = tmp_path / "ref"
    generate_sample(reference, 3, 5, 64, 1)
    assert _files(out) == _files(reference)  # no stale files, no test/ left


def test_interrupted_run_is_completed(tmp_path):
    out = tmp_path / "s"
    generate_sample(out, 3, 4, 64, 0)
    expected = _files(out)
    (out / MARKER_NAME).unlink()  # as if killed before the marker was written
    next(iter((out / "train" / "PNEUMONIA").iterdir())).unlink()
    generate_sample(out, 3, 4, 64, 0)
    assert _files(out) == expected


def test_refuses_foreign_folder_and_keeps_its_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("do not delete")
    with pytest.raises(ValueError, match=re.escape(str(out))):
        generate_sample(out, 2, 2, 64, 0)
    assert _files(out) == {"notes.txt": b"do not delete"}


def test_refuses_sample_folder_with_foreign_file(tmp_path):
    out = tmp_path / "s"
    generate_sample(out, 2, 2, 64, 0)
    (out / "train" / "NORMAL" / "my_scan.jpeg").write_bytes(b"user data")
    with pytest.raises(ValueError, match="not a previous cxrscale sample"):
        generate_sample(out, 3, 3, 64, 0)
    assert (out / "train" / "NORMAL" / "my_scan.jpeg").read_bytes() == b"user data"


def test_bad_parameters_raise(tmp_path):
    target = tmp_path / "never-created"
    for kwargs in ({"n_normal": -1}, {"n_pneumonia": -2}, {"size": 63}, {"seed": -1},
                   {"splits": ("train", "holdout")}):
        with pytest.raises(ValueError):
            generate_sample(target, **kwargs)
    assert not target.exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "preprocessing.sample", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_cli_help():
    res = _run_cli("--help")
    assert res.returncode == 0
    for option in ("--output", "--normal", "--pneumonia", "--size", "--seed", "--with-test"):
        assert option in res.stdout
    assert "SYNTHETIC" in res.stdout


@pytest.mark.parametrize("args, option", [(("--normal", "-1"), "--normal"),
                                          (("--size", "32"), "--size")])
def test_cli_bad_argument_exits_2_with_one_line(tmp_path, args, option):
    res = _run_cli("--output", str(tmp_path / "x"), *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0]
    assert not (tmp_path / "x").exists()


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--output", str(out), "--normal", "2", "--pneumonia", "3",
                 "--size", "64", "--with-test"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert str(out) in lines[0] and "NORMAL=2" in lines[0] and "PNEUMONIA=3" in lines[0]
    assert (out / "test" / "NORMAL").is_dir() and (out / MARKER_NAME).is_file()


# --------------------------------------------------------------------------- #
# The multi-label sample
# --------------------------------------------------------------------------- #


def test_findings_sample_is_deterministic_idempotent_and_a_multilabel_csv(tmp_path):
    from preprocessing.sample import FINDINGS, FINDINGS_CSV, generate_findings_sample
    from preprocessing.sources import discover

    counts = generate_findings_sample(tmp_path / "a", 60, 96, seed=3)
    assert counts["images"] == 60 and all(0 < counts[f] < 60 for f in FINDINGS)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert generate_findings_sample(tmp_path / "a", 60, 96, seed=3) == counts  # same request: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()} == stamps
    generate_findings_sample(tmp_path / "b", 30, 96, seed=3)  # fewer images: the first 30 are the same files
    assert _files(tmp_path / "b")["images/00007.jpeg"] == _files(tmp_path / "a")["images/00007.jpeg"]
    found = discover(tmp_path / "a" / FINDINGS_CSV)
    assert found.multilabel and found.classes == list(FINDINGS)
    assert [sum(item.targets[k] for item in found.items) for k in range(4)] == [counts[f] for f in FINDINGS]
    assert len({item.patient_key for item in found.items}) == 30  # two images per patient
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("not a sample")
    with pytest.raises(ValueError, match="not a previous cxrscale sample"):
        generate_findings_sample(tmp_path / "c", 10, 96)

