"""Model compression with tensorflow-model-optimization and the TFLite converter (no I/O, no CLI).

Whole-model `prune_low_magnitude` / `quantize_model` do not apply to our models: their in-graph
preprocessing (uint8 input, Rescaling, grey-to-RGB Concatenate) is in neither tfmot registry. So layers
are annotated one by one with `keras.models.clone_model`: weighted layers tfmot supports are pruned or
quantized, the weight-free preprocessing layers are left in float on purpose (the TFLite converter
calibrates them from the representative dataset), and any other layer tfmot does not support makes the
variant fail with `VariantSkipped` naming the layer, because compressing around it would silently leave
part of the model uncompressed.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import \
    prune_preserve_quantize_registry
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import \
    default_8bit_quantize_registry
from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

from distributed.model.builders import (LOGITS_NAME, OUTPUT_NAME, PREPROCESSING_LAYER_NAMES, is_ensemble_combination,
                                        member_layer_name)
from distributed.model.calibration import is_calibration_layer
from cxrscale.errors import CxrError
from cxrscale.console import quiet_tensorflow

PRUNABLE_TYPES = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D,
                  keras.layers.SeparableConv2D)
MIN_PRUNED_WEIGHTS = 1024  # smaller kernels (the first conv, the logits) cost accuracy and save nothing


class VariantSkipped(CxrError):
    """A variant that cannot be built for this model; the message names the layer and the reason."""


def _weighted(layer) -> bool:
    return bool(layer.weights) and not isinstance(layer, keras.layers.InputLayer)


def _describe(layer) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def pruned_weights(layer):
    """The weights tfmot's magnitude pruning zeroes in a layer of PRUNABLE_TYPES, as its PruneRegistry names
    them: a convolution's or dense layer's kernel, a separable convolution's pointwise kernel, and none of a
    depthwise convolution (EfficientNetV2's, ConvNeXt's: tfmot leaves those few weights whole)."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return None
    return layer.pointwise_kernel if isinstance(layer, keras.layers.SeparableConv2D) else layer.kernel


# --- pruning --------------------------------------------------------------------------------------------

def prune_targets(model: keras.Model) -> list[str]:
    """Names of the layers magnitude pruning applies to: convolutions and dense layers with at least
    MIN_PRUNED_WEIGHTS kernel weights, except the logits layer. Raises `VariantSkipped` for a weighted
    layer that tfmot cannot prune."""
    targets = []
    for layer in model.layers:
        if not _weighted(layer):
            continue
        if not prune_registry.PruneRegistry.supports(layer) and not isinstance(
                layer, tfmot.sparsity.keras.PrunableLayer):
            raise VariantSkipped(f"{_describe(layer)} is not supported by tfmot pruning (a custom layer must "
                                 "implement tfmot.sparsity.keras.PrunableLayer)")
        fixed_map = is_calibration_layer(layer) or is_ensemble_combination(layer)
        weights = pruned_weights(layer) if isinstance(layer, PRUNABLE_TYPES) else None
        if weights is not None and member_layer_name(layer.name) != LOGITS_NAME and not fixed_map \
                and int(np.prod(weights.shape)) >= MIN_PRUNED_WEIGHTS:
            targets.append(layer.name)
    if not targets:
        raise VariantSkipped(f"model {model.name!r} has no convolution or dense layer to prune")
    return targets


def prune_wrap(model: keras.Model, sparsity: float, total_steps: int) -> keras.Model:
    """`prune_low_magnitude` on the prune targets, with a polynomial-decay schedule from 0 to `sparsity`
    reached at 75 % of `total_steps`, so the last quarter of fine-tuning recovers at the final sparsity."""
    if not 0 < sparsity < 1:
        raise CxrError(f"--sparsity values must be in (0, 1), got {sparsity}")
    targets = set(prune_targets(model))
    end = max(1, int(0.75 * total_steps))
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0,
                                                    end_step=end, frequency=max(1, end // 10))

    def wrap(layer):
        fresh = layer.__class__.from_config(layer.get_config())  # never the original: pruning edits weights
        if layer.name in targets:
            return tfmot.sparsity.keras.prune_low_magnitude(fresh, pruning_schedule=schedule)
        return fresh

    return _clone(model, wrap)


def strip_pruning(model: keras.Model) -> keras.Model:
    return tfmot.sparsity.keras.strip_pruning(model)


def layer_sparsity(model: keras.Model) -> dict[str, float]:
    """Measured fraction of exactly-zero kernel weights of every convolution / dense layer."""
    return {layer.name: float(np.mean(pruned_weights(layer).numpy() == 0)) for layer in model.layers
            if isinstance(layer, PRUNABLE_TYPES) and pruned_weights(layer) is not None}


# --- quantization-aware training ------------------------------------------------------------------------

def quantize_wrap(model: keras.Model, *, preserve_sparsity: bool = False) -> keras.Model:
    """The model with fake-quantized weights and activations (tfmot's default 8-bit scheme) on every layer
    tfmot supports; the weight-free preprocessing layers stay float. preserve_sparsity: the
    prune-preserving scheme of tfmot's collaborative optimisation (the pruned zeros stay zero)."""
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    def stays_float(layer) -> bool:  # weight-free preprocessing, an ensemble's mean of logits, the calibration
        return member_layer_name(layer.name) in PREPROCESSING_LAYER_NAMES or is_calibration_layer(layer) or \
            is_ensemble_combination(layer) or (
                layer.name == OUTPUT_NAME and any(is_calibration_layer(other) for other in model.layers))

    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or stays_float(layer) or isinstance(layer, FLOAT_LAYERS):
            continue
        # BatchNormalization is not quantized on its own: tfmot folds it into the convolution before it
        if not type(layer).__module__.startswith("tf_keras.") or not (
                registry.supports(layer) or isinstance(layer, keras.layers.BatchNormalization)):
            raise VariantSkipped(f"{_describe(layer)} is not supported by tfmot's default 8-bit quantization "
                                 "(a custom layer needs a tfmot QuantizeConfig)")

    def wrap(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        if stays_float(layer):
            return fresh
        if isinstance(layer, FLOAT_LAYERS):
            return tfmot.quantization.keras.quantize_annotate_layer(fresh, quantize_config=FloatQuantizeConfig())
        return tfmot.quantization.keras.quantize_annotate_layer(fresh)

    annotated = _clone(model, wrap)
    scheme = _PrunePreserveScheme() if preserve_sparsity else None
    try:
        with tfmot.quantization.keras.quantize_scope({"FloatQuantizeConfig": FloatQuantizeConfig}):
            return tfmot.quantization.keras.quantize_apply(annotated, scheme) if scheme else \
                tfmot.quantization.keras.quantize_apply(annotated)
    except (ValueError, RuntimeError, TypeError) as err:  # tfmot names the unsupported layer
        raise VariantSkipped(f"tfmot's 8-bit quantization cannot take this model: {str(err).splitlines()[0]}") \
            from None

class FloatQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """A layer left in float inside a quantization-aware model: no fake quantization of its weights or its
    output (tfmot's documented way to keep a layer out, "Modify parts of layer to quantize"). The TFLite
    converter then quantizes it from the calibration data like any float op, or keeps it float."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


# tfmot's 8-bit scheme has no configuration for these; they stay float (ConvNeXt's LayerNormalization)
FLOAT_LAYERS = (keras.layers.LayerNormalization,)


class _PrunePreserveRegistry(prune_preserve_quantize_registry.Default8bitPrunePreserveQuantizeRegistry):
    """tfmot's prune-preserving registry claims every weight-free layer, then cannot configure one the
    default 8-bit registry does not know (our Rescaling before the first conv): defer to the default
    registry for those, so they stay float as in plain QAT."""

    def supports(self, layer) -> bool:
        if self._no_trainable_weights(layer):
            return default_8bit_quantize_registry.Default8BitQuantizeRegistry().supports(layer)
        return super().supports(layer)


class _PrunePreserveScheme(tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme):
    def get_quantize_registry(self):
        return _PrunePreserveRegistry()


def _clone(model: keras.Model, wrap: Callable) -> keras.Model:
    """clone_model with `wrap` per layer, then the original weights copied in by layer name."""
    clone = keras.models.clone_model(model, clone_function=wrap)
    for layer in clone.layers:
        inner = getattr(layer, "layer", layer)  # a pruning/quantize wrapper holds the original layer
        source = model.get_layer(inner.name)
        if source.weights:
            inner.set_weights(source.get_weights())
    return clone


# --- TFLite conversion ----------------------------------------------------------------------------------

TFLITE_KINDS = ("fp32", "dynamic", "float16", "int8")
# The output sigmoid/softmax stays float in int8 models: int8 LOGISTIC has a fixed 1/256 output step, which
# ties every confident case at 255/256 and loses the ranking (docs/benchmarks.md, "Design measurements").
# It costs one float op per image.
FLOAT_OUTPUT_OPS = ["LOGISTIC", "SOFTMAX"]


def to_tflite(model: keras.Model, kind: str, representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
              *, float_ops: Sequence[str] = FLOAT_OUTPUT_OPS) -> bytes:
    """Convert a Keras model. kind: fp32 (no optimisation), dynamic (int8 weights, float activations),
    float16 (float16 weights), int8 (weights and activations int8, uint8 input, the `float_ops` (the final
    sigmoid/softmax) in float, float32 output; pass float_ops=() for QAT models, whose trained fake-quant
    ranges must be kept; needs a representative dataset, also for QAT models, whose
    float preprocessing layers need calibrating). Selective quantization is tf.lite's QuantizationDebugger
    with denylisted ops, the documented way to keep chosen ops in float."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if kind == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        if representative is None:
            raise ValueError("int8 conversion needs a representative dataset")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
        if not float_ops:  # a QAT model: its fake-quant ranges decide, the debugger would re-calibrate them
            return _convert(converter.convert, kind)
        return _convert(lambda: tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
        ).get_nondebug_quantized_model(), kind)
    elif kind != "fp32":
        raise ValueError(f"unknown TFLite kind {kind!r}: one of {', '.join(TFLITE_KINDS)}")
    return _convert(converter.convert, kind)


def _convert(convert: Callable[[], bytes], kind: str) -> bytes:
    try:
        with quiet_tensorflow():  # the calibrator prints a line per quantized model to native stderr
            return convert()
    except Exception as err:  # the converter raises ConverterError and assorted others
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VariantSkipped(f"the TFLite converter failed ({kind}): {first}") from None


def representative_from(images: Iterable[np.ndarray]) -> Callable[[], Iterator[list[np.ndarray]]]:
    """A representative-dataset generator of single uint8 images (1, H, W, C), as the converter wants."""
    frozen = [np.asarray(img)[np.newaxis] for img in images]

    def generate():
        for image in frozen:
            yield [image]

    return generate
