"""The training input pipeline's augmentation: anatomy-safe, bounded, seeded, never a left-right flip."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from cxrscale.errors import CxrError
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


def test_mixup_blends_each_image_with_its_mirrored_partner_and_the_labels_and_weights_alike():
    from distributed.training.data import mixer, with_class_weights

    n = 8
    images = tf.constant(np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 30, 4, axis=1)
                         .repeat(4, axis=2))  # image i is flat at grey 30 i
    labels = tf.constant([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0], [1.0], [0.0]])
    weights = {0: 2.0, 1: 0.5}
    # as train_dataset does it: class weights attached to the batch first, then mixed (batch number 0)
    weighted = with_class_weights(tf.data.Dataset.from_tensors((images, labels)), weights)
    x, y, w = next(iter(weighted.enumerate().map(mixer(0.4, seed=7))))
    x, y, w = x.numpy(), y.numpy()[:, 0], w.numpy()
    assert x.dtype == np.uint8 and x.shape == (n, 4, 4, 1)
    # the blend weight each image got, read back from its grey level: the same one mixes its label and weight
    grey, partner = np.arange(n) * 30.0, np.arange(n)[::-1] * 30.0
    lam = (x[:, 0, 0, 0] - partner) / (grey - partner)
    assert np.all((lam > -0.01) & (lam < 1.01)) and lam.std() > 0.1  # drawn per image, not one per batch
    truth = labels.numpy()[:, 0]
    tolerance = 0.5 / np.abs(grey - partner) + 1e-3  # lam read back from a grey level rounded to the unit
    assert np.all(np.abs(y - (lam * truth + (1 - lam) * truth[::-1])) <= tolerance)
    cw = np.where(truth == 1, 0.5, 2.0)
    assert np.all(np.abs(w - (lam * cw + (1 - lam) * cw[::-1])) <= 1.5 * tolerance)
    # seeded per batch: the same batch number draws the same blend, another one another
    again = mixer(0.4, seed=7)(tf.constant(0, tf.int64), (images, labels))[0].numpy()
    other = mixer(0.4, seed=7)(tf.constant(1, tf.int64), (images, labels))[0].numpy()
    assert np.array_equal(again, x) and not np.array_equal(other, x)


def test_mixup_keeps_an_unknown_multi_label_finding_unknown():
    from distributed.training.data import mixer

    images = tf.zeros([4, 4, 4, 1], tf.uint8)
    labels = tf.constant([[1.0, -1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 1.0]])
    x, y = mixer(1.0, seed=0)(tf.constant(0, tf.int64), (images, labels))
    y = y.numpy()
    # finding 0 of image 0 is mixed with image 3's unknown; finding 1 of image 0 is itself unknown
    assert y[0, 0] == -1 and y[0, 1] == -1 and y[3, 0] == -1 and y[3, 1] == -1
    # where both partners know a finding it is a blend of their labels: images 1 and 2 are partners
    assert np.all((y[1:3] >= 0.0) & (y[1:3] <= 1.0)) and 0.0 < y[1, 0] < 1.0 and 0.0 < y[1, 1] < 1.0


def test_mixup_options_are_checked_before_training(prepared64):
    from distributed.training.config import parse_config
    from distributed.training.data import plan_data, train_dataset

    assert parse_config(["--data", "x", "--mixup", "0.2"]).mixup == 0.2
    with pytest.raises(CxrError, match="--mixup must be 0 .off. or a positive Beta parameter, got -1.0"):
        parse_config(["--data", "x", "--mixup", "-1"])
    with pytest.raises(CxrError, match="--mixup mixes images and --cache-features trains on features"):
        parse_config(["--data", "x", "--model", "vgg16", "--cache-features", "--freeze-base", "--mixup", "0.2"])
    plan = plan_data(prepared64, 0, 1, 8, "cnn")
    with pytest.raises(CxrError, match="--mixup mixes labels as probabilities: it needs a one-unit sigmoid"):
        train_dataset(prepared64, plan, 8, seed=0, shuffle_buffer=8, augment=False, label_form="index", mixup=0.2)


def test_augment_aspect_widens_the_crops_aspect_range():
    """--augment-aspect R draws the crop's aspect ratio from 1/R..R: a horizontal ramp's slope (2 grey levels
    per column) then shrinks by up to sqrt(R) where the crop is narrower than tall and the image is
    stretched across, against about 5 % with the default 0.9..1.1."""
    from distributed.training.config import parse_config

    still = dict(gamma=(1.0, 1.0), brightness=0.0, contrast=0.0, blur_probability=0.0, noise_probability=0.0,
                 crop_scale=(1.0, 1.0), rotation_degrees=0.0)
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 2, (64, 1))
    batch = tf.constant(np.repeat(ramp[None, :, :, None], 64, axis=0))

    def slopes(policy: AugmentPolicy) -> np.ndarray:
        out = augment_batch(batch, tf.random.Generator.from_seed(0), policy).numpy()
        return np.diff(out[:, 32, 16:48, 0].astype(float), axis=1).mean(axis=1)

    default, wide = AugmentPolicy.with_ranges(), AugmentPolicy.with_ranges(1.5625)
    assert default == AugmentPolicy() and wide.crop_aspect == (0.64, 1.5625)
    narrow = slopes(AugmentPolicy(**still))
    widened = slopes(AugmentPolicy(crop_aspect=wide.crop_aspect, **still))
    assert 2.0 / 1.1 ** 0.5 - 0.05 <= narrow.min() and narrow.max() <= 2.05
    assert widened.min() <= 2.0 / 1.5 ** 0.5 and widened.max() >= 1.95
    assert parse_config(["--data", "x", "--augment", "--augment-aspect", "1.5"]).augment_aspect == 1.5
    for argv, message in [(["--augment", "--augment-aspect", "0.8"], "--augment-aspect must be at least 1"),
                          (["--augment-aspect", "1.5"], "give --augment as well")]:
        with pytest.raises(CxrError, match=message):
            parse_config(["--data", "x", *argv])


def test_augment_zoom_also_shrinks_the_image_inside_black():
    """--augment-zoom Z draws the crop's side from 1/Z..Z of the image's: above 1 the whole image is shown
    smaller, anywhere inside the box, black around it; the default (0.8..1.0) only ever enlarges and never adds
    black, with any aspect ratio."""
    from distributed.training.config import parse_config

    still = dict(gamma=(1.0, 1.0), brightness=0.0, contrast=0.0, blur_probability=0.0, noise_probability=0.0,
                 rotation_degrees=0.0)
    batch = tf.constant(np.full((64, 64, 64, 1), 200, np.uint8))

    def black(policy: AugmentPolicy) -> np.ndarray:
        out = augment_batch(batch, tf.random.Generator.from_seed(0), policy).numpy()
        return (out[..., 0] < 100).mean(axis=(1, 2))

    zoomed = AugmentPolicy.with_ranges(1.5625, 1.25)
    assert zoomed.crop_scale == (0.8, 1.25) and zoomed.crop_aspect == (0.64, 1.5625)
    assert black(AugmentPolicy(crop_aspect=(0.64, 1.5625), **still)).max() == 0  # the default scale: no black
    out = black(AugmentPolicy(crop_scale=(1.25, 1.25), crop_aspect=(1.0, 1.0), **still))
    assert np.allclose(out, 1 - 0.8 ** 2, atol=0.03)  # the image at 0.8 of each side, the rest black
    # a zoom-out and an aspect ratio together: no side of the box passes the zoom's, so the aspect ratio
    # narrows the other side (here to the whole width: 0.8 of the height shown, black above and below only)
    squeezed = black(AugmentPolicy(crop_scale=(1.25, 1.25), crop_aspect=(1.5625, 1.5625), **still))
    assert np.allclose(squeezed, 1 - 0.8, atol=0.03)
    ranged = black(AugmentPolicy(crop_scale=zoomed.crop_scale, **still))
    assert ranged.min() == 0 and ranged.max() > 0.25  # some crops enlarge, some shrink
    assert parse_config(["--data", "x", "--augment", "--augment-zoom", "1.25"]).augment_zoom == 1.25
    for argv, message in [(["--augment", "--augment-zoom", "0.9"], "--augment-zoom must be at least 1"),
                          (["--augment-zoom", "1.25"], "give --augment as well")]:
        with pytest.raises(CxrError, match=message):
            parse_config(["--data", "x", *argv])
