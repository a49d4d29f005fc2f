"""ResNet50 (He et al. 2016) with the thesis's head: the ImageNet backbone of keras.applications, global
average pooling, dense 1024 and 512, and one sigmoid unit for two classes (its Table 2)."""
from __future__ import annotations

from distributed.model.heads import Head
from distributed.model.registry import COMMON_TUNE_SPACE, ModelSpec, register


def build_resnet50_classifier(image_size: int, num_classes: int = 2, *, weights: str = "none",
                              dropout: float = 0.5, l2: float = 1e-4, freeze_base: bool = False,
                              fine_tune_from: str | None = None, multilabel: bool = False):
    """The thesis's ResNet50 transfer model (its Table 2), on uint8 greyscale input.

    image (s, s, 1) uint8 -> pixels_to_float -> grey_to_rgb (s, s, 3) -> imagenet_caffe_norm
    -> ResNet50 base without top (conv1_pad .. conv5_block3_out: (s/32, s/32, 2048))
    -> head_global_avg_pool (2048) -> head_dense_1024 (ReLU, L2) -> head_dropout_1
    -> head_dense_512 (ReLU, L2) -> head_dropout_2 -> logits (1 or K) -> predictions (sigmoid or softmax).

    With K = 2 the output is one sigmoid unit, P(class 1), as in the thesis; `multilabel`: K sigmoid units.
    26,211,201 parameters at any image size (base 23,587,712 of which 53,120 are BatchNormalization moving
    statistics, dense layers 2,098,176 + 524,800 + 513); the preprocessing layers add none.
    """
    from distributed.model.builders import l2_regularizer, transfer_classifier
    from distributed.model.kerasenv import keras

    def head(base_output):
        y = keras.layers.GlobalAveragePooling2D(name="head_global_avg_pool")(base_output)
        y = keras.layers.Dense(1024, activation="relu", kernel_regularizer=l2_regularizer(l2),
                               name="head_dense_1024")(y)
        y = keras.layers.Dropout(dropout, name="head_dropout_1")(y)
        y = keras.layers.Dense(512, activation="relu", kernel_regularizer=l2_regularizer(l2), name="head_dense_512")(y)
        y = keras.layers.Dropout(dropout, name="head_dropout_2")(y)
        return Head.for_classes(num_classes, multilabel=multilabel).output(y, l2=l2)

    return transfer_classifier(SPEC, keras.applications.ResNet50, head, image_size, num_classes, weights,
                               freeze_base, fine_tune_from, multilabel)


# Downsamples by 32 (five stride-2 stages): below 32 px the last stage would get an empty map.
SPEC = register(ModelSpec(
    name="resnet50", summary="ResNet50 on ImageNet weights with the thesis's 1024-512 head (sigmoid for two classes)",
    build=build_resnet50_classifier, min_image_size=32, default_dropout=0.5, imagenet=True,
    input_scaling="imagenet-caffe",
    tune_space={"lr": {"loguniform": [1e-5, 1e-3], "grid": [3e-5, 1e-4]},
                "batch_size": {"choice": [16, 32], "grid": [32]}, **COMMON_TUNE_SPACE,
                "fine_tune_from": {"choice": ["conv5_block1_1_conv", "conv4_block1_1_conv", None],
                                   "grid": ["conv5_block1_1_conv"]}},
    benchmark_size=224))
