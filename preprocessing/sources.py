"""Finding the inputs: Kermany split folders, plain class folders, or a CSV list; patient keys from names.

Nothing here reads pixels. The result is a list of `InputItem`s in a deterministic order plus the
folder-level problems (empty class folders) that count as rejected inputs.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cxrscale.errors import CxrError
from preprocessing.schema import SPLITS

# Kermany file names carry the patient: person1372_bacteria_3501.jpeg, IM-0115-0001.jpeg,
# NORMAL2-IM-0007-0001.jpeg. NORMAL2-IM-n and IM-n are different patients (different series).
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
)
_SKIP_DIRS = {"__MACOSX"}


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
    the input does not say."""

    path: str
    rel: str
    label: int
    given_split: str | None
    patient_key: str | None
    time: str | None = None
    source: str | None = None


@dataclass
class Discovery:
    layout: str
    root: Path
    classes: list[str]
    items: list[InputItem]
    rejected: list[dict] = field(default_factory=list)  # folder-level: empty class folders
    ignored: list[str] = field(default_factory=list)    # not inputs: hidden files, stray files at the root

    def fingerprint(self) -> str:
        """Hash of every input's relative path, size and modification time: a changed input set changes it."""
        digest = hashlib.sha256()
        for item in self.items:
            try:
                st = os.stat(item.path)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            digest.update(f"{item.rel}\0{item.label}\0{item.given_split}\0{item.patient_key}\0{item.time}\0"
                          f"{item.source}\0{stamp}\n".encode())
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


def _from_folders(root: Path) -> Discovery:
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
        raise CxrError(f"--input {root} has no class folders: expected CLASS/* or train|val|test/CLASS/* "
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


def _from_csv(csv_path: Path) -> Discovery:
    root = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise CxrError(f"--input {csv_path}: the CSV header must have columns path,label[,patient][,split]"
                               "[,time][,source];"
                               f" missing {', '.join(missing)} (header: {','.join(header) or 'empty'})")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as err:
        raise CxrError(f"--input {csv_path} is not a UTF-8 CSV file ({err.reason})") from None

    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise CxrError(f"--input {csv_path} line {line}: empty path or label")
        split = row.get("split", "").lower()
        if split and split not in SPLITS:
            raise CxrError(f"--input {csv_path} line {line}: split {row['split']!r} is not one of "
                           f"{', '.join(SPLITS)} (or empty)")
        if row.get("time"):
            try:
                row["time"] = parse_time(row["time"])
            except ValueError:
                raise CxrError(f"--input {csv_path} line {line}: time {row['time']!r} is not a date or date-time "
                               "(ISO 8601 such as 2019-03-01 or 2019-03-01T14:05, or DICOM's 20190301)") from None
        if row["path"] in seen:
            raise CxrError(f"--input {csv_path} line {line}: path {row['path']} repeats line {seen[row['path']]}")
        seen[row["path"]] = line
    if not rows:
        raise CxrError(f"--input {csv_path} lists no images")

    classes = sorted({row["label"] for row in rows})
    items = []
    for row in rows:
        path = Path(row["path"]) if os.path.isabs(row["path"]) else root / row["path"]
        key = f"csv:{row['patient']}" if row.get("patient") else _name_key(path.name)
        items.append(InputItem(str(path), row["path"], classes.index(row["label"]),
                               row.get("split", "").lower() or None, key, row.get("time") or None,
                               row.get("source") or None))
    return Discovery("csv", root, classes, items)


def discover(input_path: str | Path) -> Discovery:
    """Find every input under a folder (Kermany split layout or CLASS/* folders) or listed in a CSV file.

    Raises `CxrError` when the path does not exist, or the layout or CSV is unusable, or fewer than two
    classes have any file.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise CxrError(f"--input {input_path} does not exist")
    if input_path.is_file():
        if input_path.suffix.lower() != ".csv":
            raise CxrError(f"--input {input_path} is a file but not a .csv list; pass a folder or a CSV")
        found = _from_csv(input_path)
    else:
        found = _from_folders(input_path)
    if len(found.classes) < 2:
        raise CxrError(f"--input {input_path} has {len(found.classes)} class(es) with files "
                       f"({', '.join(found.classes) or 'none'}); at least two are needed")
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
