"""ConvNeXt-Tiny (Liu et al. 2022), keras.applications' network re-assembled flat from built-in layers, with
its ImageNet weights mapped in.

Why not keras.applications.ConvNeXtTiny as the other backbones: it ignores a given input_tensor (it builds
on the tensor's source Input, so our uint8 -> RGB input layers would be skipped), it nests its stem and
downsampling layers as Sequential models, and it scales residual branches with a custom LayerScale layer and
adds them with a TF op. The toolkit's graphs are flat and built-in only (distributed.model.builders): so the
same network is built here from Conv2D, LayerNormalization, DepthwiseConv2D, Dense, Activation and Add, under
Keras's layer names, and Keras's weights are copied in. Keras's grouped 7x7 Conv2D (groups = channels) is the
same map as a DepthwiseConv2D with its kernel's last two axes swapped, and LayerScale (x * gamma per channel)
is a 1x1 DepthwiseConv2D without bias whose kernel is gamma; the parameter count is Keras's to the unit, and
tests/distributed/model/test_zoo.py checks the outputs against Keras's own model.
"""
from __future__ import annotations

from pathlib import Path

from distributed.model.registry import COMMON_TUNE_SPACE, ModelSpec, register

KERAS_NAME = "convnext_tiny"
DEPTHS = (3, 3, 9, 3)
WIDTHS = (96, 192, 384, 768)
LAYER_SCALE_INIT = 1e-6  # Keras's and the paper's layer_scale_init_value
EPSILON = 1e-6


def build_convnext_tiny_classifier(image_size: int, num_classes: int = 2, *, weights: str = "none",
                                   dropout: float = 0.2, l2: float = 1e-4, freeze_base: bool = False,
                                   fine_tune_from: str | None = None, multilabel: bool = False):
    """ConvNeXt-Tiny on uint8 greyscale input.

    image (s, s, 1) uint8 -> pixels_to_float -> grey_to_rgb -> imagenet_torch_norm (what Keras's ConvNeXt
    does inside with include_preprocessing) -> stem (4x4 stride-4 conv, norm) -> 4 stages of 3, 3, 9, 3
    blocks at 96, 192, 384, 768 channels, a norm and 2x2 stride-2 conv between stages (s/32, s/32, 768) ->
    head_global_avg_pool -> head_layernorm (Keras's head norm, ImageNet-trained) -> head_dropout -> logits
    -> predictions (sigmoid, softmax or K sigmoids, as the other backbones).

    Block: 7x7 depthwise conv -> norm -> Dense 4C -> GELU -> Dense C -> layer scale, added to its input.
    weights: "none", "imagenet" (Keras's convnext_tiny_notop.h5, downloaded once), a weights file this
    toolkit saved for the whole model, or Keras's ConvNeXt-Tiny notop .h5 file.
    """
    from distributed.model.builders import (Head, ModelError, check_image_size, imagenet_input, keras_application,
                                            load_weights_file_if_any, pooled_head, set_backbone_trainable)
    from distributed.model.kerasenv import keras

    check_image_size(SPEC, image_size)
    Head.for_classes(num_classes, multilabel=multilabel)  # refuses a count no head can take, before the backbone
    x, image = imagenet_input(image_size, SPEC.input_scaling)
    # ConvNeXt's classifier normalises the pooled features before the logits
    head = pooled_head(num_classes, dropout=dropout, l2=l2, multilabel=multilabel, norm_epsilon=EPSILON)
    model = keras.Model(image, head(_backbone(keras, x)), name=f"{SPEC.name}_classifier")

    choice = str(weights).strip()
    if choice.lower() == "imagenet":
        copy_keras_weights(keras_application(keras.applications.ConvNeXtTiny, SPEC.name, "imagenet",
                                             **_keras_args(image_size)), model)
    elif choice.lower() not in ("none", ""):
        try:
            load_weights_file_if_any(model, choice, allow_backbone_only=False)
        except ModelError as err:  # not ours: perhaps Keras's own notop file
            if not Path(choice).expanduser().is_file():
                raise
            try:
                keras_model = keras.applications.ConvNeXtTiny(weights=str(Path(choice).expanduser()),
                                                              **_keras_args(image_size))
            except (ValueError, OSError) as keras_err:
                raise ModelError(f"{err}; nor is it Keras's ConvNeXt-Tiny notop weights file "
                                 f"({str(keras_err).splitlines()[0][:200]})") from keras_err
            copy_keras_weights(keras_model, model)
    set_backbone_trainable(model, freeze_base=freeze_base, fine_tune_from=fine_tune_from)
    return model


def _keras_args(image_size: int) -> dict:
    """keras.applications.ConvNeXtTiny's arguments for the feature extractor our graph mirrors: no top, its
    own input normalisation, average pooling then its final norm (its head's order)."""
    return {"include_top": False, "include_preprocessing": True, "pooling": "avg",
            "input_shape": (image_size, image_size, 3)}


def _backbone(keras, x):
    """The ConvNeXt-Tiny feature map of the normalised RGB tensor `x`, under Keras's layer names."""
    layers = keras.layers
    p = KERAS_NAME
    x = layers.Conv2D(WIDTHS[0], 4, strides=4, name=f"{p}_stem_conv")(x)
    x = layers.LayerNormalization(epsilon=EPSILON, name=f"{p}_stem_layernorm")(x)
    for stage, (depth, width) in enumerate(zip(DEPTHS, WIDTHS)):
        if stage:
            x = layers.LayerNormalization(epsilon=EPSILON, name=f"{p}_downsampling_layernorm_{stage - 1}")(x)
            x = layers.Conv2D(width, 2, strides=2, name=f"{p}_downsampling_conv_{stage - 1}")(x)
        for block in range(depth):
            name = f"{p}_stage_{stage}_block_{block}"
            y = layers.DepthwiseConv2D(7, padding="same", name=f"{name}_depthwise_conv")(x)
            y = layers.LayerNormalization(epsilon=EPSILON, name=f"{name}_layernorm")(y)
            y = layers.Dense(4 * width, name=f"{name}_pointwise_conv_1")(y)
            y = layers.Activation("gelu", name=f"{name}_gelu")(y)
            y = layers.Dense(width, name=f"{name}_pointwise_conv_2")(y)
            y = layers.DepthwiseConv2D(1, use_bias=False, name=f"{name}_layer_scale",
                                       depthwise_initializer=keras.initializers.Constant(LAYER_SCALE_INIT))(y)
            x = layers.Add(name=f"{name}_add")([x, y])
    return x


def copy_keras_weights(keras_model, model) -> None:
    """Copy a keras.applications ConvNeXt-Tiny (built with `_keras_args`) into our classifier `model`:
    every weighted layer of its backbone by name, the grouped convs and layer scales reshaped, and its final
    norm into our head_layernorm. Refuses (ModelError) unless every weight on both sides is used."""
    from distributed.model.builders import HEAD_NORM_NAME, ModelError

    source = {}
    for layer in keras_model.layers:  # the stem and downsampling blocks are nested Sequential models
        for inner in (layer.layers if hasattr(layer, "layers") else [layer]):
            if inner.weights:
                source[inner.name] = inner
    final_norms = [name for name in source if name.startswith("layer_normalization")]
    if len(final_norms) != 1:
        raise ModelError(f"not Keras's ConvNeXt-Tiny: expected one final norm, found {final_norms}")
    source[HEAD_NORM_NAME] = source.pop(final_norms[0])
    targets = {layer.name: layer for layer in model.layers
               if layer.weights and (layer.name.startswith(KERAS_NAME) or layer.name == HEAD_NORM_NAME)}
    if set(source) != set(targets):
        unmatched = sorted(set(source) ^ set(targets))
        raise ModelError(f"not Keras's ConvNeXt-Tiny: {len(unmatched)} layers differ, e.g. {', '.join(unmatched[:3])}")
    for name, target in targets.items():
        values = [w.numpy() for w in source[name].weights]
        if name.endswith("_depthwise_conv"):  # grouped Conv2D (7, 7, 1, C) -> DepthwiseConv2D (7, 7, C, 1)
            values = [values[0].transpose(0, 1, 3, 2), values[1]]
        elif name.endswith("_layer_scale"):  # LayerScale gamma (C,) -> 1x1 depthwise kernel (1, 1, C, 1)
            values = [values[0].reshape(1, 1, -1, 1)]
        target.set_weights(values)


# Downsamples by 32 (a stride-4 stem and three stride-2 downsamplings): below 32 px the last stage has no map.
SPEC = register(ModelSpec(
    name="convnext-tiny", summary="ConvNeXt-Tiny on ImageNet weights, pooled and normalised into its logits",
    build=build_convnext_tiny_classifier, min_image_size=32, default_dropout=0.2, imagenet=True,
    input_scaling="imagenet-torch",
    # the paper fine-tunes with AdamW at small rates; the whole network or from the last two stages
    tune_space={"lr": {"loguniform": [1e-5, 1e-3], "grid": [5e-5, 1e-4]},
                "batch_size": {"choice": [16, 32], "grid": [16]}, **COMMON_TUNE_SPACE,
                "fine_tune_from": {"choice": [f"{KERAS_NAME}_downsampling_layernorm_2",
                                              f"{KERAS_NAME}_downsampling_layernorm_1", None],
                                   "grid": [f"{KERAS_NAME}_downsampling_layernorm_2"]}},
    benchmark_size=224))
