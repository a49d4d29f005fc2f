"""What the models of the zoo (`distributed.model.zoo`) are built from, and what every stage asks of a
built model: the layer-naming convention, the ImageNet input frame and transfer classifier, weights files,
freezing and fine-tuning, the Grad-CAM layer, and BatchNormalization re-estimation.

Every model takes what the prepared shards hold, a batch of uint8 greyscale images of shape
(batch, image_size, image_size, 1) with pixel values 0..255, and returns probabilities in float32 as its head
says (`distributed.model.heads`). Scaling, grey -> RGB and the backbone's own ImageNet normalisation are
layers inside the graph, so an exported or compressed model is self-contained.

The graphs are built flat (the backbone's layers sit directly in the returned Model, never a Model inside a
Model) and from built-in layers only (no Lambda, no custom classes), because tensorflow-model-optimization
cannot quantize nested models or arbitrary code. Quantize or prune them layer by layer (keras.models.clone_model
with quantize_annotate_layer / prune_low_magnitude on Conv2D, Dense and the like), not with quantize_model on
the whole model: that puts a fake-quant op on the uint8 input and fails, and Rescaling is in neither tfmot
registry.

Layer names follow one convention that the helpers below rely on: the input is "image", preprocessing layers
are in `PREPROCESSING_LAYER_NAMES`, head layers start with "head_", and the output is "logits" (float32 Dense)
followed by "predictions" (float32 activation). Every other layer belongs to the backbone (the ImageNet base,
or the CNN's conv blocks).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from distributed.model.kerasenv import keras
from distributed.model.heads import LOGITS_NAME, OUTPUT_NAME, Head, ModelError
from distributed.model.registry import ModelSpec, check_image_size

INPUT_NAME = "image"
HEAD_PREFIX = "head_"
HEAD_NORM_NAME = f"{HEAD_PREFIX}layernorm"  # pooled_head's optional norm of the pooled features
PREPROCESSING_LAYER_NAMES = frozenset({"pixels_to_float", "grey_to_rgb", "imagenet_caffe_norm", "imagenet_torch_norm",
                                       "pixels_to_unit"})
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
# keras.applications' "torch" mode (DenseNet): x / 255, then (x - mean) / std per RGB channel. Grey replicated to
# three channels has one value in every channel, so the channel order does not matter; the per-channel
# constants do.
IMAGENET_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_TORCH_STD_RGB = (0.229, 0.224, 0.225)
# The ImageNet input frames (ModelSpec.input_scaling) a transfer classifier can take: "imagenet-caffe" (VGG16,
# ResNet50), "imagenet-torch" (DenseNet), "pixels" (RGB 0..255 floats, for backbones that normalise inside,
# such as keras.applications' EfficientNetV2 and ConvNeXt).
INPUT_SCALINGS = ("imagenet-caffe", "imagenet-torch", "pixels")



# ---------------------------------------------------------------------------------------------------------
# Helpers for training, evaluation and Grad-CAM
# ---------------------------------------------------------------------------------------------------------

def last_conv_layer_name(model: keras.Model) -> str:
    """Name of the last convolutional feature map, the layer Grad-CAM differentiates against.

    Walks the layers from the output back and returns the first one whose output is 4-D (batch, h, w, c)
    and that is a convolution, an activation (a ReLU closing a conv block, or ResNet's post-add
    activation) or a residual sum; pooling and dropout are passed over. VGG16 gives 'block5_conv3', ResNet50
    'conv5_block3_out', the thesis CNN 'block3_relu1', ConvNeXt-Tiny 'convnext_tiny_stage_3_block_2_add'.
    """
    feature_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                     keras.layers.Activation, keras.layers.ReLU, keras.layers.Add)
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
    distribution than inference sees (the dropout variance shift). In inference mode that can turn a model
    that ranks well into one that calls one class, after training or after pruning (what it did on real
    data: docs/benchmarks.md, "BatchNorm statistics").
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

def l2_regularizer(factor: float):
    """Keras's L2 kernel regularizer of `factor`, or none for 0."""
    return keras.regularizers.l2(factor) if factor else None


def transfer_classifier(spec: ModelSpec, constructor, head, image_size: int, num_classes: int, weights: str,
                        freeze_base: bool, fine_tune_from: str | None, multilabel: bool = False) -> keras.Model:
    """The frame the ImageNet transfer models share: checks, uint8 input with the backbone's own input
    scaling in the graph (`spec.input_scaling`), the keras.applications backbone (`constructor`) built flat
    on it, `head(backbone output) -> outputs`, weights file, trainable layers."""
    name = spec.name
    check_image_size(spec, image_size)
    Head.for_classes(num_classes, multilabel=multilabel)  # refuses a count no head can take, before the backbone
    x, image = imagenet_input(image_size, spec.input_scaling)
    base = keras_application(constructor, name, weights, input_tensor=x)
    model = keras.Model(image, head(base.output), name=f"{name}_classifier")
    load_weights_file_if_any(model, weights, allow_backbone_only=True)
    set_backbone_trainable(model, freeze_base=freeze_base, fine_tune_from=fine_tune_from)
    return model


def pooled_head(num_classes: int, *, dropout: float, l2: float, multilabel: bool = False,
                norm_epsilon: float | None = None):
    """The head the ImageNet backbones after VGG16 and ResNet50 take: global average pooling, dropout and the
    logits (CheXNet's: DenseNet121's pooled features straight into one unit per finding); with
    `norm_epsilon`, a LayerNormalization of the pooled features before the dropout (HEAD_NORM_NAME,
    ConvNeXt's classifier). A function of the backbone's output."""
    def head(base_output):
        y = keras.layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}global_avg_pool")(base_output)
        if norm_epsilon is not None:
            y = keras.layers.LayerNormalization(epsilon=norm_epsilon, name=HEAD_NORM_NAME)(y)
        y = keras.layers.Dropout(dropout, name=f"{HEAD_PREFIX}dropout")(y)
        return Head.for_classes(num_classes, multilabel=multilabel).output(y, l2=l2)
    return head


def imagenet_input(image_size: int, scaling: str = "imagenet-caffe"):
    """uint8 (s, s, 1) input -> float (s, s, 3) as the backbone's keras.applications preprocess_input gives it
    (`scaling`, one of INPUT_SCALINGS); returns (that tensor, the input).

    Weight-free built-in layers only: a Rescaling whose scale or offset is a per-channel vector broadcasts over
    the last axis, serialises as a plain list and survives save/load. They compute in float32 under any
    policy so the normalisation is not rounded to bfloat16/float16 before the first conv casts.
    """
    if scaling not in INPUT_SCALINGS:
        raise ModelError(f"unknown input scaling {scaling!r}; expected one of {', '.join(INPUT_SCALINGS)}")
    image = keras.Input((image_size, image_size, 1), dtype="uint8", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0, name="pixels_to_float", dtype="float32")(image)
    x = keras.layers.Concatenate(axis=-1, name="grey_to_rgb", dtype="float32")([x, x, x])
    if scaling == "imagenet-caffe":
        x = keras.layers.Rescaling(1.0, offset=[-m for m in IMAGENET_CAFFE_MEAN_BGR], name="imagenet_caffe_norm",
                                   dtype="float32")(x)
    elif scaling == "imagenet-torch":  # (x / 255 - mean) / std = x * (1 / (255 std)) - mean / std
        x = keras.layers.Rescaling([1.0 / (255.0 * s) for s in IMAGENET_TORCH_STD_RGB],
                                   offset=[-m / s for m, s in zip(IMAGENET_TORCH_MEAN_RGB, IMAGENET_TORCH_STD_RGB)],
                                   name="imagenet_torch_norm", dtype="float32")(x)
    return x, image


def keras_application(constructor, name: str, weights: str, **arguments):
    """The keras.applications model `constructor(weights=..., **arguments)`, without top unless `arguments`
    say otherwise (built on input_tensor=x, its layers join our graph flat); "imagenet" weights are Keras's
    download, with an error that says what to do without internet."""
    arguments = {"include_top": False, **arguments}
    choice = str(weights).strip()
    if choice.lower() == "imagenet":
        try:
            return constructor(weights="imagenet", **arguments)
        except Exception as err:  # keras.utils.get_file raises a bare Exception on a failed download
            raise ModelError(f"--weights imagenet: could not get the {name} ImageNet weights ({err}); put "
                             f"Keras's {name} 'notop' .h5 file in ~/.keras/models/ or pass its path as "
                             "--weights") from err
    return constructor(weights=None, **arguments)


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


def from_scratch(network: Callable[..., keras.Model], image_size: int, num_classes: int, *, weights: str,
                 freeze_base: bool, fine_tune_from: str | None, **network_options) -> keras.Model:
    """The zoo's build for a network trained from random weights: `network(image_size, num_classes,
    **network_options)` (dropout, l2, multilabel), then a weights file saved from a run of the same network
    (whole: it has no ImageNet backbone file) and the freezing options."""
    model = network(image_size, num_classes, **network_options)
    load_weights_file_if_any(model, weights, allow_backbone_only=False)
    return set_backbone_trainable(model, freeze_base=freeze_base, fine_tune_from=fine_tune_from)


def load_weights_file_if_any(model: keras.Model, weights: str, *, allow_backbone_only: bool) -> None:
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
    return f"{model.name} at {model.input_shape[1]} px with a {Head.of_model(model).describe()} head"


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


