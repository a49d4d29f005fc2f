"""Multi-label inputs: the label tables the public chest X-ray sets ship, read into `InputItem`s.

Three CSV forms, told apart by their header:
  NIH ChestX-ray14   `Image Index`, `Finding Labels` (findings joined by `|`, or `No Finding`), `Patient ID`,
                     `View Position`; the file names are looked up anywhere below the CSV's folder, as the NIH
                     download unpacks them into images_001/images/ ... images_012/images/
  one column per label  `path` and a column per label, valued 1 (positive), 0 (negative), -1 (uncertain) or
                     blank (not mentioned: negative), which is CheXpert's form (its `Sex`, `Age`,
                     `Frontal/Lateral` and `AP/PA` columns are metadata, and its patient is read from the path)
A CSV with a `label` column is the single-label form (`preprocessing.sources`).

Each item carries one target per label: 1 positive, 0 negative, -1 unknown. Unknown targets are masked out of
the loss and the metrics downstream; `--uncertain` says what an uncertain (-1) label becomes: `ignore` (unknown,
CheXpert's U-Ignore and TorchXRayVision's choice), `ones` (positive) or `zeros` (negative) (Irvin et al. 2019).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cxrscale.errors import CxrError

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
POSITIVE, NEGATIVE, UNKNOWN = 1, 0, -1
NO_FINDING = "No Finding"
NIH_COLUMNS = ("image index", "finding labels")
# columns of a one-column-per-label CSV that are never labels (CheXpert's metadata among them)
METADATA_COLUMNS = frozenset({"path", "patient", "split", "time", "source", "view", "sex", "age",
                              "frontal/lateral", "ap/pa"})
_CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)/", re.IGNORECASE)
_VALUES = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "": NEGATIVE,
           "-1": UNKNOWN, "-1.0": UNKNOWN}


def csv_form(header: list[str]) -> str:
    """'single-label', 'nih' or 'columns' from a CSV header (names compared in lower case)."""
    names = {h.strip().lower() for h in header}
    if "label" in names:
        return "single-label"
    if all(c in names for c in NIH_COLUMNS):
        return "nih"
    if "path" in names:
        return "columns"
    return "unknown"


BLANK_POLICIES = ("negative", "ignore")


def blank_target(policy: str) -> int:
    """What a blank label (not mentioned in the report, CheXpert) becomes under `policy`: negative, as the
    CheXpert labeller means it, or unknown (masked), as TorchXRayVision reads it."""
    if policy not in BLANK_POLICIES:
        raise CxrError(f"--blank must be one of {', '.join(BLANK_POLICIES)}, got {policy!r}")
    return {"negative": NEGATIVE, "ignore": UNKNOWN}[policy]


def uncertain_target(policy: str) -> int:
    """What an uncertain (-1) label becomes under `policy`."""
    if policy not in UNCERTAIN_POLICIES:
        raise CxrError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {policy!r}")
    return {"ignore": UNKNOWN, "ones": POSITIVE, "zeros": NEGATIVE}[policy]


def choose_labels(found: list[str], wanted: tuple[str, ...], source: str) -> list[str]:
    """The labels to keep: every one found, or those `--labels` names (in its order); unknown names are an error."""
    if not wanted:
        return found
    lower = {name.lower(): name for name in found}
    unknown = [w for w in wanted if w.lower() not in lower]
    if unknown:
        raise CxrError(f"--labels {', '.join(unknown)}: not a label of {source} (labels: {', '.join(found)})")
    return [lower[w.lower()] for w in wanted]


def nih_rows(csv_path: Path, option: str, rows: list[dict[str, str]],
             wanted: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    """(labels, rows) of an NIH table: each row as {"path", "rel", "targets", "patient", "view"}."""
    findings: set[str] = set()
    parsed = []
    for line, row in enumerate(rows, start=2):
        name = row.get("image index", "")
        text = row.get("finding labels", "")
        if not name or not text:
            raise CxrError(f"{option} {csv_path} line {line}: empty Image Index or Finding Labels")
        names = [f.strip() for f in text.split("|") if f.strip()]
        if NO_FINDING in names and len(names) > 1:
            raise CxrError(f"{option} {csv_path} line {line}: Finding Labels {text!r} joins {NO_FINDING} with "
                           "findings")
        positives = [f for f in names if f != NO_FINDING]
        findings.update(positives)
        parsed.append((line, name, positives, row))
    labels = choose_labels(sorted(findings), wanted, str(csv_path))
    located = _files_by_name(csv_path.parent, {name for _, name, _, _ in parsed})
    out = []
    for line, name, positives, row in parsed:
        where = located.get(name)
        if isinstance(where, list):
            raise CxrError(f"{option} {csv_path} line {line}: {name} is found in more than one place below "
                           f"{csv_path.parent}: {', '.join(str(p) for p in where[:3])}")
        path = where or csv_path.parent / name
        out.append({"path": str(path), "rel": name, "line": line,
                    "targets": tuple(POSITIVE if f in positives else NEGATIVE for f in labels),
                    "patient": row.get("patient id") or None, "view": row.get("view position") or None})
    return labels, out


def _files_by_name(root: Path, names: set[str]) -> dict[str, Path | list[Path]]:
    """Where each of `names` lies anywhere below `root` (a list when a name is found twice)."""
    found: dict[str, Path | list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename in names:
                path = Path(dirpath) / filename
                before = found.get(filename)
                found[filename] = path if before is None else [*(before if isinstance(before, list) else [before]),
                                                               path]
    return found


def column_rows(csv_path: Path, option: str, header: list[str], rows: list[dict[str, str]], wanted: tuple[str, ...],
                uncertain: str, blank: str = "negative") -> tuple[list[str], list[dict]]:
    """(labels, rows) of a one-column-per-label CSV (CheXpert's form among them); each row as {"path", "rel",
    "targets", "patient", "view", "split", "time", "source"}."""
    found = [h.strip() for h in header if h.strip() and h.strip().lower() not in METADATA_COLUMNS]
    if not found:
        raise CxrError(f"{option} {csv_path}: no label columns (header: {','.join(header)}); a multi-label CSV has "
                       "path and one column per label valued 1, 0, -1 (uncertain) or blank")
    labels = choose_labels(found, wanted, str(csv_path))
    as_uncertain, as_blank = uncertain_target(uncertain), blank_target(blank)
    root = csv_path.parent
    out = []
    for line, row in enumerate(rows, start=2):
        rel = row.get("path", "")
        if not rel:
            raise CxrError(f"{option} {csv_path} line {line}: empty path")
        targets = []
        for name in labels:
            value = row.get(name.lower(), "")
            if value not in _VALUES:
                raise CxrError(f"{option} {csv_path} line {line}: {name} = {value!r}; a label is 1, 0, -1 "
                               "(uncertain) or blank (not mentioned)")
            target = _VALUES[value]
            targets.append(as_blank if value == "" else as_uncertain if target == UNKNOWN else target)
        patient = row.get("patient") or _chexpert_patient(rel)
        out.append({"path": str(_resolve(root, rel)), "rel": rel, "line": line, "targets": tuple(targets),
                    "patient": patient, "view": row.get("view") or row.get("ap/pa") or None,
                    "split": row.get("split", ""), "time": row.get("time", ""), "source": row.get("source", "")})
    return labels, out


def _chexpert_patient(rel: str) -> str | None:
    match = _CHEXPERT_PATIENT.search(rel.replace("\\", "/"))
    return match.group(1).lower() if match else None


def _resolve(root: Path, rel: str) -> Path:
    """`rel` below the CSV's folder; CheXpert's paths start with the folder the CSV sits in
    (CheXpert-v1.0-small/train/...), so such a path is taken from the folder above."""
    if os.path.isabs(rel):
        return Path(rel)
    path = root / rel
    first = Path(rel).parts[0] if Path(rel).parts else ""
    if not path.exists() and first == root.name and (root.parent / rel).exists():
        return root.parent / rel
    return path


def read_list(path: str | Path, option: str) -> set[str]:
    """The names a split list gives (NIH's test_list.txt: one file name per line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CxrError(f"{option} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CxrError(f"{option} {path} cannot be read as a text list ({err})") from None
    names = {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    if not names:
        raise CxrError(f"{option} {path} lists no images")
    return names
