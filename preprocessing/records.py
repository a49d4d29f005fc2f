"""What the preparation driver knows about the accepted inputs (small metadata, never pixels): the record,
the split plan, and the salted id and patient hashes that stand for names in every output."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass

import numpy as np

from preprocessing.sources import InputItem

HASH_CHARS = 24


def keyed_hash(salt: bytes, kind: str, value: str) -> str:
    """Salted, keyed hash of an identifier: stable for a given salt, not reversible without it."""
    return hmac.new(salt, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:HASH_CHARS]


@dataclass
class Record:
    """An accepted input, as the driver sees it (small metadata only)."""

    item: InputItem
    chunk: int
    row: int
    digest: str
    phash: list[int]
    shape: tuple[int, int]
    fmt: str
    patient_key: str
    patient_source: str
    modality: str | None = None   # DICOM codes (preprocessing.dicom); None for JPEG/PNG
    view: str | None = None
    burned_in: str | None = None
    transfer_syntax: str | None = None
    acquired: str | None = None   # DICOM acquisition time (YYYYMMDDHHMMSS) for --split-by time; never written


@dataclass
class SplitPlan:
    records: list[Record]
    splits: np.ndarray          # split name per record
    groups: np.ndarray          # group label per record
    exact_groups: list[list[int]]
    near_pairs: list[tuple[int, int, int]]
    excluded: dict[int, str]    # pool record -> why it is in no split (it overlaps a given held-out split)
    kept_overlap: int           # pool records overlapping a given held-out split kept in train (--given-overlap train)
    leaks: list[int]            # groups that straddle splits
    test_origin: str = ""       # how the test split was made, in words (manifest.json's split.test)


@dataclass(frozen=True)
class RecordHashes:
    """The salted id and patient hash of each accepted record, computed once (index = record index)."""

    ids: list[str]
    patients: list[str]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
