"""The shard schema: our writer is byte-identical to TensorFlow's, and `dataset` reads it back."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cxrscale.errors import CxrError
from preprocessing import schema


def test_example_and_record_bytes_match_tensorflow(tmp_path):
    import tensorflow as tf

    image = np.random.default_rng(0).integers(0, 256, (6, 5, 1), dtype=np.uint8)
    ours = schema.encode_example(image, 3, "id-abc", "patient-xyz")
    feature = tf.train.Feature
    theirs = tf.train.Example(features=tf.train.Features(feature={
        "image": feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "height": feature(int64_list=tf.train.Int64List(value=[6])),
        "width": feature(int64_list=tf.train.Int64List(value=[5])),
        "channels": feature(int64_list=tf.train.Int64List(value=[1])),
        "label": feature(int64_list=tf.train.Int64List(value=[3])),
        "id": feature(bytes_list=tf.train.BytesList(value=[b"id-abc"])),
        "patient": feature(bytes_list=tf.train.BytesList(value=[b"patient-xyz"])),
    }))
    assert ours == theirs.SerializeToString(deterministic=True)

    buf = io.BytesIO()
    schema.write_record(buf, ours)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        writer.write(ours)
    assert buf.getvalue() == (tmp_path / "tf.tfrecord").read_bytes()


def make_prepared(tmp_path, version=schema.SCHEMA_VERSION, n=5):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    name = schema.shard_name("train", 0, 1)
    with open(tmp_path / name, "wb") as fh:
        for i, image in enumerate(images):
            schema.write_record(fh, schema.encode_example(image, i % 2, f"id{i}", f"p{i}"))
    manifest = {"schema_version": version, "image_shape": [8, 8, 1], "classes": ["A", "B"],
                "shards": [{"file": name, "split": "train", "records": n}]}
    (tmp_path / schema.MANIFEST).write_text(json.dumps(manifest))
    return images


def test_dataset_round_trip(tmp_path):
    images = make_prepared(tmp_path)
    got = list(schema.dataset(tmp_path, "train", with_ids=True).as_numpy_iterator())
    assert len(got) == 5
    for i, (image, label, record_id) in enumerate(got):
        assert image.dtype == np.uint8 and image.shape == (8, 8, 1)
        np.testing.assert_array_equal(image, images[i])
        assert label == i % 2 and record_id == f"id{i}".encode()


def test_unknown_schema_version_is_refused(tmp_path):
    make_prepared(tmp_path, version=99)
    with pytest.raises(CxrError, match="schema version 99"):
        schema.dataset(tmp_path, "train")


def test_missing_shard_and_folder_are_named(tmp_path):
    make_prepared(tmp_path)
    (tmp_path / schema.shard_name("train", 0, 1)).unlink()
    with pytest.raises(CxrError, match="missing shard files train-00000-of-00001"):
        schema.shard_paths(tmp_path, "train")
    with pytest.raises(CxrError, match="not found"):
        schema.read_manifest(tmp_path / "nope")


def test_multilabel_example_bytes_match_tensorflow_and_read_back_with_the_mask(tmp_path):
    import tensorflow as tf

    image = np.random.default_rng(0).integers(0, 256, (6, 5, 1), dtype=np.uint8)
    targets = (1, 0, -1, 1)  # positive, negative, unknown, positive
    ours = schema.encode_example(image, targets, "id-abc", "patient-xyz")
    feature = tf.train.Feature
    theirs = tf.train.Example(features=tf.train.Features(feature={
        "image": feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "height": feature(int64_list=tf.train.Int64List(value=[6])),
        "width": feature(int64_list=tf.train.Int64List(value=[5])),
        "channels": feature(int64_list=tf.train.Int64List(value=[1])),
        "labels": feature(int64_list=tf.train.Int64List(value=[1, 0, 0, 1])),
        "mask": feature(int64_list=tf.train.Int64List(value=[1, 1, 0, 1])),
        "id": feature(bytes_list=tf.train.BytesList(value=[b"id-abc"])),
        "patient": feature(bytes_list=tf.train.BytesList(value=[b"patient-xyz"])),
    }))
    assert ours == theirs.SerializeToString(deterministic=True)
    parsed = schema.parse_example(tf.constant(ours), (6, 5, 1), num_labels=4)
    np.testing.assert_array_equal(parsed["label"].numpy(), [1.0, 0.0, -1.0, 1.0])
    np.testing.assert_array_equal(parsed["image"].numpy(), image)


def test_schema_versions_step_with_the_task(tmp_path):
    """A multi-label dataset is version 2 (which a reader of version 1 refuses by its version); a manifest whose
    version and task disagree is refused naming both."""
    make_prepared(tmp_path)
    manifest = json.loads((tmp_path / schema.MANIFEST).read_text())
    assert schema.read_manifest(tmp_path)["schema_version"] == 1 and schema.label_count(manifest) is None
    for version, task in ((2, None), (1, schema.MULTILABEL)):
        (tmp_path / schema.MANIFEST).write_text(json.dumps({**manifest, "schema_version": version,
                                                            **({"task": task} if task else {})}))
        with pytest.raises(CxrError, match=f"schema version {version} but task"):
            schema.read_manifest(tmp_path)
    (tmp_path / schema.MANIFEST).write_text(json.dumps({**manifest, "schema_version": 2, "task": schema.MULTILABEL}))
    assert schema.label_count(schema.read_manifest(tmp_path)) == 2
