"""The preprocessing stage end to end: real Ray, real OpenCV, real files, the real CLI."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrscale.errors import CxrError
from preprocessing import schema
from preprocessing.config import PrepareConfig
from preprocessing.pipeline import prepare
from preprocessing.records import keyed_hash
from preprocessing.sample import generate_sample
from preprocessing.transform import TransformParams, transform
from tests.conftest import PYTHON, REPO, radiograph_like, write_image
from tests.preprocessing.test_transform import write_dicom

SALT = b"0123456789abcdef-test-salt"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "preprocessing", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def salt_file(tmp_path) -> Path:
    path = tmp_path / "salt.bin"
    path.write_bytes(SALT)
    return path


@pytest.fixture()
def messy_folder(tmp_path) -> Path:
    """Class folders with good images and every kind of bad input planted among them."""
    root = tmp_path / "messy"
    for i in range(24):
        write_image(root / "NORMAL" / f"IM-{i:04d}-0001.png", radiograph_like(i))
    for i in range(36):
        write_image(root / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", radiograph_like(100 + i, bright_patch=True))
    pneu = root / "PNEUMONIA"
    shutil.copy(pneu / "person0_bacteria_0.jpeg", pneu / "person900_virus_1.jpeg")  # exact duplicate
    near = cv2.imdecode(cv2.imencode(".jpg", radiograph_like(101, bright_patch=True), [cv2.IMWRITE_JPEG_QUALITY, 60])[1], 0)
    write_image(pneu / "person901_virus_2.jpeg", cv2.resize(near, (520, 600)))  # near duplicate of person1
    good = (pneu / "person2_bacteria_2.jpeg").read_bytes()
    (pneu / "person950_bacteria_1.jpeg").write_bytes(good[:600] + np.random.default_rng(7).bytes(3000) + b"\xff\xd9")  # corrupt
    (pneu / "person951_bacteria_1.jpeg").write_bytes(good[: len(good) // 2])  # truncated
    (pneu / "person952_bacteria_1.jpeg").write_bytes(b"")  # zero bytes
    (pneu / "person953_bacteria_1.jpeg").write_text("not an image, just text\n" * 20)
    write_image(root / "NORMAL" / "IM-0900-0001.png", radiograph_like(900, (40, 200)))  # too small
    write_image(root / "NORMAL" / "IM-0901-0001.png", (radiograph_like(901).astype(np.uint16) * 200))  # 16-bit
    write_dicom(root / "NORMAL" / "scan-a.dcm", (4095 - radiograph_like(902).astype(np.uint16) * 16),
                "MONOCHROME1", patient="PAT-SECRET-7")
    write_dicom(root / "NORMAL" / "scan-b.dcm", (4095 - radiograph_like(903).astype(np.uint16) * 16),
                "MONOCHROME1", patient="PAT-SECRET-7")
    (root / "EMPTY").mkdir()
    (root / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    return root


def test_messy_folder_reconciles_and_audits(messy_folder, tmp_path, salt_file, ray_session):
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(str(messy_folder), str(out), size=96, workers=2, salt_file=str(salt_file)))
    counts = manifest["counts"]
    reasons = {r["input"]: r["reason"] for r in manifest["rejected"]}
    assert reasons == {
        "PNEUMONIA/person950_bacteria_1.jpeg": reasons["PNEUMONIA/person950_bacteria_1.jpeg"],
        "PNEUMONIA/person951_bacteria_1.jpeg": "corrupt or truncated JPEG: scan data ends without an end-of-image marker",
        "PNEUMONIA/person952_bacteria_1.jpeg": "empty file (0 bytes)",
        "PNEUMONIA/person953_bacteria_1.jpeg": "not a decodable image (unrecognised format or corrupt data)",
        "NORMAL/IM-0900-0001.png": "image too small: 200x40 px, the shorter side must be >= 64 px",
        "EMPTY/": "empty class folder",
    }
    assert "JPEG" in reasons["PNEUMONIA/person950_bacteria_1.jpeg"]
    assert counts["inputs"] == 24 + 36 + 2 + 4 + 1 + 1 + 2 + 1 == counts["written"] + counts["rejected"]
    assert counts["written"] == 24 + 36 + 2 + 1 + 2
    assert manifest["classes"] == ["NORMAL", "PNEUMONIA"]
    assert sum(s["records"] for s in manifest["shards"]) == counts["written"]
    for shard in manifest["shards"]:
        from cxrscale.files import sha256_file
        assert sha256_file(out / shard["file"]) == shard["sha256"]

    rows = list(csv.DictReader(open(out / schema.SPLIT_CSV)))
    assert len(rows) == counts["written"]
    split_of = {r["id"]: r["split"] for r in rows}
    patient_split: dict[str, set] = {}
    for r in rows:
        patient_split.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in patient_split.values()), "a patient straddles splits"

    audit = json.loads((out / schema.AUDIT).read_text())
    exact = [sorted(g["inputs"]) for g in audit["exact_duplicates"]]
    assert exact == [["PNEUMONIA/person0_bacteria_0.jpeg", "PNEUMONIA/person900_virus_1.jpeg"]]
    near = [sorted(g["inputs"]) for g in audit["near_duplicates"]]
    assert ["PNEUMONIA/person1_bacteria_1.jpeg", "PNEUMONIA/person901_virus_2.jpeg"] in near
    for group in audit["exact_duplicates"] + audit["near_duplicates"]:
        assert len({split_of[i] for i in group["ids"]}) == 1, "a duplicate group straddles splits"
    assert audit["patients"]["key_sources"]["dicom"] == 2

    # The two DICOMs share a PatientID: one patient hash, and no header value anywhere in the output.
    dicom_ids = {keyed_hash(SALT, "id", f"NORMAL/scan-{x}.dcm") for x in "ab"}
    assert len({r["patient"] for r in rows if r["id"] in dicom_ids}) == 1
    for path in out.iterdir():
        blob = path.read_bytes()
        assert b"PAT-SECRET" not in blob and b"Doe^Jane" not in blob, path.name

    # What the shards hold is exactly the transform of the file: no train/serve skew.
    wanted = keyed_hash(SALT, "id", "PNEUMONIA/person5_bacteria_5.jpeg")
    split = split_of[wanted]
    found = [img for img, _, rid in schema.dataset(out, split, with_ids=True).as_numpy_iterator()
             if rid.decode() == wanted]
    expected = transform((messy_folder / "PNEUMONIA/person5_bacteria_5.jpeg").read_bytes(),
                         TransformParams(size=96))
    np.testing.assert_array_equal(found[0], expected)
    total = sum(1 for split in manifest["counts"]["per_split"] for _ in schema.dataset(out, split))
    assert total == counts["written"]


def test_tasks_run_at_most_the_workers_asked_for_and_queue_ahead_with_the_whole_cluster(ray_session):
    """--workers below the cluster's CPUs caps how many stage tasks run at once, also on a Ray the caller
    started (this session's, 2 CPUs); with every CPU, the driver keeps two per CPU submitted, and Ray still
    runs only one per CPU (each asks for one)."""
    from preprocessing.pipeline import run_tasks, submitted_at_once

    assert [submitted_at_once(w) for w in (1, 2, 3, None)] == [1, 4, 4, 4]

    def busy(k: int) -> tuple[int, float, float]:
        import time as clock

        start = clock.time()
        clock.sleep(0.3)
        return k, start, clock.time()

    def most_at_once(intervals: list[tuple[int, float, float]]) -> int:
        edges = sorted([(s, 1) for _, s, _ in intervals] + [(e, -1) for _, _, e in intervals])
        running = peak = 0
        for _, step in edges:  # an end before a start at the same instant
            running += step
            peak = max(peak, running)
        return peak

    for in_flight, allowed in ((submitted_at_once(1), 1), (submitted_at_once(None), 2)):
        done: list = []
        run_tasks(busy, [(k,) for k in range(6)], in_flight, done.append)
        assert sorted(k for k, _, _ in done) == list(range(6))
        assert most_at_once(done) == allowed, (in_flight, done)


def test_rerun_is_a_no_op_and_other_arguments_need_overwrite(tmp_path, ray_session):
    sample = tmp_path / "sample"
    generate_sample(sample, n_normal=12, n_pneumonia=20, size=128)
    out = tmp_path / "prepared"
    first = prepare(PrepareConfig(str(sample), str(out), size=64))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(PrepareConfig(str(sample), str(out), size=64, workers=1))  # workers don't change output
    assert again["fingerprint"] == first["fingerprint"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(CxrError, match="--overwrite"):
        prepare(PrepareConfig(str(sample), str(out), size=80))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing lost
    replaced = prepare(PrepareConfig(str(sample), str(out), size=80, overwrite=True))
    assert replaced["image_shape"] == [80, 80, 1]


def test_kermany_layout_keeps_given_test_and_carves_val(tmp_path, ray_session):
    sample = tmp_path / "sample"
    generate_sample(sample, n_normal=30, n_pneumonia=60, size=128, splits=("train", "test"))
    given_test = len(list((sample / "test").rglob("*.jpeg")))
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(str(sample), str(out), size=64, val_fraction=0.2))
    per_split = manifest["counts"]["per_split"]
    assert manifest["source"]["layout"] == "kermany"
    assert per_split["test"]["total"] == given_test  # a given split is never changed
    assert 0.1 < per_split["val"]["total"] / (per_split["train"]["total"] + per_split["val"]["total"]) < 0.3
    assert manifest["split"]["given"] == ["test", "train"]


def overlapping_kermany_folder(root: Path) -> Path:
    """Kermany layout where patient IM-0001 has images in train and in the given test split, and a train
    image of patient IM-0002 is a byte copy of a test image of another patient (IM-0003)."""
    for i in range(8):
        write_image(root / "train" / "NORMAL" / f"IM-{10 + i:04d}-0001.jpeg", radiograph_like(i))
        write_image(root / "train" / "PNEUMONIA" / f"person{10 + i}_bacteria_{i}.jpeg",
                    radiograph_like(50 + i, bright_patch=True))
    write_image(root / "train" / "NORMAL" / "IM-0001-0001.jpeg", radiograph_like(200))
    write_image(root / "train" / "NORMAL" / "IM-0001-0002.jpeg", radiograph_like(201))
    write_image(root / "test" / "NORMAL" / "IM-0001-0003.jpeg", radiograph_like(202))
    write_image(root / "test" / "NORMAL" / "IM-0003-0001.jpeg", radiograph_like(203))
    shutil.copy(root / "test" / "NORMAL" / "IM-0003-0001.jpeg", root / "train" / "NORMAL" / "IM-0002-0001.jpeg")
    write_image(root / "test" / "PNEUMONIA" / "person1_virus_1.jpeg", radiograph_like(204, bright_patch=True))
    return root


def test_given_test_split_is_exact_and_overlapping_pool_images_are_excluded(tmp_path, ray_session):
    root = overlapping_kermany_folder(tmp_path / "kermany")
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(str(root), str(out), size=64, val_fraction=0.25, shards=2))
    counts = manifest["counts"]
    assert counts["per_split"]["test"]["total"] == 3
    assert counts["inputs"] == 22 == counts["written"] + counts["rejected"] + counts["excluded"]
    assert counts["excluded"] == 3
    assert manifest["excluded"] == [
        {"input": "train/NORMAL/IM-0001-0001.jpeg", "reason": "same patient as images of the given test split"},
        {"input": "train/NORMAL/IM-0001-0002.jpeg", "reason": "same patient as images of the given test split"},
        {"input": "train/NORMAL/IM-0002-0001.jpeg", "reason": "duplicate of an image of the given test split"}]
    assert manifest["warnings"] == []
    assert counts["per_split"]["train"]["total"] + counts["per_split"]["val"]["total"] == 16
    rows = list(csv.DictReader(open(out / schema.SPLIT_CSV)))
    assert len(rows) == counts["written"]
    test_ids = {r["id"] for r in rows if r["split"] == "test"}
    assert test_ids == {rid.decode() for _, _, rid in schema.dataset(out, "test", with_ids=True).as_numpy_iterator()}
    train_patients = {r["patient"] for r in rows if r["split"] != "test"}
    assert not train_patients & {r["patient"] for r in rows if r["split"] == "test"}
    audit = json.loads((out / schema.AUDIT).read_text())
    assert audit["given_split_overlap"] == {"policy": "exclude", "excluded": 3, "kept_in_train": 0}


def test_given_overlap_train_keeps_them_with_a_warning(tmp_path):
    root = overlapping_kermany_folder(tmp_path / "kermany")
    result = run_cli("--input", str(root), "--output", str(tmp_path / "prepared"), "--size", "64",
                     "--val-fraction", "0.25", "--shards", "2", "--given-overlap", "train", "--workers", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "prepared" / schema.MANIFEST).read_text())
    counts = manifest["counts"]
    assert counts["per_split"]["test"]["total"] == 3 and counts["excluded"] == 0
    assert counts["per_split"]["train"]["total"] + counts["per_split"]["val"]["total"] == 19
    assert manifest["split"]["given_overlap"] == "train"
    assert len(manifest["warnings"]) == 1 and "3 train images" in manifest["warnings"][0]
    assert "warning: --given-overlap train" in result.stdout


def test_csv_input(tmp_path, ray_session):
    rows = [("a/one.png", "cat", "p1", ""), ("a/two.png", "cat", "p1", ""), ("b/three.png", "dog", "p2", "test"),
            ("b/four.png", "dog", "p3", ""), ("a/five.png", "cat", "p4", "test"), ("missing.png", "dog", "p5", "")]
    for k, (path, *_) in enumerate(rows[:-1]):
        write_image(tmp_path / "imgs" / path, radiograph_like(300 + k))
    with open(tmp_path / "imgs" / "list.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient", "split"])
        writer.writerows(rows)
    manifest = prepare(PrepareConfig(str(tmp_path / "imgs" / "list.csv"), str(tmp_path / "out"), size=64,
                                     val_fraction=0.3))
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["rejected"] == [{"input": "missing.png", "reason": "file not found"}]
    assert manifest["counts"]["per_split"]["test"]["total"] == 2
    split = {r["id"]: r for r in csv.DictReader(open(tmp_path / "out" / schema.SPLIT_CSV))}
    assert len({r["split"] for r in split.values() if r["patient"] == list(split.values())[0]["patient"]}) == 1


def test_split_by_time_and_by_source(tmp_path, ray_session):
    """--split-by time holds out the patients first seen last (a CSV time column or the DICOM dates);
    --split-by source whole sources (a CSV column, or the folder below the class folder). Validation stays
    a random patient-grouped carve of the rest, and the manifest says how each split was made."""
    rows = []
    for k in range(24):  # 12 patients of 2 images each; patient p07 has a late second image
        patient = f"p{k // 2:02d}"
        path = tmp_path / "imgs" / f"{patient}-{k}.png"
        write_image(path, radiograph_like(400 + k))
        day = 1 + k // 2 if not (k == 15) else 28
        rows.append((path.name, "A" if k % 4 < 2 else "B", patient, f"2020-01-{day:02d}", f"site{k // 8}"))
    # one DICOM image: its StudyDate, not a column, gives its time
    write_dicom(tmp_path / "imgs" / "d.dcm", radiograph_like(500).astype(np.uint16) * 16, "MONOCHROME2",
                patient="P-D", StudyDate="20200131", StudyTime="0800")
    rows.append(("d.dcm", "A", "pd", "", "site2"))
    with open(tmp_path / "imgs" / "list.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "patient", "time", "source"), *rows])
    data = str(tmp_path / "imgs" / "list.csv")

    def patients_by_split(out: Path) -> dict[str, set[str]]:
        hashed = {keyed_hash(b"s" * 16, "patient", f"csv:{r[2]}"): r[2] for r in rows}
        found: dict[str, set[str]] = {}
        for r in csv.DictReader(open(out / schema.SPLIT_CSV)):
            found.setdefault(r["split"], set()).add(hashed[r["patient"]])
        return found

    (tmp_path / "salt").write_bytes(b"s" * 16)
    by_time = prepare(PrepareConfig(data, str(tmp_path / "t"), size=64, val_fraction=0.2, test_fraction=0.2,
                                    split_by="time", salt_file=str(tmp_path / "salt")))
    held = patients_by_split(tmp_path / "t")
    # the latest first-seen patients: the DICOM (Jan 31) and p11, p10 (days 12, 11) -- not p07, first seen day 8
    assert held["test"] == {"pd", "p11", "p10"} and not held["test"] & (held["train"] | held["val"])
    assert by_time["split"]["by"] == "time" and "latest" in by_time["split"]["test"]
    assert "2020" not in json.dumps(by_time) + (tmp_path / "t" / schema.SPLIT_CSV).read_text()  # dates stay out
    by_source = prepare(PrepareConfig(data, str(tmp_path / "s"), size=64, val_fraction=0.2, split_by="source",
                                      test_sources=("site1",), salt_file=str(tmp_path / "salt")))
    assert patients_by_split(tmp_path / "s")["test"] == {"p04", "p05", "p06", "p07"}
    assert by_source["split"]["test"] == "held out by source: every image from site1"
    with pytest.raises(CxrError, match="--test-sources site9: no such source"):
        prepare(PrepareConfig(data, str(tmp_path / "x"), size=64, split_by="source", test_sources=("site9",)))
    # folder sources: CLASS/SOURCE/file; a file directly in its class folder has none
    for k in range(12):
        write_image(tmp_path / "f" / ("A" if k % 2 else "B") / f"h{k % 3}" / f"x{k}.png", radiograph_like(600 + k))
    folders = prepare(PrepareConfig(str(tmp_path / "f"), str(tmp_path / "fo"), size=64, val_fraction=0.2,
                                    test_fraction=0.3, split_by="source"))
    assert folders["split"]["test"].startswith("held out by source: every image from h")
    write_image(tmp_path / "f" / "A" / "loose.png", radiograph_like(700))
    with pytest.raises(CxrError, match=r"--split-by source: 1 images have no source .*e.g. A/loose.png"):
        prepare(PrepareConfig(str(tmp_path / "f"), str(tmp_path / "fo2"), size=64, split_by="source"))


@pytest.mark.parametrize("args, message", [
    (["--input", "/nonexistent/folder", "--output", "OUT"], "--input /nonexistent/folder does not exist"),
    (["--input", "SAMPLE", "--output", "SAMPLE/prepared"], "is inside --input"),
    (["--input", "SAMPLE", "--output", "FILE/sub"], "is not writable"),
    (["--input", "SAMPLE", "--output", "OUT", "--val-fraction", "0.7", "--test-fraction", "0.4"], "sum < 1"),
    (["--input", "SAMPLE", "--output", "OUT", "--size", "8"], "size must be at least 32"),
    (["--input", "FILE", "--output", "OUT"], "not a .csv"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, args, message):
    generate_sample(tmp_path / "sample", n_normal=4, n_pneumonia=4, size=96)
    (tmp_path / "file.txt").write_text("x")
    swap = {"SAMPLE": str(tmp_path / "sample"), "OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "file.txt")}
    args = [a.replace(k, v) if a.startswith(k) else a for a in args for k, v in [next(
        ((k, v) for k, v in swap.items() if a.startswith(k)), ("", ""))]]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_nothing_usable_exits_2(tmp_path):
    for cls in ("A", "B"):
        (tmp_path / "bad" / cls).mkdir(parents=True)
        (tmp_path / "bad" / cls / "x.jpeg").write_bytes(b"")
    result = run_cli("--input", str(tmp_path / "bad"), "--output", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 2
    assert "no usable images" in result.stderr and "2 x empty file (0 bytes)" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "--resplit" in result.stdout and "examples:" in result.stdout


def shards_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tfrecord"))}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_shards(tmp_path, salt_file):
    """A run on Ray killed mid-way and resumed writes the bytes an uninterrupted run writes, and so does
    --workers 1, which runs in its own process without Ray."""
    sample = tmp_path / "sample"
    generate_sample(sample, n_normal=100, n_pneumonia=300, size=384)
    common = ["--input", str(sample), "--size", "128", "--salt-file", str(salt_file)]
    check = "import runpy, sys; runpy.run_module('preprocessing', run_name='__main__')"
    reference = subprocess.run([PYTHON, "-c", "import atexit, sys; atexit.register(lambda: print('ray' in sys.modules,"
                                " file=sys.stderr)); " + check, *common, "--workers", "1", "--output",
                                str(tmp_path / "reference")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    assert reference.stderr.strip().splitlines()[-1] == "False"  # Ray was never imported

    common += ["--workers", "2"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([PYTHON, "-m", "preprocessing", *common, "--output", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    chunks = out / ".cxrscale-staging" / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunks.glob("*.json"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(chunks.glob("*.json")))
    assert 3 <= done_before < 50, "the run was not killed mid-way"
    assert not (out / schema.MANIFEST).exists()

    resumed = run_cli(*common, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stderr
    assert shards_of(out) == shards_of(tmp_path / "reference")
    assert (out / schema.SPLIT_CSV).read_text() == (tmp_path / "reference" / schema.SPLIT_CSV).read_text()
    assert not (out / ".cxrscale-staging").exists()


@pytest.mark.slow
def test_real_radiographs_subset(shared_data, tmp_path, ray_session):
    """Real Kermany images: patient grouping holds and the dataset's own duplicates are found."""
    train = shared_data / "kermany224" / "train"
    normal = sorted((train / "NORMAL").glob("*.jpeg"))[:150]
    pneumonia = sorted((train / "PNEUMONIA").glob("*.jpeg"))
    dup_triple = [p for p in pneumonia if p.name.startswith("person1372_bacteria_35")]
    pneumonia = sorted(set(pneumonia[:350] + dup_triple))
    with open(tmp_path / "real.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([(str(p), p.parent.name) for p in normal + pneumonia])
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(str(tmp_path / "real.csv"), str(out), size=128, workers=2))
    assert manifest["counts"]["written"] == len(normal) + len(pneumonia)
    audit = json.loads((out / schema.AUDIT).read_text())
    groups = [sorted(Path(p).name for p in g["inputs"]) for g in audit["exact_duplicates"]]
    assert ["person1372_bacteria_3501.jpeg", "person1372_bacteria_3502.jpeg",
            "person1372_bacteria_3503.jpeg"] in groups
    assert audit["patients"]["key_sources"] == {"filename": manifest["counts"]["written"]}
    assert audit["patients"]["count"] < manifest["counts"]["written"]  # several images per patient exist
    rows = list(csv.DictReader(open(out / schema.SPLIT_CSV)))
    by_patient: dict[str, set] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    per_split = manifest["counts"]["per_split"]
    for split in ("val", "test"):
        ratio = per_split[split]["PNEUMONIA"] / per_split[split]["total"]
        assert abs(ratio - len(pneumonia) / (len(normal) + len(pneumonia))) < 0.08
