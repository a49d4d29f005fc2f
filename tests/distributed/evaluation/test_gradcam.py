"""distributed.evaluation.gradcam: a trained CNN's Grad-CAM lands on the evidence; shapes, classes, errors, overlay.

Real TensorFlow on CPU. One thesis CNN is trained once (module fixture, ~15-30 s) on synthetic 64 px images
whose class is decided by a bright square in a known place (class 1: the square is there; class 0: not).
"""
from __future__ import annotations

import numpy as np
import pytest

from distributed.model.kerasenv import keras
from distributed.evaluation.gradcam import gradcam, overlay
from distributed.model.builders import ModelError, last_conv_layer_name
from distributed.model.zoo import build_model, min_image_size
from distributed.model.heads import Head

SIZE, PATCH = 64, 14
PLACE, JITTER = (14, 30), 6  # the square's top-left corner (y, x), give or take JITTER pixels


def patch_images(n: int, seed: int):
    """uint8 (n, 64, 64, 1) noisy grey images with soft blobs; class 1 also holds a bright 14 px square near
    PLACE. Returns images, labels and the square corners (those of class 0 images are where it would be)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, labels, corners = np.empty((n, SIZE, SIZE, 1), np.uint8), rng.integers(0, 2, n), []
    for i in range(n):
        img = 110 + rng.normal(0, 18, (SIZE, SIZE))
        for _ in range(rng.integers(3, 7)):  # dark and bright Gaussian blobs anywhere
            cy, cx, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(3, 9)
            img += rng.uniform(-50, 60) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        y, x = np.array(PLACE) + rng.integers(-JITTER, JITTER + 1, 2)
        if labels[i] == 1:
            img[y:y + PATCH, x:x + PATCH] = 215 + rng.normal(0, 12, (PATCH, PATCH))
        images[i, ..., 0] = np.clip(np.round(img), 0, 255)
        corners.append((y, x))
    return images, labels, np.array(corners)


def train_patch_cnn(max_epochs: int = 12) -> keras.Model:
    """The thesis CNN trained on patch_images until its inference-mode validation accuracy reaches 0.98."""
    model = build_model("cnn", SIZE, 2, weights="none", dropout=0.1, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=Head.of_model(model).loss(), metrics=["accuracy"])
    x_train, y_train, _ = patch_images(320, seed=1)
    x_val, y_val, _ = patch_images(96, seed=2)
    stop = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", logs["val_accuracy"] >= 0.98))
    model.fit(x_train, y_train, batch_size=16, epochs=max_epochs, validation_data=(x_val, y_val),
              callbacks=[stop], verbose=0)
    return model


def patch_box_shares(maps: np.ndarray, corners: np.ndarray, margin: int):
    """Per map, for the patch box grown by `margin` px: its share of all heat, its share of the hot pixels
    (heat >= 0.5), its area fraction, and whether the hottest pixel lies in it."""
    rows = []
    for heat, (y, x) in zip(maps, corners):
        box = np.zeros(heat.shape, bool)
        box[max(0, y - margin):y + PATCH + margin, max(0, x - margin):x + PATCH + margin] = True
        hot = heat >= 0.5
        rows.append((heat[box].sum() / heat.sum(), (hot & box).sum() / hot.sum(), box.mean(),
                     box.flat[heat.argmax()]))
    return np.array(rows, np.float64).T


@pytest.fixture(scope="module")
def trained():
    model = train_patch_cnn()
    images, labels, corners = patch_images(96, seed=3)
    return model, images, labels, corners


def test_trained_cnn_heat_sits_on_the_patch(trained):
    """For the images the CNN calls class 1, most of the class-1 heat lies on the square that decides it."""
    model, images, labels, corners = trained
    predicted = (model.predict(images, verbose=0)[:, 0] > 0.5).astype(int)
    assert (predicted == labels).mean() >= 0.9
    positive = (predicted == 1) & (labels == 1)
    maps = gradcam(model, images[positive])  # the predicted class, at the default layer block3_relu1
    cell = SIZE // model.get_layer(last_conv_layer_name(model)).output.shape[1]  # 64 / 16 = 4 px
    mass, hot, area, peak = patch_box_shares(maps, corners[positive], margin=cell)
    print(f"heat mass on the square {mass.mean():.2f} (area {area.mean():.2f}), hot {hot.mean():.2f}, "
          f"peak {peak.mean():.2f}")
    assert mass.mean() > 0.5, mass.mean()
    assert peak.mean() >= 0.9, peak.mean()
    assert hot.mean() > 0.7, hot.mean()


def test_default_class_and_inference_mode(trained):
    model, images, _, _ = trained
    batch = images[:6]
    maps = gradcam(model, batch, batch_size=4)
    assert maps.shape == (6, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1.0)
    predicted = (model.predict(batch, verbose=0)[:, 0] > 0.5).astype(int)
    np.testing.assert_allclose(maps, gradcam(model, batch, predicted), atol=1e-6)
    np.testing.assert_allclose(maps, gradcam(model, batch), atol=1e-6)  # no dropout: training=False


def test_binary_head_class_zero_is_the_negated_logit():
    # At block1_relu1 the feature map has the input's size, so upsampling is the identity. The class-0 score
    # is -z, so its weights are the class-1 weights negated: the two maps are ReLU(s) and ReLU(-s).
    model = build_model("cnn", 16, 2, weights="none", seed=1)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    one = gradcam(model, images, 1, layer="block1_relu1")
    zero = gradcam(model, images, np.zeros(4, int), layer="block1_relu1")
    assert np.allclose(one.max(axis=(1, 2)), 1) and np.allclose(zero.max(axis=(1, 2)), 1)
    assert np.all(one * zero == 0)  # disjoint supports, so the maps differ
    mixed = gradcam(model, images, [1, 0, 1, 0], layer="block1_relu1")
    np.testing.assert_allclose(mixed[::2], one[::2], atol=1e-6)
    np.testing.assert_allclose(mixed[1::2], zero[1::2], atol=1e-6)


def test_all_zero_feature_map_gives_zero_maps_not_nan():
    model = build_model("cnn", 16, 2, weights="none", seed=1)
    bn = model.get_layer("block3_bn1")
    bn.set_weights([np.zeros_like(w) if i < 2 else w for i, w in enumerate(bn.get_weights())])  # gamma = beta = 0
    maps = gradcam(model, np.full((2, 16, 16, 1), 100, np.uint8))
    assert maps.shape == (2, 16, 16) and np.all(maps == 0)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_model("cnn", 16, 2, weights="none", seed=1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("block3_relu1").output.dtype != "float32"
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    for class_index in (0, 1):
        maps = gradcam(model, images, class_index)
        assert maps.dtype == np.float32 and np.isfinite(maps).all() and np.allclose(maps.max(axis=(1, 2)), 1)


def test_layer_choice_and_errors():
    model = build_model("cnn", 16, 3, weights="none", seed=1)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    assert last_conv_layer_name(model) == "block3_relu1"
    np.testing.assert_allclose(gradcam(model, images, 2), gradcam(model, images, 2, layer="block3_relu1"))
    assert gradcam(model, images, [0, 2], layer="block2_conv1").shape == (2, 16, 16)
    with pytest.raises(ModelError, match="'block9_relu1'.*block3_relu1.*block3_conv1"):
        gradcam(model, images, layer="block9_relu1")
    with pytest.raises(ModelError, match="'logits'.*4-D"):
        gradcam(model, images, layer="logits")
    with pytest.raises(ModelError, match="no gradient.*'pixels_to_unit'"):  # before any weight: uint8 input
        gradcam(model, images, layer="pixels_to_unit")
    with pytest.raises(ValueError, match=r"uint8 images of shape \(n, 16, 16, 1\); got float32"):
        gradcam(model, images.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(n, 16, 16, 1\); got uint8 \(2, 32, 32, 1\)"):
        gradcam(model, np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="class_index"):
        gradcam(model, images, 3)
    with pytest.raises(ValueError, match="class_index"):
        gradcam(model, images, [0, 1, 2])


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_backbone_classifiers(name):
    size = min_image_size(name)
    model = build_model(name, size, 2, weights="none", seed=0)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 1), dtype=np.uint8)
    for class_index in (None, 0, 1):
        maps = gradcam(model, images, class_index)
        assert maps.shape == (2, size, size) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_overlay():
    grey = np.full((8, 10), 128, np.uint8)
    for image in (grey, grey[..., None]):
        plain = overlay(image, np.zeros((8, 10)))
        assert plain.shape == (8, 10, 3) and plain.dtype == np.uint8
        assert np.all(plain == 128)  # zero heat leaves the grey image
    hot = overlay(grey, np.ones((8, 10)), alpha=0.5)
    red, green, blue = hot[0, 0].astype(int)
    assert red > green + 40 and red > blue + 40  # JET's top is red once converted from OpenCV's BGR
    with pytest.raises(ValueError, match="same size"):
        overlay(grey, np.zeros((10, 8)))
