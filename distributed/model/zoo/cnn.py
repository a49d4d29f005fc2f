"""The thesis's small CNN, grown to three blocks and global average pooling so that it trains on a CPU and
its head does not grow with the image side. No ImageNet weights: it trains whole from random weights."""
from __future__ import annotations

from typing import Sequence

from distributed.model.heads import Head, ModelError
from distributed.model.registry import COMMON_TUNE_SPACE, ModelSpec, check_image_size, register

FILTERS = (64, 128, 256)
# Keras's default 0.99 forgets the initial moving variance (1.0) only after ~1,000+ steps, while the first
# conv's true variance can be ~1e-4: a CPU run of a few hundred steps then predicts one class in inference
# mode although it trains well. 0.9 (PyTorch's default) converges within ~100 steps.
BN_MOMENTUM = 0.9


def build_thesis_cnn(image_size: int = 150, num_classes: int = 2, *, dropout: float = 0.2, l2: float = 1e-4,
                     filters: Sequence[int] = FILTERS, convs_per_block: int = 1, multilabel: bool = False):
    """The thesis's small CNN for 150 x 150 x 1 radiographs, sized to train on CPU.

    Architecture with the defaults (s = image_size; blocks b = 1, 2, 3 with 64, 128, 256 filters):

        image                 (s, s, 1) uint8
        pixels_to_unit        Rescaling 1/255 -> float32 in [0, 1], the thesis's scaling
        per block b:
          block{b}_conv1      Conv2D 3x3, stride 1, 'same', no bias (the following BN's beta is the bias)
          block{b}_bn1        BatchNormalization (momentum 0.9, see BN_MOMENTUM)
          block{b}_relu1      ReLU
          block{b}_pool       MaxPooling2D 2x2, stride 2, 'same' -> side ceil(s / 2^b)
          block{b}_dropout    Dropout(dropout), 20% as in the thesis
        head_global_avg_pool  GlobalAveragePooling2D -> (256,)
        head_dense_128        Dense 128, ReLU, L2(l2)
        head_dropout          Dropout(dropout)
        logits                Dense 1 (K = 2) or K (K > 2), float32
        predictions           sigmoid (K = 2: P(class 1)) or softmax (K > 2), float32; `multilabel`: K
                              sigmoid units

    404,033 parameters (403,137 trainable + 896 BatchNormalization moving statistics) at every image side,
    128 and 150 px alike, because global average pooling makes the head independent of the side.
    convs_per_block=2 repeats conv/bn/relu within each block (suffixes 1, 2): 1,179,969 parameters.

    Why: the thesis has two blocks (64, 128 filters) and a Flatten. Flattened after two blocks a 128 px image
    gives 32*32*128 = 131,072 features, so a Dense 128 alone would hold 16.8 M weights, dominate the model
    and overfit ~5k radiographs. A third block (256 filters) doubles the receptive field (22 px at the last
    pool) and global average pooling keeps the head at 33 k weights at any side; its last ReLU map
    (block3_relu1) is also a natural Grad-CAM target. One conv per block, not two: the second 64-filter conv
    at full resolution would dominate the cost of a step on a CPU (docs/benchmarks.md, "the thesis CNN").
    `filters` and `convs_per_block` change the blocks; the thesis's own two blocks are filters=(64, 128).
    """
    from distributed.model.builders import INPUT_NAME, l2_regularizer
    from distributed.model.kerasenv import keras

    filters = tuple(int(f) for f in filters)
    if not filters or convs_per_block < 1:
        raise ModelError("the cnn needs at least one block and one convolution per block")
    check_image_size(SPEC, image_size, 2 ** len(filters))
    head = Head.for_classes(num_classes, multilabel=multilabel)
    image = keras.Input((image_size, image_size, 1), dtype="uint8", name=INPUT_NAME)
    # float32 even under a mixed policy: the scaling is exact there and the first conv casts as it needs.
    x = keras.layers.Rescaling(1.0 / 255.0, name="pixels_to_unit", dtype="float32")(image)
    for b, width in enumerate(filters, start=1):
        for c in range(1, convs_per_block + 1):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{b}_conv{c}")(x)
            x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{b}_bn{c}")(x)
            x = keras.layers.ReLU(name=f"block{b}_relu{c}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, padding="same", name=f"block{b}_pool")(x)
        x = keras.layers.Dropout(dropout, name=f"block{b}_dropout")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_global_avg_pool")(x)
    x = keras.layers.Dense(128, activation="relu", kernel_regularizer=l2_regularizer(l2), name="head_dense_128")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    return keras.Model(image, head.output(x, l2=l2), name="thesis_cnn")


def build(image_size: int, num_classes: int = 2, **options):
    """`build_thesis_cnn` with the zoo's options: a weights file saved from a cnn run, and freezing."""
    from distributed.model.builders import from_scratch

    return from_scratch(build_thesis_cnn, image_size, num_classes, **options)


SPEC = register(ModelSpec(
    name="cnn", summary="the thesis's CNN: 3 conv blocks (64-128-256), global average pooling, dense 128",
    build=build, min_image_size=2 ** len(FILTERS),  # each block halves the side; below, the last pools do nothing
    default_dropout=0.2, imagenet=False, input_scaling="unit",
    tune_space={"lr": {"loguniform": [1e-4, 3e-3], "grid": [3e-4, 1e-3]},
                "batch_size": {"choice": [16, 32, 64], "grid": [32]}, **COMMON_TUNE_SPACE},
    benchmark_size=150))
