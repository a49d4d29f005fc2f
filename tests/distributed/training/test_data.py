"""The training input pipeline's augmentation: anatomy-safe, bounded, seeded, never a left-right flip."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from distributed.training.data import AugmentPolicy, augment_batch, augmenter
from tests.conftest import radiograph_like
from tests.training_fixtures import prepared64, sample_images  # noqa: F401 (fixtures)


def chest_like_batch(n: int = 32, side: int = 64) -> np.ndarray:
    """Images whose left half is clearly brighter than the right (a heart shadow on one side, say)."""
    images = np.stack([radiograph_like(s, (side, side)) for s in range(n)]).astype(np.float32) * 0.5
    images[:, :, : side // 2] += 100
    return np.clip(images, 0, 255).astype(np.uint8)[..., None]


def test_augmentation_keeps_shape_and_type_and_changes_every_image():
    x = chest_like_batch()
    y = augment_batch(tf.constant(x), tf.random.Generator.from_seed(0)).numpy()
    assert y.shape == x.shape and y.dtype == np.uint8
    changed = np.abs(y.astype(int) - x.astype(int)).mean(axis=(1, 2, 3))
    assert np.all(changed > 1.0)


def test_augmentation_is_seeded():
    x = tf.constant(chest_like_batch())
    a = augment_batch(x, tf.random.Generator.from_seed(3)).numpy()
    b = augment_batch(x, tf.random.Generator.from_seed(3)).numpy()
    c = augment_batch(x, tf.random.Generator.from_seed(4)).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_augmentation_never_flips_left_and_right():
    x = chest_like_batch(64)
    for seed in range(4):
        y = augment_batch(tf.constant(x), tf.random.Generator.from_seed(seed)).numpy().astype(float)
        left, right = y[:, :, :24].mean(axis=(1, 2, 3)), y[:, :, 40:].mean(axis=(1, 2, 3))
        assert np.all(left > right), seed


def test_intensity_changes_stay_within_the_policy():
    flat = np.full((64, 32, 32, 1), 128, np.uint8)
    geometric_only = AugmentPolicy(gamma=(1.0, 1.0), brightness=0.0, contrast=0.0, blur_probability=0.0,
                                   noise_probability=0.0, crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0),
                                   rotation_degrees=0.0)
    same = augment_batch(tf.constant(flat), tf.random.Generator.from_seed(0), geometric_only).numpy()
    assert np.abs(same.astype(int) - 128).max() <= 1  # the identity policy is the identity
    policy = AugmentPolicy(crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0), rotation_degrees=0.0,
                           noise_probability=0.0)
    y = augment_batch(tf.constant(flat), tf.random.Generator.from_seed(1), policy).numpy().astype(float) / 255
    # mid-grey under gamma 0.7..1.4 and brightness +-0.1 (contrast keeps a flat image's mean)
    low, high = (128 / 255) ** 1.4 - 0.1, (128 / 255) ** 0.7 + 0.1
    means = y.mean(axis=(1, 2, 3))
    assert np.all(means >= low - 0.01) and np.all(means <= high + 0.01)
    assert means.std() > 0.03  # and they do vary


def test_the_fused_crop_and_rotation_magnify_and_turn_about_the_centre():
    still = dict(gamma=(1.0, 1.0), brightness=0.0, contrast=0.0, blur_probability=0.0, noise_probability=0.0)
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 2, (64, 1))  # grey = 2 x column
    batch = tf.constant(np.repeat(ramp[None, :, :, None], 8, axis=0))
    # a crop of half the side, resized back, doubles every distance: the ramp rises 1 grey level per column
    half = augment_batch(batch, tf.random.Generator.from_seed(0),
                         AugmentPolicy(crop_scale=(0.5, 0.5), crop_aspect=(1.0, 1.0), rotation_degrees=0.0, **still))
    slopes = np.diff(half.numpy()[:, 32, 8:56, 0].astype(float), axis=1).mean(axis=1)
    assert np.allclose(slopes, 1.0, atol=0.05)
    # a rotation alone keeps the centre pixel where it was and turns the ramp: rows no longer all agree
    dot = np.zeros((8, 63, 63, 1), np.uint8)
    dot[:, 30:33, 30:33] = 255
    turned = augment_batch(tf.constant(dot), tf.random.Generator.from_seed(1),
                           AugmentPolicy(crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0), rotation_degrees=5.0, **still))
    assert np.all(turned.numpy()[:, 31, 31, 0] == 255)
    rotated = augment_batch(batch, tf.random.Generator.from_seed(2),
                            AugmentPolicy(crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0), rotation_degrees=5.0, **still))
    column = rotated.numpy()[:, 8:56, 32, 0].astype(float)
    spread = column.max(axis=1) - column.min(axis=1)  # 48 rows x tan(angle) x 2 levels per column: up to 8
    assert spread.max() >= 5 and spread.mean() >= 2 and spread.max() <= 10


def test_the_augmented_training_stream_is_parallel_yet_the_same_for_the_same_seed(prepared64):
    from distributed.training.data import plan_data, train_dataset

    plan = plan_data(prepared64, 0, 1, 8, "cnn")

    def first_batches(seed: int, augment: bool = True) -> list[np.ndarray]:
        ds = train_dataset(prepared64, plan, 8, seed=seed, shuffle_buffer=64, augment=augment, label_form="binary")
        return [x.numpy() for x, _ in ds.take(4)]

    a, b, c, plain = first_batches(5), first_batches(5), first_batches(6), first_batches(5, augment=False)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(x.shape == p.shape and x.dtype == np.uint8 and not np.array_equal(x, p) for x, p in zip(a, plain))
    # each batch draws from its own seed: the same images as batch 0 and as batch 1 are augmented differently
    apply = augmenter(5)
    x, y = tf.constant(plain[0]), tf.zeros([8, 1])
    first, again, second = apply(tf.constant(0, tf.int64), (x, y))[0], apply(tf.constant(0, tf.int64), (x, y))[0], \
        apply(tf.constant(1, tf.int64), (x, y))[0]
    assert np.array_equal(first.numpy(), again.numpy()) and not np.array_equal(first.numpy(), second.numpy())
