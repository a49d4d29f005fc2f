"""distributed.model.zoo and its registry: one file per model, read by config, tuning and benchmarks."""
from __future__ import annotations

import subprocess

import pytest

from distributed.model import zoo
from distributed.model.heads import ModelError
from distributed.model.registry import ModelSpec, register
from tests.conftest import PYTHON, REPO


def test_the_zoo_names_every_model_file_and_needs_no_tensorflow():
    names = {p.stem for p in (REPO / "distributed" / "model" / "zoo").glob("*.py") if p.stem != "__init__"}
    assert set(zoo.model_names()) == {"cnn", "convnext-tiny", "densenet121", "efficientnetv2-b0", "efficientnetv2-s",
                                      "resnet18-half", "resnet50", "vgg16"}
    assert names == {"cnn", "convnext", "densenet121", "efficientnetv2", "resnet18_half", "resnet50",
                     "vgg16"}  # B0, S share a file
    code = ("import sys; from distributed.model import zoo; from distributed.training import config; "
            "import benchmarks.train; zoo.model_spec('vgg16'); print('tensorflow' in sys.modules)")
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_a_spec_gives_what_config_tuning_and_benchmarks_read():
    from distributed.training.config import TrainConfig
    from optimize.tune.space import parse_space

    for name in zoo.model_names():
        spec = zoo.model_spec(name)
        assert spec.benchmark_size >= spec.min_image_size
        assert parse_space(spec.tune_space, name)  # a valid default search space
        config = TrainConfig(data="prepared/x", model=name)
        assert config.resolved_weights() == ("imagenet" if spec.imagenet else "none")
        assert ("freeze_base" in config.model_options()) == spec.imagenet
    assert zoo.model_spec(" VGG16 ").name == "vgg16"


def test_unknown_names_sizes_and_weights_are_refused_by_name():
    with pytest.raises(ModelError, match="--model 'alexnet' is not a known model; choose one of cnn, convnext-tiny, "
                                         "densenet121, efficientnetv2-b0, efficientnetv2-s, resnet18-half, "
                                         "resnet50, vgg16"):
        zoo.model_spec("alexnet")
    with pytest.raises(ModelError, match="--model cnn needs images of at least 8 px; --data x is 4 px"):
        zoo.check_image_size("cnn", 4, source="--data x")
    with pytest.raises(ModelError, match="no ImageNet weights for --model cnn"):
        zoo.build_model("cnn", 16, weights="imagenet")


def test_a_name_is_registered_once():
    spec = zoo.model_spec("cnn")
    assert register(spec) is spec  # a module imported twice registers the same spec
    with pytest.raises(ValueError, match="two models registered as 'cnn'"):
        register(ModelSpec(**{**spec.__dict__, "summary": "another cnn"}))


# Keras's published parameter counts of each backbone without its top (keras.io/api/applications: the total
# with the ImageNet top minus its classifier Dense of 1,000 units), which the classifier adds its head to.
PUBLISHED = {"densenet121": (8_062_504, 1024), "efficientnetv2-b0": (7_200_312, 1280),
             "efficientnetv2-s": (21_612_360, 1280)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_new_backbones_have_keras_published_parameter_counts_and_a_multilabel_head(name):
    from distributed.model.builders import last_conv_layer_name
    from distributed.model.heads import Head

    with_top, features = PUBLISHED[name]
    backbone = with_top - (features * 1000 + 1000)  # the top is pooling and a 1,000-way Dense
    # one build each (seconds apiece); the binary head on these backbones is the same pooled head with 1 unit
    model = zoo.build_model(name, 32, 14, weights="none", multilabel=True, seed=0)
    assert Head.of_model(model) == Head("multilabel", 14)
    assert model.count_params() == backbone + features * 14 + 14  # the pooled head: dropout, then the logits
    assert last_conv_layer_name(model) in {"relu", "top_activation"}
    with pytest.raises(ModelError, match=f"--model {name} needs images of at least 32 px"):
        zoo.build_model(name, 16, 2, weights="none")


def test_convnext_tiny_computes_keras_own_network_from_its_weights_file(tmp_path):
    """Our flat built-in-layer ConvNeXt-Tiny loaded from Keras's own notop weights file (random weights here,
    ImageNet's for users) gives Keras's pooled features, has Keras's published parameter count (28,589,128
    with its ImageNet top: pooling, a norm, which is part of our head, and a 1,000-way Dense) and saves and
    loads as any other model."""
    import numpy as np

    from distributed.model.builders import last_conv_layer_name
    from distributed.model.heads import Head
    from distributed.model.kerasenv import keras

    reference = keras.applications.ConvNeXtTiny(include_top=False, include_preprocessing=True, pooling="avg",
                                                input_shape=(32, 32, 3), weights=None)
    rng = np.random.default_rng(0)
    # perturbed, so the layer scales (1e-6 at init) and norms carry weight in the comparison
    reference.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in reference.get_weights()])
    reference.save_weights(tmp_path / "convnext_tiny_notop.h5")
    model = zoo.build_model("convnext-tiny", 32, 3, weights=str(tmp_path / "convnext_tiny_notop.h5"),
                            fine_tune_from="convnext_tiny_downsampling_layernorm_2", multilabel=True)
    assert Head.of_model(model) == Head("multilabel", 3)
    assert model.count_params() == 28_589_128 - (768 * 1000 + 1000) + 768 * 3 + 3
    assert last_conv_layer_name(model) == "convnext_tiny_stage_3_block_2_add"
    images = rng.integers(0, 256, (3, 32, 32, 1)).astype("uint8")
    features = keras.Model(model.input, model.get_layer("head_layernorm").output)(images).numpy()
    expected = reference(np.repeat(images.astype("float32"), 3, axis=-1)).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-4 * np.abs(expected).max())
    assert not model.get_layer("convnext_tiny_stage_2_block_8_add").trainable
    assert model.get_layer("convnext_tiny_downsampling_conv_2").trainable
    model.save_weights(tmp_path / "ours.h5")
    again = zoo.build_model("convnext-tiny", 32, 3, weights=str(tmp_path / "ours.h5"), multilabel=True)
    np.testing.assert_array_equal(again.predict(images, verbose=0), model.predict(images, verbose=0))
    with pytest.raises(ModelError, match="nor is it Keras's ConvNeXt-Tiny notop weights file"):
        zoo.build_model("convnext-tiny", 32, 2, weights=str(tmp_path / "ours.h5"))  # a 3-finding file
    with pytest.raises(ModelError, match="--model convnext-tiny needs images of at least 32 px"):
        zoo.build_model("convnext-tiny", 16, 2, weights="none")


def test_resnet18_half_is_resnet18s_layout_at_half_width_and_each_block_starts_as_the_identity(tmp_path):
    """He et al.'s basic blocks (2, 2, 2, 2) at 32-64-128-256 channels behind a stride-2 stem: a 64 px image
    ends at 4 x 4, shortcuts are projected only where a stage halves the side, and each block's last
    BatchNormalization starts at zero scale, so at initialisation a block passes its input through."""
    import numpy as np

    from distributed.model.builders import last_conv_layer_name
    from distributed.model.heads import Head
    from distributed.model.kerasenv import keras

    model = zoo.build_model("resnet18-half", 64, 2, weights="none", seed=0)
    assert Head.of_model(model) == Head("binary", 1)
    assert model.count_params() == 2_799_521
    assert last_conv_layer_name(model) == "stage4_block2_out"
    assert model.get_layer("stage4_block2_out").output.shape[1:] == (4, 4, 256)
    projected = sorted(layer.name for layer in model.layers if layer.name.endswith("_proj_conv"))
    assert projected == ["stage2_block1_proj_conv", "stage3_block1_proj_conv", "stage4_block1_proj_conv"]
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1)).astype("uint8")
    taps = keras.Model(model.input, [model.get_layer("stem_relu").output,
                                     model.get_layer("stage1_block2_out").output])
    stem, after_two_blocks = (t.numpy() for t in taps(images, training=False))
    np.testing.assert_allclose(after_two_blocks, stem, atol=1e-6)
    assert np.abs(stem).max() > 0
    # trains, and a weights file saved from it builds the same network
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=Head.of_model(model).loss())
    assert np.isfinite(model.train_on_batch(images, np.array([0, 1])))
    model.save_weights(tmp_path / "resnet.h5")
    again = zoo.build_model("resnet18-half", 64, 2, weights=str(tmp_path / "resnet.h5"))
    np.testing.assert_array_equal(again.predict(images, verbose=0), model.predict(images, verbose=0))
    assert zoo.build_model("resnet18-half", 16, 14, weights="none", multilabel=True).output_shape == (None, 14)
    with pytest.raises(ModelError, match="--model resnet18-half needs images of at least 16 px"):
        zoo.build_model("resnet18-half", 8, 2, weights="none")
