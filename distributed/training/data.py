"""Input pipelines for data-parallel training: each worker reads its own shard files (train) or its own
share of the records (validation), all through `preprocessing.schema`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from distributed.model.zoo import check_image_size
from cxrscale.errors import CxrError
from preprocessing import schema


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
    class_counts: list[int]      # train images per class; multi-label: positive train images per label
    num_labels: int | None = None  # a multi-label dataset's K (its `classes` are the labels), else None
    label_known: list[int] | None = None  # multi-label: train images whose label is known, per label


def plan_data(prepared_dir: str | Path, rank: int, size: int, batch_size: int, model: str) -> DataPlan:
    """Check the prepared dataset against the run (before any training) and plan each worker's share.

    Raises `CxrError` for an unknown schema version, fewer train shard files than workers, a global batch
    larger than the train split, an image size the model cannot take, or a missing validation split.
    """
    manifest = schema.read_manifest(prepared_dir)
    shape = schema.image_shape(manifest)
    check_image_size(model, int(min(shape[:2])), source=f"--data {prepared_dir}")
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
    num_labels = schema.label_count(manifest)
    unknown = counts["train"].get("unknown", {}) if num_labels else {}
    return DataPlan(shape, classes, train_count, counts["val"]["total"], train_files[rank::size], val_files,
                    train_count // global_batch, [counts["train"].get(c, 0) for c in classes], num_labels,
                    [train_count - unknown.get(c, 0) for c in classes] if num_labels else None)


def balanced_class_weights(class_counts: list[int]) -> dict[int, float]:
    """n / (K * n_c) per class, as scikit-learn's "balanced"; a class with no images gets weight 0."""
    total, k = sum(class_counts), len(class_counts)
    return {i: (total / (k * n) if n else 0.0) for i, n in enumerate(class_counts)}


def label_weights(positives: list[int], known: list[int]) -> list[tuple[float, float]]:
    """(negative, positive) loss weights of each label of a multi-label dataset: `balanced_class_weights` of
    its negative and positive images among those where it is known, so a rare finding's positives weigh as
    much in all as its negatives (CheXNet's weighted cross-entropy, in scikit-learn's scale)."""
    return [tuple(balanced_class_weights([n - pos, pos]).values()) for pos, n in zip(positives, known)]


@dataclass(frozen=True)
class AugmentPolicy:
    """Anatomy-safe random augmentation of radiographs, each image drawn independently. Ranges are the
    acquisition differences between sites and machines (exposure, processing, positioning, detector
    resolution and noise, JPEG/export), kept mild enough that the anatomy stays plausible. There is never a
    left-right flip: a chest radiograph is not symmetric (heart, stomach bubble, side markers)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)      # random resized crop: its side over the image's (> 1: zoom out)
    crop_aspect: tuple[float, float] = (0.9, 1.1)     # aspect ratio of the crop
    rotation_degrees: float = 5.0                     # +- small rotation (patient positioning)
    gamma: tuple[float, float] = (0.7, 1.4)           # x -> x ** gamma on [0, 1] (detector / processing curve)
    brightness: float = 0.1                           # +- share of full scale
    contrast: float = 0.3                             # +- 30 % around the image mean
    blur_probability: float = 0.3                     # Gaussian blur, sigma 0.5 .. 1.2 px
    noise_probability: float = 0.3                    # Gaussian noise, sigma up to 3 % of full scale
    noise_sigma: float = 0.03

    @classmethod
    def with_ranges(cls, widest: float | None = None, zoom: float | None = None) -> "AugmentPolicy":
        """The default policy, its crop's aspect ratio drawn from 1/widest..widest and its side from 1/zoom..zoom
        of the image's when given."""
        ranges = {}
        if widest is not None:
            ranges["crop_aspect"] = (1.0 / widest, widest)
        if zoom is not None:
            ranges["crop_scale"] = (1.0 / zoom, zoom)
        return cls(**ranges)


def augment_batch(images: tf.Tensor, rng: "tf.random.Generator | StatelessDraws",
                  policy: AugmentPolicy = AugmentPolicy()) -> tf.Tensor:
    """uint8 (n, H, W, 1) -> augmented uint8 (n, H, W, 1) (see `AugmentPolicy`).

    Built for a CPU feeding a GPU: the intensity changes (gamma, brightness, contrast) are one 256-entry lookup
    table per image applied to the uint8 pixels, the crop and the rotation are one projective resampling, and
    blur and noise are computed only for the images drawn for them. Every other image stays uint8 throughout.
    """
    n, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    # intensity, as a per-image table over the 256 grey levels: x -> x ** gamma + brightness, then contrast
    # around the image's mean (from its histogram, so no float image is made)
    levels = tf.range(256, dtype=tf.float32)[None, :] / 255.0
    gamma = tf.exp(rng.uniform([n, 1], np.log(policy.gamma[0]), np.log(policy.gamma[1])))
    table = tf.pow(levels, gamma) + rng.uniform([n, 1], -policy.brightness, policy.brightness)
    # the mean from every 4th row and column: a 1/16 sample of a radiograph gives its mean grey within a level
    sample = tf.reshape(tf.cast(images[:, ::4, ::4], tf.int32), [n, -1])
    histogram = tf.cast(tf.math.bincount(sample, minlength=256, maxlength=256, axis=-1), tf.float32)
    mean = tf.reduce_sum(histogram * table, axis=1, keepdims=True) / tf.cast(tf.shape(sample)[1], tf.float32)
    table = (table - mean) * rng.uniform([n, 1], 1.0 - policy.contrast, 1.0 + policy.contrast) + mean
    table = tf.cast(tf.round(tf.clip_by_value(table, 0.0, 1.0) * 255.0), tf.uint8)
    # one flat gather (image i's table starts at 256 i): faster than a batched gather
    index = tf.reshape(tf.cast(images, tf.int32), [n, -1]) + 256 * tf.range(n)[:, None]
    x = tf.reshape(tf.gather(tf.reshape(table, [-1]), index), tf.shape(images))
    # random resized crop (centred anywhere it fits) and a small rotation about the centre, as one projective
    # transform from output to input pixels; black outside, like the letterbox padding. A box larger than the
    # image (scale > 1) zooms out: the whole image, smaller, anywhere inside it, black around. No side of the
    # box passes max(scale, 1), so the aspect ratio narrows the other side and never adds black to a crop
    scale = rng.uniform([n], *policy.crop_scale)
    aspect = rng.uniform([n], *policy.crop_aspect)
    most = tf.maximum(scale, 1.0)
    ch, cw = tf.minimum(scale * tf.sqrt(aspect), most), tf.minimum(scale / tf.sqrt(aspect), most)
    y0, x0 = rng.uniform([n]) * (1.0 - ch) * (h - 1), rng.uniform([n]) * (1.0 - cw) * (w - 1)
    angle = rng.uniform([n], -1.0, 1.0) * policy.rotation_degrees * np.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # rotate the output pixel about the centre, then place it in the crop box
    tx, ty = cx - cos * cx + sin * cy, cy - sin * cx - cos * cy
    transforms = tf.stack([cw * cos, -cw * sin, x0 + cw * tx, ch * sin, ch * cos, y0 + ch * ty,
                           tf.zeros([n]), tf.zeros([n])], axis=1)
    x = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transforms, output_shape=[h, w],
                                              fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    # blur: a separable 5-tap Gaussian with a random sigma, on a random share of the images only
    sigma = rng.uniform([], 0.5, 1.2)
    taps = tf.exp(-tf.square(tf.range(-2.0, 3.0)) / (2.0 * sigma * sigma))
    taps = taps / tf.reduce_sum(taps)

    def blur(sub: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d(tf.nn.conv2d(sub, tf.reshape(taps, [5, 1, 1, 1]), 1, "SAME"),
                            tf.reshape(taps, [1, 5, 1, 1]), 1, "SAME")

    x = _on_some(x, rng.uniform([n]) < policy.blur_probability, blur)

    def noise(sub: tf.Tensor) -> tf.Tensor:
        k = tf.shape(sub)[0]
        return sub + rng.normal(tf.shape(sub)) * rng.uniform([k, 1, 1, 1], 0.0, policy.noise_sigma * 255.0)

    return _on_some(x, rng.uniform([n]) < policy.noise_probability, noise)


def _on_some(images: tf.Tensor, chosen: tf.Tensor, change) -> tf.Tensor:
    """`images` with `change` (float32 in, float32 out, on 0..255) applied to the chosen ones only; uint8."""
    index = tf.where(chosen)
    changed = change(tf.cast(tf.gather_nd(images, index), tf.float32))
    changed = tf.cast(tf.round(tf.clip_by_value(changed, 0.0, 255.0)), tf.uint8)
    return tf.tensor_scatter_nd_update(images, index, changed)


class StatelessDraws:
    """The part of `tf.random.Generator`'s interface `augment_batch` uses (uniform, normal), drawn statelessly
    from one seed: the k-th draw uses the seed folded with k. Batches augmented in parallel from seeds
    folded with their batch number give the same stream for the same seed, whatever the parallelism."""

    def __init__(self, seed: tf.Tensor):
        self.seed, self.count = seed, 0

    def _next(self) -> tf.Tensor:
        self.count += 1
        return tf.random.experimental.stateless_fold_in(self.seed, self.count)

    def uniform(self, shape, minval=0.0, maxval=1.0) -> tf.Tensor:
        return tf.random.stateless_uniform(shape, self._next(), minval=minval, maxval=maxval)

    def normal(self, shape) -> tf.Tensor:
        return tf.random.stateless_normal(shape, self._next())


def augmenter(seed: int, policy: AugmentPolicy = AugmentPolicy()):
    """A tf.data map function over (batch number, (uint8 images, labels)) applying `augment_batch`, each
    batch with its own stateless seed: safe to run in parallel and the same for the same seed."""
    base = tf.constant([seed, 0], tf.int64)

    def apply(index: tf.Tensor, batch):
        images, labels = batch
        return augment_batch(images, StatelessDraws(tf.random.experimental.stateless_fold_in(base, index)),
                             policy), labels

    return apply


def with_class_weights(dataset: tf.data.Dataset, class_weight: dict[int, float]) -> tf.data.Dataset:
    """(image, label) -> (image, label, weight of the label's class): `fit(class_weight=...)` done in the
    input pipeline (Keras maps the same way; a distributed dataset cannot take class_weight, and a mixup
    target cannot be read back as a class)."""
    table = tf.constant([class_weight[c] for c in sorted(class_weight)], tf.float32)

    def add(image, label):
        index = tf.argmax(label, axis=-1) if label.shape.rank == 2 and label.shape[-1] > 1 else \
            tf.reshape(tf.cast(label, tf.int64), [-1])
        return image, label, tf.gather(table, index)

    return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def mixer(alpha: float, seed: int):
    """A tf.data map function over (batch number, (uint8 images, labels[, weights])) applying mixup (Zhang
    et al. 2018): image i becomes l x_i + (1 - l) x_j and its label l y_i + (1 - l) y_j, with l drawn from
    Beta(alpha, alpha) per image and j the image at the mirrored place in the batch (a shuffled batch, so a
    random partner; timm pairs the same way). Each batch draws from its own stateless seed, as `augmenter`.

    Labels are binary (n, 1) floats or multi-hot (n, K) with -1 for unknown: a mixed label is unknown where
    either partner's is. Per-image weights (`with_class_weights`, attached before mixing: Keras's own
    class_weight would cast a mixed label to a class index, 0.7 -> 0) are blended the same way,
    l w_i + (1 - l) w_j."""
    base = tf.constant([seed, 1], tf.int64)

    def blend(lam: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        lam = tf.reshape(lam, [-1] + [1] * (values.shape.rank - 1))
        return lam * values + (1.0 - lam) * tf.reverse(values, [0])

    def apply(index: tf.Tensor, batch):
        images, labels, *weights = batch
        draws = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(base, index), 2)
        n = tf.shape(images)[0]
        # Beta(a, a) as G1 / (G1 + G2) with G ~ Gamma(a): TensorFlow has no stateless Beta
        g1 = tf.random.stateless_gamma([n], draws[0], alpha)
        g2 = tf.random.stateless_gamma([n], draws[1], alpha)
        lam = g1 / tf.maximum(g1 + g2, 1e-12)
        mixed = tf.cast(tf.round(tf.clip_by_value(blend(lam, tf.cast(images, tf.float32)), 0.0, 255.0)), tf.uint8)
        labels = tf.cast(labels, tf.float32)
        soft = tf.where((labels < 0.0) | (tf.reverse(labels, [0]) < 0.0), -1.0, blend(lam, labels))
        return (mixed, soft, *(blend(lam, w) for w in weights))

    return apply


def check_mixup(mixup: float, label_form: str, classes: int) -> None:
    """CxrError unless `mixer` can blend this head's labels: binary or multi-hot, not class indices."""
    if mixup and label_form not in ("binary", "multihot"):
        raise CxrError(f"--mixup mixes labels as probabilities: it needs a one-unit sigmoid (two classes) or a "
                       f"multi-label head, not a {label_form!r} head of {classes} classes")


def train_dataset(prepared_dir: str | Path, plan: DataPlan, batch_size: int, *, seed: int, shuffle_buffer: int,
                  augment: bool, label_form: str, mixup: float = 0.0,
                  class_weight: dict[int, float] | None = None,
                  policy: AugmentPolicy = AugmentPolicy()) -> tf.data.Dataset:
    """This worker's endless, shuffled, batched (uint8 image, label) stream over its own shard files, the
    labels in the head's `label_form` (distributed.model.heads). With `mixup` > 0 the batches are mixed
    after augmentation (`mixer`, binary or multi-hot labels only) and, given `class_weight`, carry each
    image's weight as a third element."""
    check_mixup(mixup, label_form, len(plan.classes))
    files = tf.data.Dataset.from_tensor_slices([str(p) for p in plan.train_files])
    files = files.shuffle(len(plan.train_files), seed=seed, reshuffle_each_iteration=True)
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(plan.train_files)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.map(lambda s: _pair(s, plan, label_form), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    if augment:  # in parallel, in order: each batch draws from its own seed
        ds = ds.enumerate().map(augmenter(seed, policy), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if mixup:
        if class_weight:
            ds = with_class_weights(ds, class_weight)
        ds = ds.enumerate().map(mixer(mixup, seed), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def val_dataset(prepared_dir: str | Path, plan: DataPlan, batch_size: int, rank: int, size: int) -> tf.data.Dataset:
    """This worker's share (every size-th record) of the validation split, in order, as (image, label)."""
    ds = tf.data.TFRecordDataset([str(p) for p in plan.val_files]).shard(size, rank)
    form = "multihot" if plan.num_labels else "index"
    ds = ds.map(lambda s: _pair(s, plan, form), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def ordered_dataset(files: list[Path], plan: DataPlan, batch_size: int, label_form: str) -> tf.data.Dataset:
    """The records of `files` once, in file order, batched as (image, label): for feature caching."""
    ds = tf.data.TFRecordDataset([str(p) for p in files])
    ds = ds.map(lambda s: _pair(s, plan, label_form), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def sample_images(files: list[Path], shape: tuple[int, int, int], n: int, seed: int, num_labels: int | None = None):
    """Up to n uint8 images (n, H, W, C) drawn at random (seeded) from the records of `files` (of a dataset
    with `num_labels`, `DataPlan`), as a numpy array: the train images BatchNormalization statistics are
    re-estimated on."""
    ds = tf.data.TFRecordDataset([str(p) for p in files]).shuffle(4096, seed=seed, reshuffle_each_iteration=False)
    ds = ds.take(n).map(lambda s: schema.parse_example(s, shape, num_labels)["image"]).batch(256)
    batches = list(ds.as_numpy_iterator())
    return np.concatenate(batches) if batches else np.zeros((0, *shape), np.uint8)


def _pair(serialized: tf.Tensor, plan: DataPlan, label_form: str):
    """(image, label) with the label as the head takes it: "binary", float (1,) for one sigmoid unit;
    "index", the int class index; "multihot", float (K,) of 1, 0 and -1 (unknown) for a multi-label head."""
    if (label_form == "multihot") != bool(plan.num_labels):
        raise CxrError(f"a {label_form!r} head cannot train on a {'multi' if plan.num_labels else 'single'}-label "
                       "dataset")
    record = schema.parse_example(serialized, plan.image_shape, plan.num_labels)
    label = record["label"]
    if label_form == "binary":
        label = tf.cast(tf.reshape(label, (1,)), tf.float32)
    return record["image"], label
