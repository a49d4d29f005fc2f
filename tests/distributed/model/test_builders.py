"""distributed.model.builders: the thesis's parameter counts, flat self-contained graphs, heads, weights,
freezing, errors.

Real TensorFlow on CPU. The 224 px models are built once each (weights=None); everything else is built
small (16-64 px) so the file stays fast.
"""
from __future__ import annotations

import numpy as np
import pytest

from distributed.model.kerasenv import keras
from distributed.model import builders as M
from distributed.model.builders import ModelError
from distributed.model.zoo import build_model, min_image_size, model_names
from distributed.model.zoo.cnn import build_thesis_cnn
from distributed.model.heads import Head
from cxrscale.errors import CxrError

VGG16_TABLE1_TOTAL = 40_407_874
VGG16_TABLE1_BASE = 14_714_688
RESNET50_TABLE2_TOTAL = 26_211_201
RESNET50_TABLE2_BASE = 23_587_712
VGG16_FROZEN_TRAINABLE = 25_693_186  # head_dense_1024 25,691,136 + logits 2,050
BLOCK5_CONV = 2_359_808


def _uint8_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def _trainable_count(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _backbone_count(model) -> int:
    return int(sum(layer.count_params() for layer in M.backbone_layers(model)))


@pytest.fixture(scope="module")
def vgg224():
    return build_model("vgg16", 224, weights="none", seed=0)


@pytest.fixture(scope="module")
def resnet224():
    return build_model("resnet50", 224, weights="none", seed=0)


@pytest.fixture(scope="module")
def cnn64():
    return build_model("cnn", 64, seed=0)


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --- the thesis's tables -----------------------------------------------------------------------------------

def test_vgg16_at_224_has_exactly_the_thesis_table1_parameters(vgg224):
    assert vgg224.count_params() == VGG16_TABLE1_TOTAL
    assert _backbone_count(vgg224) == VGG16_TABLE1_BASE
    assert vgg224.get_layer("head_dense_1024").count_params() == 25_691_136
    assert vgg224.get_layer("logits").count_params() == 2_050
    assert vgg224.output_shape == (None, 2)  # the thesis's 2-unit softmax


def test_resnet50_at_224_has_exactly_the_thesis_table2_parameters(resnet224):
    assert resnet224.count_params() == RESNET50_TABLE2_TOTAL
    assert _backbone_count(resnet224) == RESNET50_TABLE2_BASE
    assert resnet224.get_layer("head_dense_1024").count_params() == 2_098_176
    assert resnet224.get_layer("head_dense_512").count_params() == 524_800
    assert resnet224.get_layer("logits").count_params() == 513
    assert resnet224.output_shape == (None, 1)  # the thesis's 1-unit sigmoid


def test_thesis_cnn_is_small_and_its_size_does_not_depend_on_the_image_side():
    at_128 = build_thesis_cnn(128)
    at_150 = build_thesis_cnn()
    assert at_150.input_shape == (None, 150, 150, 1)
    assert at_128.count_params() == at_150.count_params() == 404_033
    kinds = [type(layer).__name__ for layer in at_150.layers]
    assert kinds.count("Conv2D") == kinds.count("BatchNormalization") == kinds.count("ReLU")
    assert [at_150.get_layer(f"block{b}_conv1").filters for b in (1, 2)] == [64, 128]
    assert at_150.get_layer("block1_dropout").rate == pytest.approx(0.2)


# --- graph shape: flat, weight-free built-in preprocessing, float32 output -----------------------------------

def test_models_are_flat_and_use_only_builtin_layers(vgg224, resnet224, cnn64):
    for model in (vgg224, resnet224, cnn64):
        assert not [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
        assert not [layer.name for layer in model.layers if isinstance(layer, keras.layers.Lambda)]
        assert {type(layer).__module__.split(".")[0] for layer in model.layers} == {"tf_keras"}
        assert model.input.dtype == "uint8" and model.input_shape[-1] == 1
        preprocessing = [layer for layer in model.layers if layer.name in M.PREPROCESSING_LAYER_NAMES]
        assert preprocessing and sum(layer.count_params() for layer in preprocessing) == 0


@pytest.mark.parametrize("which, preprocess", [
    ("vgg", keras.applications.vgg16.preprocess_input),
    ("resnet", keras.applications.resnet50.preprocess_input),
])
def test_in_graph_normalisation_equals_keras_preprocess_input(which, preprocess, vgg224, resnet224):
    model = vgg224 if which == "vgg" else resnet224
    grey = _uint8_images(3, 224, seed=5)
    in_graph = keras.Model(model.input, model.get_layer("imagenet_caffe_norm").output)(grey).numpy()
    expected = preprocess(np.repeat(grey, 3, axis=-1).astype("float32"))
    assert in_graph.shape == (3, 224, 224, 3)
    np.testing.assert_allclose(in_graph, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scaling, layer, preprocess", [
    ("imagenet-torch", "imagenet_torch_norm", keras.applications.densenet.preprocess_input),
    ("pixels", "grey_to_rgb", lambda x: x),
])
def test_every_imagenet_input_frame_equals_its_keras_preprocess_input(scaling, layer, preprocess):
    x, image = M.imagenet_input(16, scaling)
    grey = _uint8_images(2, 16, seed=7)
    in_graph = keras.Model(image, x)(grey).numpy()
    np.testing.assert_allclose(in_graph, preprocess(np.repeat(grey, 3, axis=-1).astype("float32")), atol=1e-4)
    with pytest.raises(ModelError, match="unknown input scaling 'inception'"):
        M.imagenet_input(16, "inception")


def test_cnn_scales_pixels_to_unit_range(cnn64):
    grey = _uint8_images(2, 64, seed=6)
    scaled = keras.Model(cnn64.input, cnn64.get_layer("pixels_to_unit").output)(grey).numpy()
    np.testing.assert_allclose(scaled, grey.astype("float32") / 255.0, rtol=1e-6)


# --- heads and outputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, size, num_classes, units, loss", [
    ("vgg16", 32, 2, 2, keras.losses.SparseCategoricalCrossentropy),
    ("resnet50", 32, 2, 1, keras.losses.BinaryCrossentropy),
    ("cnn", 16, 2, 1, keras.losses.BinaryCrossentropy),
    ("vgg16", 32, 3, 3, keras.losses.SparseCategoricalCrossentropy),
    ("resnet50", 32, 3, 3, keras.losses.SparseCategoricalCrossentropy),
    ("cnn", 16, 3, 3, keras.losses.SparseCategoricalCrossentropy),
])
def test_outputs_are_class_probabilities(name, size, num_classes, units, loss):
    model = build_model(name, size, num_classes, seed=1)
    raw = model.predict(_uint8_images(4, size), verbose=0)
    assert raw.shape == (4, units) and raw.dtype == np.float32
    head = Head.of_model(model)
    assert head.units == units and head.binary == (num_classes == 2)
    probs = head.probabilities(raw)
    assert probs.shape == (4, num_classes)
    assert np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert model.get_layer("predictions").get_config()["activation"] == ("sigmoid" if units == 1 else "softmax")
    assert isinstance(head.loss(), loss)


def test_last_conv_layer_is_found_for_every_model(vgg224, resnet224, cnn64):
    assert M.last_conv_layer_name(vgg224) == "block5_conv3"
    assert M.last_conv_layer_name(resnet224) == "conv5_block3_out"
    assert M.last_conv_layer_name(cnn64) == "block3_relu1"
    assert len(cnn64.get_layer(M.last_conv_layer_name(cnn64)).output.shape) == 4


# --- freezing and fine-tuning --------------------------------------------------------------------------------

def test_vgg16_frozen_base_trains_only_the_head():
    frozen = build_model("vgg16", 224, freeze_base=True)
    assert frozen.count_params() == VGG16_TABLE1_TOTAL
    assert _trainable_count(frozen) == VGG16_FROZEN_TRAINABLE


def test_fine_tune_from_unfreezes_that_layer_and_later_ones():
    model = build_model("vgg16", 224, fine_tune_from="block5_conv1")
    assert _trainable_count(model) == VGG16_FROZEN_TRAINABLE + 3 * BLOCK5_CONV
    assert not model.get_layer("block4_conv3").trainable and model.get_layer("block5_conv1").trainable
    M.set_backbone_trainable(model)  # neither option: everything trainable again
    assert _trainable_count(model) == VGG16_TABLE1_TOTAL


def test_frozen_resnet50_batchnorm_runs_in_inference_mode():
    images, labels = _uint8_images(4, 32, seed=2), np.array([0, 1, 0, 1])
    frozen = build_model("resnet50", 32, freeze_base=True, seed=2)
    assert _trainable_count(frozen) == 2_098_176 + 524_800 + 513
    features = keras.Model(frozen.input, frozen.get_layer("conv5_block3_out").output)
    np.testing.assert_allclose(features(images, training=True).numpy(), features(images, training=False).numpy(),
                               rtol=1e-5, atol=1e-5)
    bn = frozen.get_layer("conv1_bn")
    before = [w.numpy().copy() for w in bn.weights]
    frozen.compile(optimizer=keras.optimizers.SGD(0.1), loss=Head.of_model(frozen).loss())
    frozen.train_on_batch(images, labels)
    for was, now in zip(before, bn.weights):
        np.testing.assert_array_equal(was, now.numpy())  # moving statistics untouched by training

    trainable = build_model("resnet50", 32, seed=2)  # control: an unfrozen BN uses batch statistics
    features = keras.Model(trainable.input, trainable.get_layer("conv5_block3_out").output)
    assert not np.allclose(features(images, training=True).numpy(), features(images, training=False).numpy())


# --- weights -------------------------------------------------------------------------------------------------

def _perturbed(model, seed: int):
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


@pytest.mark.parametrize("filename", ["weights.h5", "ckpt/weights", "weights.weights.h5"])
def test_weights_file_round_trip(tmp_path, filename):
    original = _perturbed(build_model("cnn", 16, seed=3), seed=3)
    path = tmp_path / filename
    original.save_weights(str(path))
    rebuilt = build_model("cnn", 16, weights=str(path), seed=4)
    for a, b in zip(original.get_weights(), rebuilt.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_backbone_only_h5_loads_into_the_backbone_by_name(tmp_path):
    notop = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    _perturbed(notop, seed=7).save_weights(str(tmp_path / "vgg16_notop.h5"))
    model = build_model("vgg16", 32, weights=str(tmp_path / "vgg16_notop.h5"), seed=8)
    weighted = [layer for layer in notop.layers if layer.weights]
    assert len(weighted) == 13
    for layer in weighted:
        for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("filename", ["cnn.h5", "ckpt/cnn"])
def test_weights_of_another_architecture_are_refused(tmp_path, filename):
    path = tmp_path / filename
    build_model("cnn", 16, seed=3).save_weights(str(path))
    with pytest.raises(ModelError, match=r"--weights .*does not fit"):
        build_model("vgg16", 32, weights=str(path))


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(ModelError, match=r"--weights .*no such file"):
        build_model("resnet50", 32, weights=str(tmp_path / "nope.h5"))


def test_imagenet_weights_are_requested_from_keras_applications(monkeypatch):
    seen = []
    real_vgg16 = keras.applications.VGG16

    def recording_vgg16(**kwargs):
        seen.append(kwargs["weights"])
        return real_vgg16(**{**kwargs, "weights": None})  # no internet here: build without downloading

    monkeypatch.setattr(keras.applications, "VGG16", recording_vgg16)
    build_model("vgg16", 32, weights="imagenet")
    assert seen == ["imagenet"]

    def offline_vgg16(**kwargs):
        raise Exception("URL fetch failure on https://example.invalid/vgg16_notop.h5")

    monkeypatch.setattr(keras.applications, "VGG16", offline_vgg16)
    with pytest.raises(ModelError, match="--weights imagenet"):
        build_model("vgg16", 32, weights="imagenet")


def test_same_seed_gives_the_same_model():
    a, b, c = (build_model("cnn", 16, seed=s).get_weights() for s in (11, 11, 12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


# --- user mistakes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="inception", image_size=64),
     r"--model 'inception' is not a known model; choose one of cnn, convnext-tiny, densenet121, "
     r"efficientnetv2-b0, efficientnetv2-s, resnet18-half, resnet50, vgg16"),
    (dict(name="vgg16", image_size=16), r"--model vgg16 needs images of at least 32 px; the data is 16 px"),
    (dict(name="resnet50", image_size=16), r"--model resnet50 needs images of at least 32 px; the data is 16 px"),
    (dict(name="cnn", image_size=4), r"--model cnn needs images of at least 8 px"),
    (dict(name="vgg16", image_size=32, fine_tune_from="block9_conv1"),
     r"--fine-tune-from 'block9_conv1'.*block5_conv1"),
    (dict(name="cnn", image_size=16, num_classes=1), r"at least 2 classes"),
    (dict(name="cnn", image_size=16, weights="imagenet"), r"--weights imagenet.*--model cnn"),
])
def test_user_mistakes_raise_model_error_naming_the_option(kwargs, message):
    with pytest.raises(ModelError, match=message) as caught:
        build_model(**kwargs)
    assert isinstance(caught.value, CxrError)


def test_min_image_size():
    assert {n: min_image_size(n) for n in model_names()} == {"cnn": 8, "convnext-tiny": 32, "densenet121": 32,
                                                             "efficientnetv2-b0": 32, "efficientnetv2-s": 32,
                                                             "resnet18-half": 16, "resnet50": 32, "vgg16": 32}
    build_model("cnn", min_image_size("cnn"))  # the minimum itself builds
    with pytest.raises(ModelError):
        min_image_size("alexnet")


# --- mixed precision -----------------------------------------------------------------------------------------

# a training step in bfloat16 on the CNN; ResNet50's (about 10 s on 2 cores) adds nothing the CNN's
# BatchNormalization layers do not already exercise, so for it the dtypes and a prediction are checked
@pytest.mark.parametrize("name, size, first_conv, train", [("cnn", 64, "block1_conv1", True),
                                                           ("resnet50", 32, "conv1_conv", False)])
def test_mixed_bfloat16_computes_in_bfloat16_and_outputs_float32(bfloat16_policy, name, size, first_conv, train):
    model = build_model(name, size, seed=9)
    assert model.get_layer(first_conv).compute_dtype == "bfloat16"
    assert model.output.dtype == "float32"
    if train:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=Head.of_model(model).loss())
        loss = model.train_on_batch(_uint8_images(4, size, seed=9), np.array([0, 1, 1, 0]))
        assert np.isfinite(loss)
    assert model.predict(_uint8_images(2, size), verbose=0).dtype == np.float32


# --- export --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, size, filename", [("vgg16", 32, "saved_model"), ("cnn", 32, "model.keras")])
def test_saved_model_reloads_without_custom_objects_and_predicts_the_same(tmp_path, name, size, filename):
    model = build_model(name, size, seed=10)
    images = _uint8_images(3, size, seed=10)
    expected = model.predict(images, verbose=0)
    model.save(str(tmp_path / filename))
    reloaded = keras.models.load_model(str(tmp_path / filename), compile=False)
    assert reloaded.input.dtype == "uint8"
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, rtol=1e-6, atol=1e-6)


def test_batchnorm_recalibration_sets_the_average_batch_statistics_with_dropout_off():
    inputs = keras.Input((4, 4, 2))
    dropout = keras.layers.Dropout(0.5)
    norm = keras.layers.BatchNormalization(momentum=0.99)
    model = keras.Model(inputs, norm(dropout(inputs)))
    norm.moving_mean.assign([100.0, 100.0])  # statistics of some other network, as after pruning
    norm.moving_variance.assign([50.0, 50.0])
    rng = np.random.default_rng(0)
    images = (rng.normal(size=(256, 4, 4, 2)) * [1.0, 2.0] + [3.0, -2.0]).astype("float32")

    assert M.recalibrate_batchnorm(model, images, batch_size=64) == 1
    batches = images.reshape(4, 64, 4, 4, 2)
    np.testing.assert_allclose(norm.moving_mean.numpy(), images.mean(axis=(0, 1, 2)), atol=1e-4)
    # the mean of the four batch variances; with dropout on (x2 scaling of kept values) it would be far larger
    np.testing.assert_allclose(norm.moving_variance.numpy(), batches.var(axis=(1, 2, 3)).mean(axis=0), rtol=1e-2)
    assert norm.momentum == 0.99 and dropout.rate == 0.5
    normalised = model(images, training=False).numpy()
    np.testing.assert_allclose(normalised.mean(axis=(0, 1, 2)), [0.0, 0.0], atol=0.02)
    np.testing.assert_allclose(normalised.std(axis=(0, 1, 2)), [1.0, 1.0], atol=0.02)
