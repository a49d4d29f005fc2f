"""Finding the inputs: Kermany split folders, plain class folders, or a CSV list; patient keys from names.

Nothing here reads pixels. The result is a list of `InputItem`s in a deterministic order plus the
folder-level problems (empty class folders) that count as rejected inputs.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cxrscale.errors import CxrError
from preprocessing import multilabel
from preprocessing.schema import SPLITS

# Kermany file names carry the patient: person1372_bacteria_3501.jpeg, IM-0115-0001.jpeg,
# NORMAL2-IM-0007-0001.jpeg. NORMAL2-IM-n and IM-n are different patients (different series).
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
)
_SKIP_DIRS = {"__MACOSX"}
log = logging.getLogger("cxrscale.preprocessing")


def patient_from_name(filename: str) -> str | None:
    """Patient key from a Kermany file name ('person12_virus_3.jpeg' -> 'person12'), or None."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(filename)
        if match:
            return match.group(1).lower()
    return None


@dataclass(frozen=True)
class InputItem:
    """One input file. rel: path relative to the input root (for messages); given_split: the split the
    input layout assigned, or None; patient_key: namespaced raw key ('name:person1', 'csv:17') or None
    when only the file itself (or its DICOM header, read later) can tell. time: when it was acquired
    (YYYYMMDDHHMMSS, from a CSV `time` column; else the DICOM header, read later) and source: where it comes
    from (a CSV `source` column, or the folder right below its class folder), for --split-by; None when
    the input does not say. targets: a multi-label input's target per label (1, 0, or -1 unknown:
    `preprocessing.multilabel`), with label -1; None for a single-label input. view: the view position a CSV
    gives (NIH's `View Position`, CheXpert's `AP/PA`), or None."""

    path: str
    rel: str
    label: int
    given_split: str | None
    patient_key: str | None
    time: str | None = None
    source: str | None = None
    targets: tuple[int, ...] | None = None
    view: str | None = None


@dataclass
class Discovery:
    """layout: "kermany", "class-folders", "csv", "nih" or "csv-columns". classes: the class names, or a
    multi-label input's label names (`multilabel`)."""

    layout: str
    root: Path
    classes: list[str]
    items: list[InputItem]
    rejected: list[dict] = field(default_factory=list)  # folder-level: empty class folders
    ignored: list[str] = field(default_factory=list)    # not inputs: hidden files, stray files at the root
    multilabel: bool = False

    def fingerprint(self) -> str:
        """Hash of every input's relative path, size and modification time: a changed input set changes it."""
        digest = hashlib.sha256()
        for item in self.items:
            try:
                st = os.stat(item.path)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            # multi-label targets and a CSV's view only when present: a single-label input keeps the
            # fingerprint older versions gave it, so their prepared folders still resume
            extra = "".join(f"{v}\0" for v in (item.targets, item.view) if v is not None)
            digest.update(f"{item.rel}\0{item.label}\0{item.given_split}\0{item.patient_key}\0{item.time}\0"
                          f"{item.source}\0{extra}{stamp}\n".encode())
        for entry in self.rejected:
            digest.update(f"rejected\0{entry['input']}\n".encode())
        return digest.hexdigest()


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in _SKIP_DIRS


def _files_under(folder: Path) -> list[Path]:
    """Every non-hidden regular file below `folder` (recursively), sorted for a deterministic order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _visible(f))
    return found


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def _from_folders(root: Path, option: str) -> Discovery:
    split_dirs = {p.name.lower(): p for p in _subdirs(root) if p.name.lower() in SPLITS}
    if split_dirs:
        layout = "kermany"
        class_parents = [(split, split_dirs[split]) for split in SPLITS if split in split_dirs]
        ignored = [p.name + "/" for p in _subdirs(root) if p.name.lower() not in SPLITS]
    else:
        layout = "class-folders"
        class_parents = [(None, root)]
        ignored = []
    ignored += [p.name for p in sorted(root.iterdir()) if p.is_file()]

    files_by_class: dict[str, list[tuple[str | None, Path, Path]]] = {}
    rejected = []
    for split, parent in class_parents:
        for class_dir in _subdirs(parent):
            files = _files_under(class_dir)
            if not files:
                rejected.append({"input": class_dir.relative_to(root).as_posix() + "/",
                                 "reason": "empty class folder"})
            files_by_class.setdefault(class_dir.name, []).extend((split, f, class_dir) for f in files)
        ignored += [f"{p.relative_to(root).as_posix()}" for p in sorted(parent.iterdir())
                    if parent is not root and p.is_file()]

    classes = sorted(name for name, files in files_by_class.items() if files)
    items = [InputItem(str(path), path.relative_to(root).as_posix(), classes.index(name), split,
                       _name_key(path.name), source=_folder_source(path, class_dir))
             for name in classes for split, path, class_dir in files_by_class[name]]
    if not files_by_class:
        raise CxrError(f"{option} {root} has no class folders: expected CLASS/* or train|val|test/CLASS/* "
                       "(or pass a CSV file with path,label columns)")
    return Discovery(layout, root, classes, items, rejected, ignored)


def _folder_source(path: Path, class_dir: Path) -> str | None:
    """The folder right below the class folder (CLASS/SOURCE/.../file), or None for a file directly in it."""
    parts = path.relative_to(class_dir).parts
    return parts[0] if len(parts) > 1 else None


def _name_key(filename: str) -> str | None:
    key = patient_from_name(filename)
    return f"name:{key}" if key else None


def parse_time(text: str) -> str:
    """An ISO 8601 date or date-time, or a DICOM DA/DT value -> sortable YYYYMMDDHHMMSS; ValueError if neither.
    A time zone is dropped: the images of one site share it."""
    import datetime

    text = text.strip()
    if re.fullmatch(r"\d{8}(\d{2,6}(\.\d+)?)?", text):  # DICOM DA or DT
        digits = text.split(".")[0]
        return datetime.datetime.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S").strftime("%Y%m%d%H%M%S")
    return datetime.datetime.fromisoformat(text).strftime("%Y%m%d%H%M%S")


def _read_csv(csv_path: Path, option: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header as written, rows keyed by lower-case column name with stripped values); a .csv.gz is read too."""
    import gzip

    opener = gzip.open if csv_path.suffix.lower() == ".gz" else open
    try:
        with opener(csv_path, "rt", newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as err:
        raise CxrError(f"{option} {csv_path} is not a UTF-8 CSV file ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise CxrError(f"{option} {csv_path} cannot be read ({err})") from None
    if not rows:
        raise CxrError(f"{option} {csv_path} lists no images")
    return header, rows


def _from_csv(csv_path: Path, option: str, uncertain: str, labels: tuple[str, ...],
              blank: str = "negative") -> Discovery:
    header, rows = _read_csv(csv_path, option)
    form = multilabel.csv_form(header)
    if form == "unknown":
        lower = [h.lower() for h in header]
        missing = [c for c in ("path", "label") if c not in lower]
        raise CxrError(f"{option} {csv_path}: the CSV header must have columns path,label[,patient][,split]"
                       "[,time][,source] (one label per image), path and one column per label (multi-label), "
                       f"or NIH's Image Index,Finding Labels; missing {', '.join(missing)} "
                       f"(header: {','.join(header) or 'empty'})")
    if form != "single-label":
        return _multilabel_csv(csv_path, option, form, header, rows, uncertain, labels, blank)
    if labels:
        raise CxrError(f"--labels chooses among the labels of a multi-label CSV; {csv_path} has one label per image")
    root = csv_path.parent
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise CxrError(f"{option} {csv_path} line {line}: empty path or label")
    _check_rows(csv_path, option, rows)
    classes = sorted({row["label"] for row in rows})
    items = []
    for row in rows:
        path = Path(row["path"]) if os.path.isabs(row["path"]) else root / row["path"]
        key = f"csv:{row['patient']}" if row.get("patient") else _name_key(path.name)
        items.append(InputItem(str(path), row["path"], classes.index(row["label"]),
                               row.get("split", "").lower() or None, key, row.get("time") or None,
                               row.get("source") or None, view=row.get("view") or None))
    return Discovery("csv", root, classes, items, ignored=_sample_marker(root))


def _sample_marker(root: Path) -> list[str]:
    """The built-in sample's marker file beside a CSV, as an ignored file: it is how the manifest, and so the
    model card, know the images are synthetic (a folder input lists its stray files the same way)."""
    from preprocessing.sample.folder import MARKER_NAME

    return [MARKER_NAME] if (root / MARKER_NAME).is_file() else []


def _check_rows(csv_path: Path, option: str, rows: list[dict[str, str]], path_key: str = "path") -> None:
    """Every row's split and time are valid (times made sortable, in place) and no path repeats."""
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        split = row.get("split", "").lower()
        if split and split not in SPLITS:
            raise CxrError(f"{option} {csv_path} line {line}: split {row['split']!r} is not one of "
                           f"{', '.join(SPLITS)} (or empty)")
        if row.get("time"):
            try:
                row["time"] = parse_time(row["time"])
            except ValueError:
                raise CxrError(f"{option} {csv_path} line {line}: time {row['time']!r} is not a date or date-time "
                               "(ISO 8601 such as 2019-03-01 or 2019-03-01T14:05, or DICOM's 20190301)") from None
        if row[path_key] in seen:
            raise CxrError(f"{option} {csv_path} line {line}: path {row[path_key]} repeats line {seen[row[path_key]]}")
        seen[row[path_key]] = line


def _multilabel_csv(csv_path: Path, option: str, form: str, header: list[str], rows: list[dict[str, str]],
                    uncertain: str, wanted: tuple[str, ...], blank: str = "negative") -> Discovery:
    if form == "nih":
        _check_rows(csv_path, option, rows, "image index")
        labels, parsed = multilabel.nih_rows(csv_path, option, rows, wanted)
    else:
        _check_rows(csv_path, option, rows)
        labels, parsed = multilabel.column_rows(csv_path, option, header, rows, wanted, uncertain, blank)
    items = []
    for row in parsed:
        key = f"csv:{row['patient']}" if row["patient"] else _name_key(Path(row["path"]).name)
        items.append(InputItem(row["path"], row["rel"], -1, row.get("split", "").lower() or None, key,
                               row.get("time") or None, row.get("source") or None, row["targets"],
                               (row["view"] or "").upper() or None))
    positives = [sum(item.targets[k] == multilabel.POSITIVE for item in items) for k in range(len(labels))]
    if not any(positives):
        raise CxrError(f"{option} {csv_path}: no image is positive for any of {', '.join(labels)}")
    return Discovery("nih" if form == "nih" else "csv-columns", csv_path.parent, labels, items,
                     ignored=_sample_marker(csv_path.parent), multilabel=True)


def _given_test(found: Discovery, test_list: str) -> None:
    """Put the items a split list names (by file name or by the path the input gives) in the test split, in
    place; NIH publishes its official test split as such a list (test_list.txt)."""
    names = multilabel.read_list(test_list, "--test-list")
    matched = set()
    for k, item in enumerate(found.items):
        name = next((n for n in (item.rel, Path(item.rel).name) if n in names), None)
        if name is None:
            continue
        if item.given_split not in (None, "test"):
            raise CxrError(f"--test-list {test_list} names {name}, which the input already puts in its "
                           f"{item.given_split} split")
        found.items[k] = dataclasses.replace(item, given_split="test")
        matched.add(name)
    if not matched:
        raise CxrError(f"--test-list {test_list}: none of its {len(names)} names is an input image "
                       "(names are file names or the paths the input lists)")
    if len(matched) < len(names):
        log.warning("--test-list %s: %d of its %d names are not among the inputs", test_list,
                    len(names) - len(matched), len(names))


def discover(input_path: str | Path, *, option: str = "--input", uncertain: str = "ignore",
             labels: tuple[str, ...] = (), test_list: str | None = None, blank: str = "negative") -> Discovery:
    """Find every input under a folder (Kermany split layout or CLASS/* folders) or listed in a CSV file
    (one label per image, or multi-label: `preprocessing.multilabel`). option: the command-line option that
    gave the path, named in every error (--input, --labelled, --external, ...); uncertain, blank, labels: a
    multi-label CSV's policies for uncertain and blank labels and the labels to keep; test_list: a file naming
    the images of a given test split.

    Raises `CxrError` when the path does not exist, or the layout or CSV is unusable, or fewer than two
    classes (a multi-label input: no label) have any file.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise CxrError(f"{option} {input_path} does not exist")
    if input_path.is_file():
        if not input_path.name.lower().endswith((".csv", ".csv.gz")):
            raise CxrError(f"{option} {input_path} is a file but not a .csv list; pass a folder or a CSV")
        found = _from_csv(input_path, option, uncertain, labels, blank)
    else:
        if labels:
            raise CxrError("--labels chooses among the labels of a multi-label CSV; class folders have one label "
                           "per image")
        found = _from_folders(input_path, option)
    if not found.multilabel and len(found.classes) < 2:
        raise CxrError(f"{option} {input_path} has {len(found.classes)} class(es) with files "
                       f"({', '.join(found.classes) or 'none'}); at least two are needed")
    if test_list:
        _given_test(found, test_list)
    return found


def patient_subset_csv(root: str | Path, out: str | Path, n_images: int, seed: int = 0) -> Path:
    """Write a CSV input (path,label) of whole patients drawn at random from CLASS/*.jpeg folders under root,
    about n_images images: a smaller dataset that keeps every patient's images together."""
    import random

    by_patient: dict[str, list[Path]] = {}
    for path in sorted(Path(root).glob("*/*.jpeg")):
        by_patient.setdefault(patient_from_name(path.name) or path.name, []).append(path)
    keys = sorted(by_patient)
    random.Random(seed).shuffle(keys)
    chosen: list[Path] = []
    for key in keys:
        if len(chosen) >= n_images:
            break
        chosen += by_patient[key]
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([(str(p.resolve()), p.parent.name) for p in chosen])
    return Path(out)
