"""Multi-label inputs end to end: NIH's and CheXpert's label tables and a plain one-column-per-label CSV, through
the real pipeline (real Ray, real OpenCV, real files) into version-2 shards read back with tf.data."""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from cxrscale.errors import CxrError
from preprocessing import schema
from preprocessing.config import PrepareConfig
from preprocessing.pipeline import prepare
from preprocessing.sources import discover
from tests.conftest import radiograph_like, shared_data_root, write_image

FINDINGS = ("Cardiomegaly", "Effusion", "Hernia")
NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def nih_folder(root: Path, n: int = 48) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """An NIH-style download: images spread over images_001/images and images_002/images, the table beside
    them, two images per patient; returns the table and each image's expected targets."""
    expected, rows = {}, []
    for i in range(n):
        name = f"{i // 2:08d}_{i % 2:03d}.png"
        write_image(root / f"images_00{1 + i % 2}" / "images" / name, radiograph_like(i, (120, 110)))
        positive = [f for k, f in enumerate(FINDINGS) if (i >> k) & 1 and (f != "Hernia" or i % 8 == 4)]
        expected[name] = tuple(int(f in positive) for f in FINDINGS)
        rows.append([name, "|".join(positive) or "No Finding", i % 2, i // 2, 50, "F", "AP" if i % 3 else "PA",
                     2500, 2048, 0.143, 0.143])
    table = root / "Data_Entry_2017.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(NIH_HEADER)
        writer.writerows(rows)
    return table, expected


def read_split(prepared: Path) -> list[dict]:
    with open(prepared / schema.SPLIT_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def test_nih_table_with_its_test_list_prepares_multi_hot_shards(tmp_path):
    table, expected = nih_folder(tmp_path / "nih")
    test_names = sorted(expected)[-8:]  # the last 4 patients, both images each
    (tmp_path / "test_list.txt").write_text("\n".join(test_names) + "\n")
    missing = tmp_path / "nih" / "images_001" / "images" / "00000003_000.png"
    missing.unlink()  # listed in the table, not downloaded: a rejected input, not a crash
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(str(table), str(out), size=32, workers=2, val_fraction=0.25, test_fraction=0,
                                     test_list=str(tmp_path / "test_list.txt")))
    assert manifest["schema_version"] == 2 and manifest["task"] == schema.MULTILABEL
    labels = ["Cardiomegaly", "Effusion", "Hernia"]
    assert manifest["classes"] == labels and manifest["positive_class"] is None
    counts = manifest["counts"]
    assert counts["inputs"] == 48 and counts["written"] + counts["rejected"] + counts["excluded"] == 48
    assert [r["input"] for r in manifest["rejected"]] == ["00000003_000.png"]
    assert manifest["split"]["test"] == "given by the input"
    rows = read_split(out)
    assert sorted(r["split"] for r in rows if r["split"] == "test") == ["test"] * 8
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in by_patient.values())  # no patient in two splits
    assert {r["view"] for r in rows} == {"AP", "PA"}
    # the manifest counts each label's positive images per split, as the shards hold them
    for split, row in counts["per_split"].items():
        targets = np.stack([y for _, y in schema.dataset(out, split).as_numpy_iterator()])
        assert targets.shape == (row["total"], 3) and set(np.unique(targets)) <= {0.0, 1.0}
        assert [row[name] for name in labels] == targets.sum(axis=0).astype(int).tolist()
        assert row["unknown"] == {name: 0 for name in labels}
    wanted = sorted(tuple(v) for k, v in expected.items() if k in test_names)
    got = sorted(tuple(int(t) for t in y) for _, y in schema.dataset(out, "test").as_numpy_iterator())
    assert got == wanted


def chexpert_folder(root: Path) -> Path:
    """CheXpert's layout: the CSV inside CheXpert-v1.0-small/, its paths starting with that folder's name."""
    base = root / "CheXpert-v1.0-small"
    values = ["1.0", "0.0", "-1.0", ""]
    rows = []
    for i in range(24):
        rel = f"CheXpert-v1.0-small/train/patient{i // 3:05d}/study1/view{i % 3 + 1}_frontal.jpg"
        write_image(root / rel, radiograph_like(200 + i, (110, 100)))
        rows.append([rel, "F", 60, "Frontal", "AP" if i % 2 else "PA", values[i % 4], values[(i + 1) % 4], "1.0"])
    table = base / "train.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Edema", "Pleural Effusion",
                         "Support Devices"])
        writer.writerows(rows)
    return table


@pytest.mark.parametrize("policy, uncertain", [("ignore", -1), ("ones", 1), ("zeros", 0)])
def test_chexpert_form_applies_the_uncertainty_policy(tmp_path, policy, uncertain):
    table = chexpert_folder(tmp_path)
    found = discover(table, uncertain=policy)
    assert found.multilabel and found.layout == "csv-columns"
    assert found.classes == ["Edema", "Pleural Effusion", "Support Devices"]  # metadata columns are not labels
    first = found.items[:4]
    assert [item.targets[0] for item in first] == [1, 0, uncertain, 0]  # blank: not mentioned, negative
    masked = discover(table, uncertain=policy, blank="ignore").items[:4]  # or unknown, as TorchXRayVision reads it
    assert [item.targets[0] for item in masked] == [1, 0, uncertain, -1]
    assert all(Path(item.path).is_file() for item in found.items)  # paths taken from the folder above the CSV
    assert first[0].patient_key == "csv:patient00000" and first[1].view == "AP"
    chosen = discover(table, labels=("pleural effusion", "Edema"))
    assert chosen.classes == ["Pleural Effusion", "Edema"] and chosen.items[0].targets == (0, 1)


def test_masked_labels_reach_the_shards_and_the_manifest(tmp_path):
    table = chexpert_folder(tmp_path)
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(str(table), str(out), size=32, workers=2, val_fraction=0.2, test_fraction=0.2,
                                     near_duplicate_distance=-1))
    assert manifest["labels"] == {"uncertain": "ignore", "blank": "negative"}
    total_unknown = sum(row["unknown"]["Edema"] for row in manifest["counts"]["per_split"].values())
    assert total_unknown == 6  # every 4th of 24 images is uncertain for Edema
    for split, row in manifest["counts"]["per_split"].items():
        targets = np.stack([y for _, y in schema.dataset(out, split).as_numpy_iterator()])
        assert (targets[:, 0] == -1).sum() == row["unknown"]["Edema"]
        assert (targets[:, 2] == 1).all()  # Support Devices: positive throughout
    rows = read_split(out)
    assert sum("Edema" in r["unknown"].split("|") for r in rows) == total_unknown


def test_bad_multilabel_inputs_are_named(tmp_path):
    table = chexpert_folder(tmp_path)
    text = table.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(text[:3] + [text[3].replace(",-1.0,", ",maybe,", 1)] + text[4:]) + "\n")
    with pytest.raises(CxrError, match=r"^--input .*bad.csv line 4: Edema = 'maybe'"):
        discover(bad)
    with pytest.raises(CxrError, match=r"^--labelled .*bad.csv line 4: Edema = 'maybe'"):
        discover(bad, option="--labelled")  # the option that gave the file, as distributed.adapt calls it
    with pytest.raises(CxrError, match=r"--labels Atelectasis: not a label of .*labels: Edema, Pleural Effusion"):
        discover(table, labels=("Atelectasis",))
    with pytest.raises(CxrError, match="--uncertain must be one of"):
        PrepareConfig(str(table), str(tmp_path / "o"), uncertain="maybe").validate()
    with pytest.raises(CxrError, match="--blank must be one of negative, ignore"):
        PrepareConfig(str(table), str(tmp_path / "o"), blank="zero").validate()
    nih, _ = nih_folder(tmp_path / "nih", n=4)
    lines = nih.read_text().splitlines()
    nih.write_text("\n".join(lines[:2] + [lines[2].replace("Cardiomegaly", "No Finding|Cardiomegaly")]) + "\n")
    with pytest.raises(CxrError, match=r"^--table .*line 3: Finding Labels 'No Finding\|Cardiomegaly' joins"):
        discover(nih, option="--table")
    (tmp_path / "list.txt").write_text("nothing_here.png\n")
    with pytest.raises(CxrError, match=r"--test-list .*list.txt: none of its 1 names is an input image"):
        discover(table, test_list=str(tmp_path / "list.txt"))
    with pytest.raises(CxrError, match="--labels chooses among the labels of a multi-label CSV"):
        discover(tmp_path / "nih" / "images_001", labels=("Edema",))


def test_plain_label_columns_and_a_gzipped_table(tmp_path):
    rows = [["path", "patient", "pneumothorax", "nodule"]]
    for i in range(12):
        write_image(tmp_path / "img" / f"{i}.png", radiograph_like(300 + i, (100, 100)))
        rows.append([f"img/{i}.png", f"p{i // 2}", i % 2, int(i % 3 == 0)])
    table = tmp_path / "labels.csv.gz"
    with gzip.open(table, "wt", newline="") as fh:
        csv.writer(fh).writerows(rows)
    found = discover(table)
    assert found.classes == ["pneumothorax", "nodule"]
    assert [item.targets for item in found.items[:3]] == [(0, 1), (1, 0), (0, 0)]
    assert found.items[2].patient_key == "csv:p1"


def test_the_real_nih_table_is_read_whole():
    """Labels only (no images here): the reader on the real 112,120 rows, as benchmarks.split measures it."""
    table = shared_data_root() / "nih-labels" / "Data_Entry_2017_v2020.csv.gz"
    if not table.is_file():
        import os

        message = f"the NIH label table is not at {table}; set CXR_SHARED_DATA to the shared data folder"
        if os.environ.get("CXR_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " [CXR_REQUIRE_SHARED_DATA=1]")
        pytest.skip(message)
    found = discover(table)
    assert len(found.items) == 112_120 and len({i.patient_key for i in found.items}) == 30_805
    assert len(found.classes) == 14 and "No Finding" not in found.classes
    positives = dict(zip(found.classes, np.array([i.targets for i in found.items]).sum(axis=0).tolist()))
    assert positives["Hernia"] == 227 and positives["Infiltration"] == 19_894
    assert {i.view for i in found.items} == {"PA", "AP"}
