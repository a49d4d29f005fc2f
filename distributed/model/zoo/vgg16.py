"""VGG16 (Simonyan & Zisserman 2015) with the thesis's head: the ImageNet backbone of keras.applications,
a 1024-unit dense head and a 2-unit softmax, as the thesis trained it (its Table 1)."""
from __future__ import annotations

from distributed.model.heads import Head
from distributed.model.registry import COMMON_TUNE_SPACE, ModelSpec, register


def build_vgg16_classifier(image_size: int, num_classes: int = 2, *, weights: str = "none",
                           dropout: float = 0.5, l2: float = 1e-4, freeze_base: bool = False,
                           fine_tune_from: str | None = None, multilabel: bool = False):
    """The thesis's VGG16 transfer model (its Table 1), on uint8 greyscale input.

    image (s, s, 1) uint8 -> pixels_to_float -> grey_to_rgb (s, s, 3) -> imagenet_caffe_norm
    -> VGG16 base without top (block1_conv1 .. block5_pool: (s/32, s/32, 512))
    -> head_flatten -> head_dense_1024 (ReLU, L2) -> head_dropout -> logits (K) -> predictions (softmax).

    With K = 2 this is a 2-unit softmax as in the thesis; `multilabel`: K sigmoid units. At 224 px:
    40,407,874 parameters (base 14,714,688,
    head_dense_1024 25,691,136, logits 2,050); the preprocessing layers add none. The Flatten head makes
    the parameter count grow with the image side ((s/32)^2 * 512 * 1024 for the first dense layer).
    """
    from distributed.model.builders import l2_regularizer, transfer_classifier
    from distributed.model.kerasenv import keras

    def head(base_output):
        y = keras.layers.Flatten(name="head_flatten")(base_output)
        y = keras.layers.Dense(1024, activation="relu", kernel_regularizer=l2_regularizer(l2),
                               name="head_dense_1024")(y)
        y = keras.layers.Dropout(dropout, name="head_dropout")(y)
        return Head.for_classes(num_classes, two_unit_softmax=True, multilabel=multilabel).output(y, l2=l2)

    return transfer_classifier(SPEC, keras.applications.VGG16, head, image_size, num_classes, weights, freeze_base,
                               fine_tune_from, multilabel)


# Downsamples by 32 (five stride-2 stages): below 32 px the last stage would get an empty map.
SPEC = register(ModelSpec(
    name="vgg16", summary="VGG16 on ImageNet weights with the thesis's Flatten-1024 head (2-unit softmax)",
    build=build_vgg16_classifier, min_image_size=32, default_dropout=0.5, imagenet=True,
    input_scaling="imagenet-caffe",
    # fine_tune_from: how much of the backbone trains: the last block, the last two, or all of it (null)
    tune_space={"lr": {"loguniform": [1e-5, 1e-3], "grid": [3e-5, 1e-4]},
                "batch_size": {"choice": [16, 32], "grid": [32]}, **COMMON_TUNE_SPACE,
                "fine_tune_from": {"choice": ["block5_conv1", "block4_conv1", None], "grid": ["block5_conv1"]}},
    benchmark_size=224, benchmark_args=("--freeze-base",)))
