"""The files that describe a prepared dataset beside its shards: split.csv, audit.json and, last (its
presence means a finished dataset), manifest.json."""
from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cxrscale.files import write_json_atomic, write_text_atomic
from cxrscale.provenance import library_versions
from preprocessing import schema
from preprocessing.config import PrepareConfig
from preprocessing.records import RecordHashes, SplitPlan, keyed_hash, utc_now
from preprocessing.sources import Discovery
from preprocessing.transform import TransformParams


def write_description(output: Path, discovery: Discovery, config: PrepareConfig, params: TransformParams,
            fingerprint: str, salt_source: str, plan: SplitPlan, hashes: RecordHashes, shards: list[dict],
            shard_files: list[str], rejected: list[dict],
            salt: bytes) -> dict:
    """The three files that describe the written shards: split.csv, audit.json and, last (its presence
    means a finished dataset), manifest.json, which it returns."""
    shown = (lambda rel: keyed_hash(salt, "id", rel)) if config.redact_paths else (lambda rel: rel)
    per_split = (_label_counts(plan, discovery.classes) if discovery.multilabel
                 else _class_counts(plan, discovery.classes))
    _write_split_csv(output, plan, hashes, shard_files, discovery.classes)
    near_components = _write_audit(output, plan, hashes, config, per_split, shown)
    return _write_manifest(output, discovery, config, params, fingerprint, salt_source, plan, shards, rejected,
                           per_split, len(near_components), shown)


def _class_counts(plan: SplitPlan, classes: list[str]) -> dict[str, dict[str, int]]:
    """{split: {class name: count, "total": n}} of the records written to each split."""
    per_split: dict[str, dict[str, int]] = {}
    for split in schema.SPLITS:
        labels = [r.item.label for r, s in zip(plan.records, plan.splits) if s == split]
        if labels:
            counts = Counter(labels)
            per_split[split] = {name: counts.get(i, 0) for i, name in enumerate(classes)}
            per_split[split]["total"] = len(labels)
    return per_split


def _label_counts(plan: SplitPlan, labels: list[str]) -> dict[str, dict[str, int]]:
    """A multi-label dataset's {split: {label: positive images, "total": n, "unknown": {label: images whose
    label is unknown}}} of the records written to each split."""
    per_split: dict[str, dict] = {}
    for split in schema.SPLITS:
        targets = np.array([r.item.targets for r, s in zip(plan.records, plan.splits) if s == split])
        if len(targets):
            per_split[split] = {name: int((targets[:, k] == 1).sum()) for k, name in enumerate(labels)}
            per_split[split]["total"] = len(targets)
            per_split[split]["unknown"] = {name: int((targets[:, k] < 0).sum()) for k, name in enumerate(labels)}
    return per_split


def _write_split_csv(output: Path, plan: SplitPlan, hashes: RecordHashes, shard_files: list[str],
                     classes: list[str]) -> None:
    """split.csv: one row per written record (id and patient hashes, split, label and class, or a multi-label
    record's positive and unknown labels joined by |, shard, view position from the DICOM header or the CSV;
    empty when neither gives one), by split."""
    records = plan.records
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    multilabel = bool(records) and records[0].item.targets is not None
    writer.writerow(["id", "patient", "split", *(("positive", "unknown") if multilabel else ("label", "class")),
                     "shard", "view"])
    written = [k for k in range(len(records)) if plan.splits[k] in schema.SPLITS]
    order = sorted(written, key=lambda k: (schema.SPLITS.index(plan.splits[k]), records[k].item.rel))
    for k in order:
        item = records[k].item
        if multilabel:
            label = ["|".join(c for c, t in zip(classes, item.targets) if t == want) for want in (1, -1)]
        else:
            label = [item.label, classes[item.label]]
        writer.writerow([hashes.ids[k], hashes.patients[k], plan.splits[k], *label, shard_files[k],
                         records[k].view or item.view or ""])
    write_text_atomic(output / schema.SPLIT_CSV, lines.getvalue())


def _write_audit(output: Path, plan: SplitPlan, hashes: RecordHashes, config: PrepareConfig,
                 per_split: dict, shown: Callable[[str], str]) -> dict[int, set[int]]:
    """audit.json: duplicates, class balance, patients, groups, overlaps with given splits, input formats
    and sizes. Returns the near-duplicate groups (group id -> record indices)."""
    records = plan.records

    def describe(indices: Iterable[int]) -> dict:
        idx = list(indices)
        return {"inputs": [shown(records[i].item.rel) for i in idx],
                "ids": [hashes.ids[i] for i in idx],
                "splits": sorted({str(plan.splits[i]) for i in idx})}

    near_components: dict[int, set[int]] = {}
    exact_members = {i for g in plan.exact_groups for i in g}
    for i, j, _ in plan.near_pairs:
        if i in exact_members and j in exact_members and records[i].digest == records[j].digest:
            continue
        near_components.setdefault(int(plan.groups[i]), set()).update((i, j))
    shapes = np.array([r.shape for r in records])
    group_sizes = Counter(plan.groups.tolist())
    patients = Counter(r.patient_key for r in records)
    audit_doc = {
        "exact_duplicates": [describe(g) for g in plan.exact_groups],
        "near_duplicates": [describe(sorted(g)) | {"max_hamming_distance": max(
            d for i, j, d in plan.near_pairs if i in g and j in g)} for g in near_components.values()],
        "near_duplicate_rule": f"256-bit DCT perceptual hash, Hamming distance <= {config.near_duplicate_distance}",
        "class_balance": per_split,
        "patients": {"count": len(patients), "max_images_per_patient": max(patients.values()),
                     "key_sources": dict(Counter(r.patient_source for r in records))},
        "groups_kept_together": {"count": len(group_sizes),
                                 "largest": max(group_sizes.values())},
        "given_split_overlap": {"policy": config.given_overlap, "excluded": len(plan.excluded),
                                "kept_in_train": plan.kept_overlap},
        "given_split_leaks": [describe(np.flatnonzero(plan.groups == g).tolist()) for g in plan.leaks],
        "input_formats": dict(Counter(r.fmt for r in records)),
        "dicom": _dicom_counts(plan),
        "input_sizes_px": {dim: {"min": int(shapes[:, k].min()), "median": float(np.median(shapes[:, k])),
                                 "max": int(shapes[:, k].max())} for k, dim in enumerate(("height", "width"))},
    }
    write_json_atomic(output / schema.AUDIT, audit_doc)
    return near_components


def _dicom_counts(plan: SplitPlan) -> dict:
    """What the accepted DICOMs' headers say, counted: modality, view position (per split too), burnt-in
    annotation and transfer syntax. Codes only (preprocessing.dicom never passes on free text)."""
    dicoms = [(r, str(s)) for r, s in zip(plan.records, plan.splits) if r.fmt == "dicom"]
    views_per_split: dict[str, dict[str, int]] = {}
    for split in schema.SPLITS:
        counts = Counter(r.view for r, s in dicoms if s == split)
        if counts:
            views_per_split[split] = dict(sorted(counts.items()))
    return {"images": len(dicoms),
            "modalities": dict(sorted(Counter(r.modality for r, _ in dicoms).items())),
            "views": dict(sorted(Counter(r.view for r, _ in dicoms).items())),
            "views_per_split": views_per_split,
            "burned_in_annotation": dict(sorted(Counter(r.burned_in for r, _ in dicoms).items())),
            "transfer_syntaxes": dict(sorted(Counter(r.transfer_syntax for r, _ in dicoms).items()))}


def _write_manifest(output: Path, discovery: Discovery, config: PrepareConfig, params: TransformParams,
                    fingerprint: str, salt_source: str, plan: SplitPlan, shards: list[dict], rejected: list[dict],
                    per_split: dict, near_groups: int, shown: Callable[[str], str]) -> dict:
    """manifest.json, the prepared dataset's contract (preprocessing.schema reads it); checks that every
    input is accounted for (inputs = written + rejected + excluded) before writing it."""
    records, classes = plan.records, discovery.classes
    n_inputs = len(discovery.items) + len(discovery.rejected)
    n_written = len(records) - len(plan.excluded)
    warnings = []
    if plan.kept_overlap:
        warnings.append(f"--given-overlap train: {plan.kept_overlap} train images share a patient or duplicate "
                        "group with a given held-out split; metrics on that split are optimistic")
    multilabel = discovery.multilabel
    manifest = {
        "schema_version": schema.MULTILABEL_SCHEMA_VERSION if multilabel else schema.SCHEMA_VERSION,
        "task": schema.MULTILABEL if multilabel else "single-label",
        "created": utc_now(),
        "fingerprint": fingerprint,
        "libraries": library_versions(("cxrscale", "numpy", "opencv-python-headless", "pydicom", "ray")),
        "source": {"layout": discovery.layout, "inputs": n_inputs, "ignored": [shown(p) for p in discovery.ignored]},
        "classes": classes,
        "class_indices": {name: i for i, name in enumerate(classes)},
        "positive_class": classes[1] if len(classes) == 2 and not multilabel else None,
        **({"labels": {"uncertain": config.uncertain, "blank": config.blank}} if multilabel else {}),
        "image_shape": [params.size, params.size, 1],
        "dtype": "uint8",
        "transform": params.to_dict(),
        "split": {"val_fraction": config.val_fraction, "test_fraction": config.test_fraction,
                  "resplit": config.resplit, "seed": config.seed,
                  "given": sorted({r.item.given_split for r in records if r.item.given_split}),
                  "given_overlap": config.given_overlap,
                  "grouped_by": "patient and duplicate group", "id_salt": salt_source,
                  "by": config.split_by, "test": plan.test_origin,
                  "val": "given by the input" if "val" in {r.item.given_split for r in records if r.item.given_split}
                         and not config.resplit else "carved at random from the pool, grouped by patient"},
        "audit": {"exact_duplicate_groups": len(plan.exact_groups), "near_duplicate_groups": near_groups,
                  "near_duplicate_distance": config.near_duplicate_distance, "given_split_leaks": len(plan.leaks)},
        "counts": {"inputs": n_inputs, "written": n_written, "rejected": len(rejected),
                   "excluded": len(plan.excluded), "per_split": per_split},
        "shards": shards,
        "rejected": [{"input": shown(r["input"]), "reason": r["reason"]} for r in rejected],
        "excluded": [{"input": shown(records[k].item.rel), "reason": why} for k, why in sorted(
            plan.excluded.items(), key=lambda kv: records[kv[0]].item.rel)],
        "warnings": warnings,
    }
    counts = manifest["counts"]
    if counts["inputs"] != counts["written"] + counts["rejected"] + counts["excluded"]:
        raise AssertionError("inputs != written + rejected + excluded: a bug in cxrscale, please report it")
    write_json_atomic(output / schema.MANIFEST, manifest)
    return manifest
