"""Model builders: plain functions that return an uncompiled `keras.Model`, in the style of keras.applications.

Every model takes what the prepared shards hold, a batch of uint8 greyscale images of shape
(batch, image_size, image_size, 1) with pixel values 0..255, and returns class probabilities in float32:
shape (batch, 1) (sigmoid, P(class 1)) or (batch, K) (softmax). Scaling, grey -> RGB and the backbone's own
ImageNet normalisation are layers inside the graph, so an exported or compressed model is self-contained.

The graphs are built flat (the backbone's layers sit directly in the returned Model, never a Model inside a
Model) and from built-in layers only (no Lambda, no custom classes), because tensorflow-model-optimization
cannot quantize nested models or arbitrary code. Quantize or prune them layer by layer (keras.models.clone_model
with quantize_annotate_layer / prune_low_magnitude on Conv2D, Dense and the like), not with quantize_model on
the whole model: that puts a fake-quant op on the uint8 input and fails, and Rescaling is in neither tfmot
registry. Checked with tfmot 0.8.1: per-layer QAT and pruning both train on all three models.

Layer names follow one convention that the helpers below rely on: the input is "image", preprocessing layers
are in `PREPROCESSING_LAYER_NAMES`, head layers start with "head_", and the output is "logits" (float32 Dense)
followed by "predictions" (float32 activation). Every other layer belongs to the backbone (the ImageNet base,
or the CNN's conv blocks).

    from distributed.model.builders import build_model, loss_for
    model = build_model("resnet50", image_size=224, weights="imagenet", freeze_base=True, seed=1)
    model.compile(optimizer="adam", loss=loss_for(model), metrics=["accuracy"])
    model.fit(images_uint8, int_labels)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from distributed.model.kerasenv import keras
from cxrscale.errors import CxrError

MODEL_NAMES = ("vgg16", "resnet50", "cnn")

INPUT_NAME = "image"
HEAD_PREFIX = "head_"
LOGITS_NAME = "logits"
OUTPUT_NAME = "predictions"
PREPROCESSING_LAYER_NAMES = frozenset({"pixels_to_float", "grey_to_rgb", "imagenet_caffe_norm", "pixels_to_unit"})
MEMBER_PREFIX = "m{}_"  # an ensemble member's layers are renamed m0_..., m1_... (distributed.ensemble)
_MEMBER = re.compile(r"^m\d+_")


MEAN_LOGITS_NAME = "ensemble_mean_logits"  # the mean of the members' logits
LOGIT_DIFFERENCE_NAME = "logit_difference"  # a member's 2-unit softmax logits as one binary logit


def member_layer_name(name: str) -> str:
    """A layer's name in the model it came from: an ensemble member's layer without its m<k>_ prefix."""
    return _MEMBER.sub("", name, count=1)


def is_ensemble_combination(layer) -> bool:
    """Whether `layer` is part of how an ensemble combines its members' logits (a fixed float map, like a
    calibration: nothing to prune or quantize)."""
    return layer.name == MEAN_LOGITS_NAME or (
        layer.name != member_layer_name(layer.name) and member_layer_name(layer.name) == LOGIT_DIFFERENCE_NAME)

# keras.applications.{vgg16,resnet50}.preprocess_input use "caffe" mode: RGB -> BGR, then subtract the
# ImageNet per-channel mean in BGR order, no scaling. Grey replicated to three channels is the same in RGB and
# BGR order, so only the mean subtraction remains.
IMAGENET_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# Both backbones downsample by 32 (five stride-2 stages); below 32 px the last stage would get an empty map.
_BACKBONE_MIN_SIZE = 32
_CNN_FILTERS = (64, 128, 256)
_CNN_MIN_SIZE = 2 ** len(_CNN_FILTERS)  # each block halves the side; below this the last pools do nothing
# Keras's default 0.99 forgets the initial moving variance (1.0) only after ~1,000+ steps, while the first
# conv's true variance can be ~1e-4: a CPU run of a few hundred steps then predicts one class in inference
# mode although it trains well. 0.9 (PyTorch's default) converges within ~100 steps.
_CNN_BN_MOMENTUM = 0.9


class ModelError(CxrError):
    """A user's mistake in choosing or configuring a model (name, image size, weights file, layer name)."""


# ---------------------------------------------------------------------------------------------------------
# Public builders
# ---------------------------------------------------------------------------------------------------------

def build_model(name: str, image_size: int, num_classes: int = 2, *, weights: str = "none",
                dropout: float | None = None, l2: float = 1e-4, freeze_base: bool = False,
                fine_tune_from: str | None = None, seed: int | None = None) -> keras.Model:
    """Build one of `MODEL_NAMES` for uint8 (batch, image_size, image_size, 1) input.

    Args:
        name: "vgg16", "resnet50" or "cnn" (case-insensitive).
        image_size: input side in pixels; at least `min_image_size(name)`.
        num_classes: K >= 2. For K == 2 the heads are the thesis's (VGG16: 2-unit softmax, ResNet50 and the
            CNN: 1-unit sigmoid); for K > 2 every model ends in a K-unit softmax.
        weights: "none" (random init, seeded by `seed`), "imagenet" (VGG16/ResNet50 only; Keras downloads
            the notop file), or a path to a weights file (.h5, .keras, .weights.h5, a TF checkpoint prefix
            or a SavedModel directory) saved from the same architecture, or, for VGG16/ResNet50, a
            backbone-only .h5 such as Keras's ImageNet "notop" file.
        dropout: head dropout rate; None means the builder's default (0.5 for VGG16/ResNet50, the thesis's
            0.2 for the CNN, where it is also the per-block rate).
        l2: L2 factor on the dense layers' kernels.
        freeze_base: backbone layers not trainable (the thesis's VGG16 setup).
        fine_tune_from: a backbone layer name; layers before it are frozen, it and later ones trainable.
            Takes precedence over `freeze_base`.
        seed: when given, `keras.utils.set_random_seed(seed)` first, so the initial weights (and later
            dropout masks) are reproducible.

    Returns:
        An uncompiled Model; compile it with `loss_for(model)`.

    Raises:
        ModelError: unknown name, image too small, num_classes < 2, bad weights, unknown fine_tune_from.
    """
    key = _check_name(name)
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    if key == "cnn":
        if isinstance(weights, str) and weights.strip().lower() == "imagenet":
            raise ModelError("--weights imagenet: there are no ImageNet weights for --model cnn; "
                             "use --weights none or a weights file saved from a cnn run")
        model = build_thesis_cnn(image_size, num_classes, dropout=0.2 if dropout is None else dropout, l2=l2)
        _load_weights_file_if_any(model, weights, allow_backbone_only=False)
        set_backbone_trainable(model, freeze_base=freeze_base, fine_tune_from=fine_tune_from)
        return model
    builder = build_vgg16_classifier if key == "vgg16" else build_resnet50_classifier
    return builder(image_size, num_classes, weights=weights, dropout=0.5 if dropout is None else dropout,
                   l2=l2, freeze_base=freeze_base, fine_tune_from=fine_tune_from)


def build_vgg16_classifier(image_size: int, num_classes: int = 2, *, weights: str = "none",
                           dropout: float = 0.5, l2: float = 1e-4, freeze_base: bool = False,
                           fine_tune_from: str | None = None) -> keras.Model:
    """The thesis's VGG16 transfer model (its Table 1), on uint8 greyscale input.

    image (s, s, 1) uint8 -> pixels_to_float -> grey_to_rgb (s, s, 3) -> imagenet_caffe_norm
    -> VGG16 base without top (block1_conv1 .. block5_pool: (s/32, s/32, 512))
    -> head_flatten -> head_dense_1024 (ReLU, L2) -> head_dropout -> logits (K) -> predictions (softmax).

    With K = 2 this is a 2-unit softmax as in the thesis. At 224 px: 40,407,874 parameters (base 14,714,688,
    head_dense_1024 25,691,136, logits 2,050); the preprocessing layers add none. The Flatten head makes
    the parameter count grow with the image side ((s/32)^2 * 512 * 1024 for the first dense layer).
    """
    def head(base_output):
        y = keras.layers.Flatten(name="head_flatten")(base_output)
        y = keras.layers.Dense(1024, activation="relu", kernel_regularizer=_l2(l2), name="head_dense_1024")(y)
        y = keras.layers.Dropout(dropout, name="head_dropout")(y)
        return _classifier_output(y, num_classes, l2, sigmoid_for_two=False)

    return _transfer_classifier(keras.applications.VGG16, "vgg16", head, image_size, num_classes, weights,
                                freeze_base, fine_tune_from)


def build_resnet50_classifier(image_size: int, num_classes: int = 2, *, weights: str = "none",
                              dropout: float = 0.5, l2: float = 1e-4, freeze_base: bool = False,
                              fine_tune_from: str | None = None) -> keras.Model:
    """The thesis's ResNet50 transfer model (its Table 2), on uint8 greyscale input.

    image (s, s, 1) uint8 -> pixels_to_float -> grey_to_rgb (s, s, 3) -> imagenet_caffe_norm
    -> ResNet50 base without top (conv1_pad .. conv5_block3_out: (s/32, s/32, 2048))
    -> head_global_avg_pool (2048) -> head_dense_1024 (ReLU, L2) -> head_dropout_1
    -> head_dense_512 (ReLU, L2) -> head_dropout_2 -> logits (1 or K) -> predictions (sigmoid or softmax).

    With K = 2 the output is one sigmoid unit, P(class 1), as in the thesis. 26,211,201 parameters at any
    image size (base 23,587,712 of which 53,120 are BatchNormalization moving statistics, dense layers
    2,098,176 + 524,800 + 513); the preprocessing layers add none.
    """
    def head(base_output):
        y = keras.layers.GlobalAveragePooling2D(name="head_global_avg_pool")(base_output)
        y = keras.layers.Dense(1024, activation="relu", kernel_regularizer=_l2(l2), name="head_dense_1024")(y)
        y = keras.layers.Dropout(dropout, name="head_dropout_1")(y)
        y = keras.layers.Dense(512, activation="relu", kernel_regularizer=_l2(l2), name="head_dense_512")(y)
        y = keras.layers.Dropout(dropout, name="head_dropout_2")(y)
        return _classifier_output(y, num_classes, l2, sigmoid_for_two=True)

    return _transfer_classifier(keras.applications.ResNet50, "resnet50", head, image_size, num_classes, weights,
                                freeze_base, fine_tune_from)


def build_thesis_cnn(image_size: int = 150, num_classes: int = 2, *, dropout: float = 0.2, l2: float = 1e-4,
                     filters: Sequence[int] = _CNN_FILTERS, convs_per_block: int = 1) -> keras.Model:
    """The thesis's small CNN for 150 x 150 x 1 radiographs, sized to train on CPU.

    Architecture with the defaults (s = image_size; blocks b = 1, 2, 3 with 64, 128, 256 filters):

        image                 (s, s, 1) uint8
        pixels_to_unit        Rescaling 1/255 -> float32 in [0, 1], the thesis's scaling
        per block b:
          block{b}_conv1      Conv2D 3x3, stride 1, 'same', no bias (the following BN's beta is the bias)
          block{b}_bn1        BatchNormalization (momentum 0.9, see _CNN_BN_MOMENTUM)
          block{b}_relu1      ReLU
          block{b}_pool       MaxPooling2D 2x2, stride 2, 'same' -> side ceil(s / 2^b)
          block{b}_dropout    Dropout(dropout), 20% as in the thesis
        head_global_avg_pool  GlobalAveragePooling2D -> (256,)
        head_dense_128        Dense 128, ReLU, L2(l2)
        head_dropout          Dropout(dropout)
        logits                Dense 1 (K = 2) or K (K > 2), float32
        predictions           sigmoid (K = 2: P(class 1)) or softmax (K > 2), float32

    404,033 parameters (403,137 trainable + 896 BatchNormalization moving statistics) at every image side,
    128 and 150 px alike, because global average pooling makes the head independent of the side.
    convs_per_block=2 repeats conv/bn/relu within each block (suffixes 1, 2): 1,179,969 parameters.

    Why: the thesis has two blocks (64, 128 filters) and a Flatten. Flattened after two blocks a 128 px image
    gives 32*32*128 = 131,072 features, so a Dense 128 alone would hold 16.8 M weights, dominate the model
    and overfit ~5k radiographs. A third block (256 filters) doubles the receptive field (22 px at the last
    pool) and global average pooling keeps the head at 33 k weights at any side; its last ReLU map
    (block3_relu1) is also a natural Grad-CAM target. One conv per block, not two: at 128 px on 2 CPU cores
    two convs per block trained at 6 images/s (float32) against 23 (49 under mixed_bfloat16), because the
    second 64-filter conv at full resolution dominates; one conv reached a validation AUC of about 0.95 on
    patient-disjoint Kermany radiographs after a few epochs of 2,000 images. `filters` and `convs_per_block`
    change the blocks; the thesis's own two blocks are filters=(64, 128).
    """
    filters = tuple(int(f) for f in filters)
    if not filters or convs_per_block < 1:
        raise ModelError("the cnn needs at least one block and one convolution per block")
    check_image_size("cnn", image_size, 2 ** len(filters))
    _check_num_classes(num_classes)
    image = keras.Input((image_size, image_size, 1), dtype="uint8", name=INPUT_NAME)
    # float32 even under a mixed policy: the scaling is exact there and the first conv casts as it needs.
    x = keras.layers.Rescaling(1.0 / 255.0, name="pixels_to_unit", dtype="float32")(image)
    for b, width in enumerate(filters, start=1):
        for c in range(1, convs_per_block + 1):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{b}_conv{c}")(x)
            x = keras.layers.BatchNormalization(momentum=_CNN_BN_MOMENTUM, name=f"block{b}_bn{c}")(x)
            x = keras.layers.ReLU(name=f"block{b}_relu{c}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, padding="same", name=f"block{b}_pool")(x)
        x = keras.layers.Dropout(dropout, name=f"block{b}_dropout")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_global_avg_pool")(x)
    x = keras.layers.Dense(128, activation="relu", kernel_regularizer=_l2(l2), name="head_dense_128")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = _classifier_output(x, num_classes, l2, sigmoid_for_two=True)
    return keras.Model(image, outputs, name="thesis_cnn")


# ---------------------------------------------------------------------------------------------------------
# Helpers for training, evaluation and Grad-CAM
# ---------------------------------------------------------------------------------------------------------

def min_image_size(name: str) -> int:
    """Smallest input side, in pixels, that `build_model(name, ...)` accepts (with default settings)."""
    key = _check_name(name)
    return _CNN_MIN_SIZE if key == "cnn" else _BACKBONE_MIN_SIZE


def loss_for(model: keras.Model, label_smoothing: float = 0.0):
    """The loss matching the model's head, for integer class-index labels of shape (n,) or (n, 1).

    A 1-unit sigmoid head gets BinaryCrossentropy (labels 0/1); a K-unit softmax head gets
    SparseCategoricalCrossentropy. Both take probabilities, not logits, as the models output them.
    label_smoothing e (Szegedy et al. 2016): the targets become y (1 - e) + e / K, so the model is never
    pushed to certainty on a label that may be wrong or an image unlike the deployment site's.
    """
    units = model.output_shape[-1]
    if units == 1:
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing, name="binary_crossentropy")
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(name="sparse_categorical_crossentropy")
    import tensorflow as tf

    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)

    def smoothed_sparse_categorical_crossentropy(y_true, y_pred):  # tf_keras's sparse loss cannot smooth
        return smoothed(tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), units), y_pred)

    return smoothed_sparse_categorical_crossentropy


def last_conv_layer_name(model: keras.Model) -> str:
    """Name of the last convolutional feature map, the layer Grad-CAM differentiates against.

    Walks the layers from the output back and returns the first one whose output is 4-D (batch, h, w, c)
    and that is a convolution or an activation (a ReLU closing a conv block, or ResNet's post-add
    activation); pooling and dropout are passed over. VGG16 gives 'block5_conv3', ResNet50
    'conv5_block3_out', the thesis CNN 'block3_relu1'.
    """
    feature_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                     keras.layers.Activation, keras.layers.ReLU)
    for layer in reversed(model.layers):
        if isinstance(layer, feature_types) and len(layer.output.shape) == 4:
            return layer.name
    raise ModelError(f"model {model.name!r} has no convolutional layer with a 4-D output for Grad-CAM")


def backbone_layers(model: keras.Model) -> list:
    """The layers between the preprocessing and the head, in graph order (built by this module)."""
    return [layer for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer)
            and layer.name not in PREPROCESSING_LAYER_NAMES
            and not layer.name.startswith(HEAD_PREFIX)
            and layer.name not in (LOGITS_NAME, OUTPUT_NAME)]


def set_backbone_trainable(model: keras.Model, *, freeze_base: bool = False,
                           fine_tune_from: str | None = None, freeze_batchnorm: bool = False) -> keras.Model:
    """Freeze all or the lower part of the backbone, in place; the head stays trainable. Returns `model`.

    freeze_base: every backbone layer not trainable. fine_tune_from: backbone layers before that layer not
    trainable, it and all later ones trainable (overrides freeze_base). Neither: everything trainable.
    freeze_batchnorm: keep BatchNormalization layers frozen even where fine-tuning, as Keras's
    transfer-learning guide advises for small per-worker batches. A frozen BatchNormalization layer runs in
    inference mode (its moving statistics are used and not updated) even when the model is called with
    training=True: tf_keras does this for any BatchNormalization with trainable=False.
    Call before `compile`: Keras fixes the trainable set when it builds the train step.
    """
    layers = backbone_layers(model)
    if fine_tune_from is not None:
        names = [layer.name for layer in layers]
        if fine_tune_from not in names:
            raise ModelError(f"--fine-tune-from {fine_tune_from!r} is not a layer of the {model.name} backbone; "
                             f"valid names include {', '.join(_block_starts(layers))}")
        start = names.index(fine_tune_from)
        for i, layer in enumerate(layers):
            layer.trainable = i >= start
    else:
        for layer in layers:
            layer.trainable = not freeze_base
    if freeze_batchnorm:
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return model


def recalibrate_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> int:
    """Re-estimate every BatchNormalization layer's moving mean and variance from `images` (N, H, W, C),
    uint8 train images, in place: the plain average of the batch statistics over the images, dropout off.
    Returns the number of BatchNormalization layers.

    Frozen BatchNormalization layers (trainable=False) run in inference mode and keep their statistics.

    Why ("precise BN", Wu & Johnson 2021, "Rethinking Batch in BatchNorm"): Keras's moving averages
    describe the weights of the last ~1/(1 - momentum) steps, and, computed with dropout on, a wider
    distribution than inference sees (the dropout variance shift). Both showed on real data:
    - training the CNN (64 px, Adam 2e-3, global batch 64) on the Kermany train split, validation accuracy
      at 0.5 swung 0.90, 0.78, 0.26, 0.74, 0.94, 0.94, 0.81, 0.66 over epochs 1-8 with the moving averages
      (validation loss up to 4.6, AUC steady at 0.97-0.99), and stayed at 0.90-0.95 (loss 0.15-0.25) with
      statistics re-estimated like this at each epoch end;
    - after pruning the 64 px ResNet50 to 50 % sparsity (momentum 0.99, so a short fine-tuning never
      catches up): validation AUC 0.50 (one constant output) before, 0.990 after, on 1,024 train images.
    """
    layers = [layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers or len(images) == 0:
        return len(layers)
    dropouts = [layer for layer in model.submodules if isinstance(layer, keras.layers.Dropout)]
    saved = [(layer, layer.momentum) for layer in layers], [(layer, layer.rate) for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0  # dropout in training mode would skew the statistics downstream of it
        for step, start in enumerate(range(0, len(images), batch_size)):
            for layer in layers:
                # momentum k/(k+1) makes the moving value the running mean of the k+1 batches so far (eager
                # calls read the attribute each time); the first batch (momentum 0) replaces the old value.
                layer.momentum = step / (step + 1)
            model(images[start:start + batch_size], training=True)
    finally:
        for layer, momentum in saved[0]:
            layer.momentum = momentum
        for layer, rate in saved[1]:
            layer.rate = rate
    return len(layers)


# ---------------------------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in MODEL_NAMES:
        raise ModelError(f"--model {name!r} is not a known model; choose one of {', '.join(MODEL_NAMES)}")
    return key


def check_image_size(name: str, image_size: int, minimum: int | None = None, source: str = "the data") -> None:
    """ModelError unless model `name` takes square images of `image_size` px (its smallest side): the one
    check of an image size against a model, for the builders and for a prepared dataset alike."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise ModelError(f"--model {name}: the image size must be a whole number of pixels, got {image_size!r}")
    minimum = min_image_size(name) if minimum is None else minimum
    if image_size < minimum:
        raise ModelError(f"--model {name} needs images of at least {minimum} px; {source} is {image_size} px: "
                         f"prepare it again with a larger --size (python -m preprocessing --size)")


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes; got num_classes={num_classes!r} "
                         "(check the dataset's class folders or manifest)")


def _l2(factor: float):
    return keras.regularizers.l2(factor) if factor else None


def _transfer_classifier(constructor, name: str, head, image_size: int, num_classes: int, weights: str,
                         freeze_base: bool, fine_tune_from: str | None) -> keras.Model:
    """The frame both ImageNet transfer models share: checks, uint8 input with in-graph caffe normalisation,
    the backbone built flat on it, `head(backbone output) -> outputs`, weights file, trainable layers."""
    check_image_size(name, image_size, _BACKBONE_MIN_SIZE)
    _check_num_classes(num_classes)
    x, image = _imagenet_caffe_input(image_size)
    base = _application(constructor, name, weights, x)
    model = keras.Model(image, head(base.output), name=f"{name}_classifier")
    _load_weights_file_if_any(model, weights, allow_backbone_only=True)
    set_backbone_trainable(model, freeze_base=freeze_base, fine_tune_from=fine_tune_from)
    return model


def _imagenet_caffe_input(image_size: int):
    """uint8 (s, s, 1) input -> float (s, s, 3) equal to keras.applications' "caffe" preprocess_input.

    Weight-free built-in layers only: a Rescaling whose offset is the per-channel vector broadcasts over
    the last axis, serialises as a plain list and survives save/load. They compute in float32 under any
    policy so the mean subtraction is not rounded to bfloat16/float16 before the first conv casts.
    """
    image = keras.Input((image_size, image_size, 1), dtype="uint8", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0, name="pixels_to_float", dtype="float32")(image)
    x = keras.layers.Concatenate(axis=-1, name="grey_to_rgb", dtype="float32")([x, x, x])
    x = keras.layers.Rescaling(1.0, offset=[-m for m in IMAGENET_CAFFE_MEAN_BGR], name="imagenet_caffe_norm",
                               dtype="float32")(x)
    return x, image


def _application(constructor, name: str, weights: str, x):
    """The keras.applications base without top, built on tensor `x` so its layers join our graph flat."""
    choice = str(weights).strip()
    if choice.lower() == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_tensor=x)
        except Exception as err:  # keras.utils.get_file raises a bare Exception on a failed download
            raise ModelError(f"--weights imagenet: could not get the {name} ImageNet weights ({err}); put "
                             f"Keras's {name} 'notop' .h5 file in ~/.keras/models/ or pass its path as "
                             "--weights") from err
    return constructor(include_top=False, weights=None, input_tensor=x)


def _classifier_output(x, num_classes: int, l2: float, *, sigmoid_for_two: bool):
    # float32 logits and activation so mixed_float16/mixed_bfloat16 runs still output float32 probabilities
    # (a softmax or sigmoid in half precision saturates and the loss loses precision).
    units = 1 if (num_classes == 2 and sigmoid_for_two) else num_classes
    logits = keras.layers.Dense(units, kernel_regularizer=_l2(l2), dtype="float32", name=LOGITS_NAME)(x)
    activation = "sigmoid" if units == 1 else "softmax"
    return keras.layers.Activation(activation, dtype="float32", name=OUTPUT_NAME)(logits)


def _block_starts(layers, limit: int = 8) -> list[str]:
    """The first weighted layer of each stage (name prefix before '_'), e.g. block5_conv1, conv5_block1_1_conv."""
    starts, seen = [], set()
    for layer in layers:
        if layer.weights:
            stage = layer.name.split("_", 1)[0]
            if stage not in seen:
                seen.add(stage)
                starts.append(layer.name)
    return starts[-limit:]


def _load_weights_file_if_any(model: keras.Model, weights: str, *, allow_backbone_only: bool) -> None:
    """Load `weights` into `model` when it is a path; "none"/"imagenet" were handled at build time.

    First the whole model (topological order, as save_weights/ModelCheckpoint wrote it); if that does not
    fit and backbone-only files are allowed, an .h5 file is loaded into the backbone by layer name, and
    must cover every weighted backbone layer.
    """
    choice = str(weights).strip() if weights is not None else "none"
    if choice.lower() in ("none", "imagenet", ""):
        return
    path = Path(choice).expanduser()
    if not (path.exists() or Path(str(path) + ".index").exists()):
        raise ModelError(f"--weights {choice}: no such file (give a .h5/.keras/.weights.h5 file, a TF "
                         "checkpoint prefix or a SavedModel directory, or 'none' / 'imagenet')")
    try:
        _load_full_model_weights(model, path)
        return
    except (ValueError, KeyError, OSError, AssertionError, IndexError, TypeError) as err:
        full_error = err
    if allow_backbone_only and _is_legacy_h5(path):
        try:
            _load_backbone_weights_by_name(model, path)
            return
        except (ValueError, KeyError, OSError) as err:
            raise ModelError(f"--weights {choice}: does not fit {_describe(model)}, neither as "
                             f"weights of the whole model ({_first_line(full_error)}) nor of its backbone "
                             f"({_first_line(err)})") from err
    raise ModelError(f"--weights {choice}: does not fit {_describe(model)} "
                     f"({_first_line(full_error)})") from full_error


def _describe(model: keras.Model) -> str:
    units = model.output_shape[-1]
    return f"{model.name} at {model.input_shape[1]} px with {2 if units == 1 else units} classes"


def _load_full_model_weights(model: keras.Model, path: Path) -> None:
    status = model.load_weights(str(path))
    if status is not None:  # TF checkpoint: unmatched variables are otherwise silently left as initialised
        status.assert_existing_objects_matched()
        status.expect_partial()  # optimizer slots of a training checkpoint are not wanted here


def _is_legacy_h5(path: Path) -> bool:
    import h5py

    if path.is_dir() or str(path).endswith(".weights.h5") or not h5py.is_hdf5(str(path)):
        return False
    return True


def _load_backbone_weights_by_name(model: keras.Model, path: Path) -> None:
    import h5py

    with h5py.File(str(path), "r") as f:
        group = f["model_weights"] if ("layer_names" not in f.attrs and "model_weights" in f) else f
        stored = {_decode(n) for n in group.attrs.get("layer_names", [])
                  if len(group[_decode(n)].attrs.get("weight_names", [])) > 0}
    wanted = [layer.name for layer in backbone_layers(model) if layer.weights]
    missing = [n for n in wanted if n not in stored]
    if missing:
        raise ValueError(f"{len(missing)} of its {len(wanted)} weighted layers are not in the file, "
                         f"e.g. {', '.join(missing[:3])}")
    model.load_weights(str(path), by_name=True, skip_mismatch=False)


def _decode(name) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


__all__ = [
    "MODEL_NAMES", "ModelError", "build_model", "build_vgg16_classifier", "build_resnet50_classifier",
    "build_thesis_cnn", "check_image_size", "last_conv_layer_name", "loss_for",
    "min_image_size", "backbone_layers", "set_backbone_trainable", "recalibrate_batchnorm",
]
