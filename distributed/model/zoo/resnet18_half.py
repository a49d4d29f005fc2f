"""A ResNet-18-style network sized for small radiographs on a CPU, trained from random weights: He et al.
(2016)'s basic-block layout (2, 2, 2, 2 blocks) at half its widths (32, 64, 128, 256) behind a 3x3 stride-2
stem, so that a 64 px image ends at 4 x 4 with every output seeing the whole image. Its stages run at a
quarter of the CNN's pixels with half its channels, so at 64 px it costs about the thesis CNN's
multiply-adds while stacking seventeen 3x3 convolutions where the CNN has three."""
from __future__ import annotations

from distributed.model.registry import COMMON_TUNE_SPACE, ModelSpec, check_image_size, register

WIDTHS = (32, 64, 128, 256)
BLOCKS = (2, 2, 2, 2)
BN_MOMENTUM = 0.9  # as the CNN's (zoo/cnn.py): Keras's 0.99 is too slow for the few steps of a CPU run


def build_small_resnet(image_size: int = 64, num_classes: int = 2, *, dropout: float = 0.2, l2: float = 1e-4,
                       multilabel: bool = False):
    """The network on uint8 (s, s, 1) radiographs.

        image                  (s, s, 1) uint8
        pixels_to_unit         Rescaling 1/255 -> float32 in [0, 1] (as the CNN)
        stem_conv, stem_bn,    Conv2D 32 3x3 stride 2, BatchNormalization, ReLU -> (s/2, s/2, 32)
        stem_relu
        stage{i}_block{j}      i = 1..4 at 32, 64, 128, 256 channels, 2 basic blocks each; the first block of
                               stages 2-4 halves the side (stride 2) and projects its shortcut with a 1x1
                               conv and BN (He et al.'s option B) -> (s/16, s/16, 256)
        head_global_avg_pool   GlobalAveragePooling2D -> (256,)
        head_dropout           Dropout(dropout)
        logits, predictions    as every model's head (distributed.model.heads)

    Basic block: conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN, added to the shortcut, then ReLU ({name}_out, the
    Grad-CAM target of the last block). The second BN of each block starts at zero scale (Goyal et al.
    2017), so each block starts as the identity and the deep network trains like a shallow one at first.
    2,799,521 parameters with a binary head (2,794,721 trainable), at any side.
    """
    from distributed.model.builders import INPUT_NAME, pooled_head
    from distributed.model.heads import Head
    from distributed.model.kerasenv import keras

    check_image_size(SPEC, image_size)
    Head.for_classes(num_classes, multilabel=multilabel)  # refuses a count no head can take, before the network

    def conv_bn(x, width: int, kernel: int, stride: int, name: str, zero_scale: bool = False):
        x = keras.layers.Conv2D(width, kernel, strides=stride, padding="same", use_bias=False,
                                kernel_initializer="he_normal", name=f"{name}_conv")(x)
        return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn",
                                               gamma_initializer="zeros" if zero_scale else "ones")(x)

    image = keras.Input((image_size, image_size, 1), dtype="uint8", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / 255.0, name="pixels_to_unit", dtype="float32")(image)
    x = keras.layers.ReLU(name="stem_relu")(conv_bn(x, WIDTHS[0], 3, 2, "stem"))
    for i, (width, blocks) in enumerate(zip(WIDTHS, BLOCKS), start=1):
        for j in range(1, blocks + 1):
            name, stride = f"stage{i}_block{j}", 2 if (i > 1 and j == 1) else 1
            shortcut = x if stride == 1 and x.shape[-1] == width else conv_bn(x, width, 1, stride, f"{name}_proj")
            y = keras.layers.ReLU(name=f"{name}_relu1")(conv_bn(x, width, 3, stride, f"{name}_1"))
            y = conv_bn(y, width, 3, 1, f"{name}_2", zero_scale=True)
            x = keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([shortcut, y]))
    head = pooled_head(num_classes, dropout=dropout, l2=l2, multilabel=multilabel)
    return keras.Model(image, head(x), name=f"{SPEC.name.replace('-', '_')}_classifier")


def build(image_size: int, num_classes: int = 2, **options):
    """`build_small_resnet` with the zoo's options: a weights file saved from a run of this model, freezing."""
    from distributed.model.builders import from_scratch

    return from_scratch(build_small_resnet, image_size, num_classes, **options)


SPEC = register(ModelSpec(
    name="resnet18-half", summary="a ResNet-18-style network at half width (32-64-128-256), from random "
                                  "weights, for small radiographs on a CPU",
    build=build, min_image_size=16,  # the stem and three stages each halve the side
    default_dropout=0.2, imagenet=False, input_scaling="unit",
    tune_space={"lr": {"loguniform": [1e-4, 3e-3], "grid": [3e-4, 1e-3]},
                "batch_size": {"choice": [16, 32, 64], "grid": [32]}, **COMMON_TUNE_SPACE},
    benchmark_size=64))
