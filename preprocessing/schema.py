"""The prepared-dataset contract: the one module that writes and reads it.

A prepared dataset is a folder holding
  SPLIT-XXXXX-of-YYYYY.tfrecord   TFRecord shards of `tf.train.Example`
  manifest.json                   schema version, classes, image size, parameters, counts, shards, rejects
  split.csv                       id hash, patient hash, split, label, shard
  audit.json                      duplicates, class balance, patient statistics

Each Example holds:
  image     bytes   raw uint8 pixels, row-major, shape (height, width, channels)
  height, width, channels   int64
  label     int64   the class index (a single-label dataset, schema version 1)
  labels    int64 x K   multi-hot: 1 where the label is positive (a multi-label dataset, schema version 2)
  mask      int64 x K   1 where the label is known, 0 where it is not (masked out of the loss and the metrics)
  id        bytes   opaque stable hash of the input (salted; never a file or patient name)
  patient   bytes   salted hash of the patient key

A single-label dataset is still written as version 1, so that every reader of version 1 takes it; a
multi-label dataset is version 2 (manifest `task: multi-label`, its label names in `classes`), which a
reader of version 1 refuses by its version.

Writing needs no TensorFlow: the Example protobuf and the TFRecord framing are encoded here (byte-for-byte
what TensorFlow writes; the tests compare against `tf.train.Example.SerializeToString(deterministic=True)`),
so preparation workers do not pay TensorFlow's 5 s / 750 MB import. Reading uses tf.data.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from cxrscale.errors import CxrError
from cxrscale.files import read_json, sha256_file

if TYPE_CHECKING:  # TensorFlow is imported lazily, only by readers
    import tensorflow as tf

SCHEMA_VERSION = 1               # a single-label dataset
MULTILABEL_SCHEMA_VERSION = 2    # a multi-label dataset: labels and mask instead of label
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
MULTILABEL = "multi-label"
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
SPLIT_CSV = "split.csv"
AUDIT = "audit.json"
SHARD_PATTERN = re.compile(r"^(train|val|test)-(\d{5})-of-(\d{5})\.tfrecord$")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


# --- writing: protobuf wire format and TFRecord framing -------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _field(1, _field(1, value))  # Feature.bytes_list(1) -> BytesList.value(1)


def _int64_feature(value: int) -> bytes:
    if value < 0:
        raise ValueError("only non-negative int64 features are written")
    return _field(3, _field(1, _varint(value)))  # Feature.int64_list(3) -> packed Int64List.value(1)


def _int64_list_feature(values: list[int]) -> bytes:
    if any(v < 0 for v in values):
        raise ValueError("only non-negative int64 features are written")
    return _field(3, _field(1, b"".join(_varint(v) for v in values)))  # packed, as TensorFlow writes it


def encode_example(image: np.ndarray, label: int | tuple[int, ...], record_id: str, patient: str) -> bytes:
    """Serialise one record as a `tf.train.Example` (deterministic: map keys sorted, as TensorFlow does).

    image: uint8 array (H, W, C). label: class index, or a multi-label record's targets (1 positive, 0
    negative, -1 unknown), written as `labels` and `mask`. record_id, patient: hash strings.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    features = {
        "channels": _int64_feature(channels),
        "height": _int64_feature(height),
        "id": _bytes_feature(record_id.encode()),
        "image": _bytes_feature(np.ascontiguousarray(image).tobytes()),
        "patient": _bytes_feature(patient.encode()),
        "width": _int64_feature(width),
    }
    if isinstance(label, (tuple, list)):
        features["labels"] = _int64_list_feature([int(t == 1) for t in label])
        features["mask"] = _int64_list_feature([int(t >= 0) for t in label])
    else:
        features["label"] = _int64_feature(int(label))
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, value))
                       for key, value in sorted(features.items()))
    return _field(1, entries)  # Example.features(1) -> Features.feature(1) map entries


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(fh: BinaryIO, record: bytes) -> None:
    """Append one TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    length = struct.pack("<Q", len(record))
    fh.write(length + struct.pack("<I", _masked_crc32c(length)) + record
             + struct.pack("<I", _masked_crc32c(record)))


# --- reading --------------------------------------------------------------------------------------------

def read_manifest(prepared_dir: str | Path) -> dict:
    """Load and check a prepared dataset's manifest; raises `CxrError` for a missing or unknown schema."""
    prepared_dir = Path(prepared_dir)
    if not prepared_dir.is_dir():
        raise CxrError(f"prepared dataset folder not found: {prepared_dir} (run python -m preprocessing first)")
    manifest = read_json(prepared_dir / MANIFEST, "prepared dataset manifest")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise CxrError(f"{prepared_dir / MANIFEST} has schema version {version!r}; this cxrscale reads "
                       f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}: re-run python -m preprocessing")
    if (version == MULTILABEL_SCHEMA_VERSION) != (manifest.get("task") == MULTILABEL):
        raise CxrError(f"{prepared_dir / MANIFEST} has schema version {version} but task "
                       f"{manifest.get('task', 'single-label')!r}: version {MULTILABEL_SCHEMA_VERSION} is a "
                       "multi-label dataset; re-run python -m preprocessing")
    return manifest


def shard_paths(prepared_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The split's shard files listed in the manifest, in order; raises `CxrError` if any is missing."""
    prepared_dir = Path(prepared_dir)
    manifest = manifest or read_manifest(prepared_dir)
    if split not in SPLITS:
        raise CxrError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    paths = [prepared_dir / s["file"] for s in manifest["shards"] if s["split"] == split]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CxrError(f"{prepared_dir} is missing shard files {', '.join(missing[:3])}"
                       f"{' ...' if len(missing) > 3 else ''}: re-run python -m preprocessing")
    return paths


def verify_shards(prepared_dir: str | Path, splits: tuple[str, ...] = ("train", "val")) -> int:
    """Check the splits' shard files against the manifest's size and sha256 of each; raises `CxrError`
    naming the first file that differs (a flipped byte, a truncated or replaced copy), so that a damaged
    dataset stops a run before it starts rather than as a record error mid-epoch. Returns the files checked."""
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    entries = [s for s in manifest["shards"] if s["split"] in splits]
    shard_paths(prepared_dir, splits[0], manifest)  # missing files first, with their own message
    for entry in entries:
        path = prepared_dir / entry["file"]
        if not path.is_file():
            raise CxrError(f"{path} is missing: re-run python -m preprocessing")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise CxrError(f"{path} is {size} bytes but the manifest lists {entry['bytes']}: the shard is damaged or "
                           "was replaced; prepare the dataset again")
        if "sha256" in entry and sha256_file(path) != entry["sha256"]:
            raise CxrError(f"{path} does not match its sha256 in {prepared_dir / MANIFEST}: the shard is damaged "
                           "(a changed byte); prepare the dataset again")
    return len(entries)


def worker_problems(prepared_dir: str | Path, manifest: dict, workers: int, batch_size: int,
                    fewer_workers: str = "use fewer workers") -> list[str]:
    """What stops `workers` data-parallel workers with `batch_size` images each from training on this
    dataset (each worker reads its own train shard files), as messages naming the fix; [] when nothing.
    fewer_workers: the launcher's wording of that fix, formatted with {n}, the most workers that fit."""
    problems = []
    shards = len(shard_paths(prepared_dir, "train", manifest))
    if shards < workers:
        problems.append(f"{prepared_dir} has {shards} train shard files for {workers} workers; each worker reads "
                        f"its own files: re-run python -m preprocessing with --shards {workers} or more, or "
                        f"{fewer_workers.format(n=shards)}")
    train_count = manifest["counts"]["per_split"].get("train", {}).get("total", 0)
    if batch_size * workers > train_count:
        problems.append(f"the global batch ({batch_size} per worker x {workers} workers = {batch_size * workers}) "
                        f"is larger than the train split ({train_count} images): lower --batch-size")
    return problems


def feature_spec(num_labels: int | None = None) -> dict:
    """The Example's features: `label` for a single-label dataset, `labels` and `mask` for `num_labels`."""
    import tensorflow as tf

    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "channels": tf.io.FixedLenFeature([], tf.int64),
        "id": tf.io.FixedLenFeature([], tf.string),
        "patient": tf.io.FixedLenFeature([], tf.string),
    }
    if num_labels is None:
        spec["label"] = tf.io.FixedLenFeature([], tf.int64)
    else:
        spec["labels"] = tf.io.FixedLenFeature([num_labels], tf.int64)
        spec["mask"] = tf.io.FixedLenFeature([num_labels], tf.int64)
    return spec


def parse_example(serialized: "tf.Tensor", image_shape: tuple[int, int, int],
                  num_labels: int | None = None) -> dict[str, "tf.Tensor"]:
    """Parse one serialised Example into {"image": uint8 (H, W, C), "label", "id", "patient"}: the label an
    int32 class index, or for `num_labels` (a multi-label dataset: `label_count`) float32 (K,) targets, 1
    positive, 0 negative, -1 unknown (the mask folded in, as the masked loss and metrics take it)."""
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, feature_spec(num_labels))
    image = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), image_shape)
    if num_labels is None:
        label = tf.cast(parsed["label"], tf.int32)
    else:
        label = tf.where(parsed["mask"] > 0, tf.cast(parsed["labels"], tf.float32), -1.0)
    return {"image": image, "label": label, "id": parsed["id"], "patient": parsed["patient"]}


def label_count(manifest: dict) -> int | None:
    """K for a multi-label dataset (its labels are the manifest's `classes`), None for a single-label one."""
    return len(manifest["classes"]) if manifest.get("task") == MULTILABEL else None


def image_shape(manifest: dict) -> tuple[int, int, int]:
    height, width, channels = manifest["image_shape"]
    return int(height), int(width), int(channels)


def dataset(prepared_dir: str | Path, split: str, *, files: list[Path] | None = None,
            with_ids: bool = False, num_parallel_reads: int | None = None) -> "tf.data.Dataset":
    """`tf.data.Dataset` of (uint8 image (H, W, C), label) from a prepared split, in file order: the label an
    int32 class index, or a multi-label dataset's float32 (K,) targets (`parse_example`).

    files: read only these shard files (e.g. one Horovod worker's share); default: all of the split.
    with_ids: yield (image, label, id) instead, for evaluation reports that trace records.
    Checks the manifest's schema version first.
    """
    import tensorflow as tf

    manifest = read_manifest(prepared_dir)
    paths = files if files is not None else shard_paths(prepared_dir, split, manifest)
    shape = image_shape(manifest)
    autotune = tf.data.AUTOTUNE
    ds = tf.data.TFRecordDataset([str(p) for p in paths],
                                 num_parallel_reads=num_parallel_reads or (autotune if len(paths) > 1 else None))
    num_labels = label_count(manifest)
    ds = ds.map(lambda s: parse_example(s, shape, num_labels), num_parallel_calls=autotune, deterministic=True)
    if with_ids:
        return ds.map(lambda r: (r["image"], r["label"], r["id"]))
    return ds.map(lambda r: (r["image"], r["label"]))
