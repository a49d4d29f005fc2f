"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization") for the models of `distributed.model.builders`.

    from distributed.evaluation.gradcam import gradcam, overlay
    maps = gradcam(model, images)        # (n, H, W) float32 in [0, 1], each image's predicted class
    picture = overlay(images[0], maps[0])  # (H, W, 3) uint8 RGB

The class score is the logit before the output sigmoid/softmax (the "logits" layer). For a 1-unit sigmoid
head the score of class 1 is the logit z and that of class 0 is -z, so a class-0 map shows evidence for class 0.
"""
from __future__ import annotations

import cv2
import numpy as np

from distributed.model.kerasenv import keras
import tensorflow as tf  # noqa: E402  (after kerasenv, which selects tf_keras)

from distributed.model.builders import last_conv_layer_name
from distributed.model.heads import LOGITS_NAME, Head, ModelError


def gradcam(model: keras.Model, images: np.ndarray, class_index: int | np.ndarray | None = None, *,
            layer: str | None = None, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM heat-maps of uint8 `images` (n, H, W, C) as `model` takes them: float32 (n, H, W) in [0, 1].

    class_index: None for each image's predicted class, or an int / per-image array of class indices.
    layer: the feature map to explain; defaults to `last_conv_layer_name(model)`. Runs in inference mode.
    """
    images = _check_images(model, images)
    n, height, width = images.shape[:3]
    feature = _feature_layer(model, layer)
    grad_model = keras.Model(model.inputs, [feature.output, _logits(model)])
    head = Head.of_logits(model)
    classes = None if class_index is None else _check_classes(class_index, n, head.columns)
    cams = []
    for start in range(0, n, max(1, int(batch_size))):
        batch = tf.constant(images[start:start + batch_size])
        with tf.GradientTape() as tape:
            features, logits = grad_model(batch, training=False)
            logits = tf.cast(logits, tf.float32)
            chosen = head.predicted_class(logits) if classes is None else tf.constant(classes[start:start + batch_size])
            score = tf.reduce_sum(head.class_score(logits, chosen))
        grads = tape.gradient(score, features)
        if grads is None:
            raise ModelError(f"gradcam: no gradient flows from the logits to layer {feature.name!r}; "
                             "choose a later layer")
        weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))
        cams += [cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in cam.numpy()]
    maps = np.asarray(cams, np.float32).reshape(n, height, width)  # bilinear: still >= 0
    peaks = maps.max(axis=(1, 2), keepdims=True, initial=0.0)
    return np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0).astype(np.float32)


def file_stem(name: str) -> str:
    """A finding's or class's name as a file-name part: every character but letters and digits becomes _."""
    return "".join(c if c.isalnum() else "_" for c in name)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """Grey uint8 image (H, W) or (H, W, 1) with a JET-coloured heat-map (H, W) in [0, 1] -> RGB uint8 (H, W, 3).

    The colour is blended in with weight alpha * heat per pixel, so where the heat is zero the image stays grey.
    """
    grey = np.asarray(image)
    grey = grey[..., 0] if grey.ndim == 3 and grey.shape[-1] == 1 else grey
    heat = np.nan_to_num(np.clip(np.asarray(heatmap, np.float32), 0.0, 1.0))
    if grey.dtype != np.uint8 or grey.ndim != 2 or heat.shape != grey.shape:
        raise ValueError(f"overlay needs a uint8 (H, W) or (H, W, 1) image and an (H, W) heat-map of the same "
                         f"size; got {grey.dtype} {np.shape(image)} and {np.shape(heatmap)}")
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.round(255 * heat)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    weight = (alpha * heat)[..., None]
    blended = (1.0 - weight) * np.repeat(grey[..., None], 3, axis=-1) + weight * colour
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _check_images(model: keras.Model, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    expected, dtype = tuple(model.input_shape[1:]), tf.as_dtype(model.inputs[0].dtype).as_numpy_dtype
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.dtype != dtype:
        raise ValueError(f"gradcam: model {model.name!r} takes {np.dtype(dtype).name} images of shape "
                         f"(n, {', '.join(map(str, expected))}); got {images.dtype} {images.shape}")
    return images


def _feature_layer(model: keras.Model, name: str | None):
    name = name or last_conv_layer_name(model)
    try:
        found = model.get_layer(name)
    except ValueError:
        convs = [lay.name for lay in model.layers if isinstance(lay, keras.layers.Conv2D)][-4:]
        raise ModelError(f"gradcam: layer {name!r} is not in model {model.name!r}; the default is "
                         f"{last_conv_layer_name(model)!r}, its last convolutions are {', '.join(convs)}") from None
    if len(found.output.shape) != 4:
        raise ModelError(f"gradcam: layer {name!r} outputs {found.output.shape}, not a 4-D feature map")
    return found


def _logits(model: keras.Model):
    """The pre-activation output: the "logits" layer, else the input of a final Activation layer."""
    names = {lay.name for lay in model.layers}
    if LOGITS_NAME in names:
        return model.get_layer(LOGITS_NAME).output
    if isinstance(model.layers[-1], keras.layers.Activation):
        return model.layers[-1].input
    raise ModelError(f"gradcam: model {model.name!r} has no {LOGITS_NAME!r} layer nor a final Activation layer")


def _check_classes(class_index, n: int, num_classes: int) -> np.ndarray:
    classes = np.asarray(class_index)
    if not np.issubdtype(classes.dtype, np.integer) or classes.ndim > 1 or classes.size not in (1, n) \
            or classes.min(initial=0) < 0 or classes.max(initial=0) >= num_classes:
        raise ValueError(f"gradcam: class_index must be an int or {n} ints in 0..{num_classes - 1}; "
                         f"got {class_index!r}")
    return np.broadcast_to(classes.reshape(-1), (n,)).astype(np.int32)
