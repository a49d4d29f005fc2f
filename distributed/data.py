"""Input pipelines for data-parallel training: each worker reads its own shard files (train) or its own
share of the records (validation), all through `preprocessing.schema`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from preprocessing import schema
from preprocessing.runtime import CxrError


@dataclass(frozen=True)
class DataPlan:
    """What every worker must agree on before training. steps_per_epoch is derived from the manifest's
    train count and the global batch, so it is the same on every rank."""

    image_shape: tuple[int, int, int]
    classes: list[str]
    train_count: int
    val_count: int
    train_files: list[Path]      # this worker's files
    val_files: list[Path]        # all validation files (records are split between workers)
    steps_per_epoch: int
    class_counts: list[int]


def plan_data(prepared_dir: str | Path, rank: int, size: int, batch_size: int, min_side: int,
              model: str) -> DataPlan:
    """Check the prepared dataset against the run (before any training) and plan each worker's share.

    Raises `CxrError` for an unknown schema version, fewer train shard files than workers, a global batch
    larger than the train split, an image size the model cannot take, or a missing validation split.
    """
    manifest = schema.read_manifest(prepared_dir)
    shape = schema.image_shape(manifest)
    if min(shape[:2]) < min_side:
        raise CxrError(f"--model {model} needs images of at least {min_side} px; {prepared_dir} holds "
                       f"{shape[0]}x{shape[1]} px: prepare it again with a larger --size")
    counts = manifest["counts"]["per_split"]
    classes = list(manifest["classes"])
    problems = schema.worker_problems(prepared_dir, manifest, size, batch_size)
    if problems:
        raise CxrError(problems[0])
    train_files = schema.shard_paths(prepared_dir, "train", manifest)
    val_files = schema.shard_paths(prepared_dir, "val", manifest) if "val" in counts else []
    if not val_files:
        raise CxrError(f"{prepared_dir} has no validation split; prepare it with --val-fraction > 0")
    train_count = counts["train"]["total"]
    global_batch = batch_size * size
    return DataPlan(shape, classes, train_count, counts["val"]["total"], train_files[rank::size], val_files,
                    train_count // global_batch, [counts["train"].get(c, 0) for c in classes])


def balanced_class_weights(class_counts: list[int]) -> dict[int, float]:
    """n / (K * n_c) per class, as scikit-learn's "balanced"; a class with no images gets weight 0."""
    total, k = sum(class_counts), len(class_counts)
    return {i: (total / (k * n) if n else 0.0) for i, n in enumerate(class_counts)}


def augmenter(seed: int):
    """Random geometric and contrast jitter on uint8 (H, W, 1) batches, kept as uint8. No horizontal flip:
    a chest radiograph is not left-right symmetric (heart, stomach bubble) and the side marker matters."""
    from distributed.kerasenv import keras

    layers = keras.Sequential([
        keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 2),
        keras.layers.RandomContrast(0.2, seed=seed + 3),
    ], name="augmentation")

    def apply(images: tf.Tensor, labels: tf.Tensor):
        out = layers(tf.cast(images, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8), labels

    return apply


def train_dataset(prepared_dir: str | Path, plan: DataPlan, batch_size: int, *, seed: int, shuffle_buffer: int,
                  augment: bool, binary_labels: bool) -> tf.data.Dataset:
    """This worker's endless, shuffled, batched (uint8 image, label) stream over its own shard files."""
    files = tf.data.Dataset.from_tensor_slices([str(p) for p in plan.train_files])
    files = files.shuffle(len(plan.train_files), seed=seed, reshuffle_each_iteration=True)
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(plan.train_files)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.map(lambda s: _pair(s, plan.image_shape, binary_labels), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    if augment:
        ds = ds.map(augmenter(seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def val_dataset(prepared_dir: str | Path, plan: DataPlan, batch_size: int, rank: int, size: int) -> tf.data.Dataset:
    """This worker's share (every size-th record) of the validation split, in order, as (image, label)."""
    ds = tf.data.TFRecordDataset([str(p) for p in plan.val_files]).shard(size, rank)
    ds = ds.map(lambda s: _pair(s, plan.image_shape, False), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def ordered_dataset(files: list[Path], plan: DataPlan, batch_size: int, binary_labels: bool) -> tf.data.Dataset:
    """The records of `files` once, in file order, batched as (image, label): for feature caching."""
    ds = tf.data.TFRecordDataset([str(p) for p in files])
    ds = ds.map(lambda s: _pair(s, plan.image_shape, binary_labels), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def sample_images(files: list[Path], shape: tuple[int, int, int], n: int, seed: int):
    """Up to n uint8 images (n, H, W, C) drawn at random (seeded) from the records of `files`, as a numpy
    array: the train images BatchNormalization statistics are re-estimated on."""
    import numpy as np

    ds = tf.data.TFRecordDataset([str(p) for p in files]).shuffle(4096, seed=seed, reshuffle_each_iteration=False)
    ds = ds.take(n).map(lambda s: schema.parse_example(s, shape)["image"]).batch(256)
    batches = list(ds.as_numpy_iterator())
    return np.concatenate(batches) if batches else np.zeros((0, *shape), np.uint8)


def _pair(serialized: tf.Tensor, shape: tuple[int, int, int], binary_labels: bool):
    record = schema.parse_example(serialized, shape)
    label = record["label"]
    if binary_labels:  # a 1-unit sigmoid head wants float labels of shape (1,)
        label = tf.cast(tf.reshape(label, (1,)), tf.float32)
    return record["image"], label

