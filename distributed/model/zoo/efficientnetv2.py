"""EfficientNetV2 B0 and S (Tan and Le 2021) from keras.applications, the backbones the thesis names as future
work, with the pooled head. Both normalise their input inside the backbone (keras.applications'
include_preprocessing), so they take RGB pixels 0..255."""
from __future__ import annotations

from distributed.model.registry import COMMON_TUNE_SPACE, ModelSpec, register


def _builder(variant: str):
    def build(image_size: int, num_classes: int = 2, *, weights: str = "none", dropout: float = 0.2,
              l2: float = 1e-4, freeze_base: bool = False, fine_tune_from: str | None = None,
              multilabel: bool = False):
        """EfficientNetV2 on uint8 greyscale input.

        image (s, s, 1) uint8 -> pixels_to_float -> grey_to_rgb (s, s, 3) -> the keras.applications
        EfficientNetV2 base without top, its own rescaling first (s/32, s/32, 1280) -> head_global_avg_pool
        -> head_dropout -> logits -> predictions (as the other backbones: sigmoid, softmax or K sigmoids).

        B0's base holds 5,919,312 parameters, S's 20,331,360, at any image size; the logits 1,281 x units.
        """
        from distributed.model.builders import pooled_head, transfer_classifier
        from distributed.model.kerasenv import keras

        constructor = {"b0": keras.applications.EfficientNetV2B0, "s": keras.applications.EfficientNetV2S}[variant]
        spec = SPECS[variant]
        return transfer_classifier(spec, constructor, pooled_head(num_classes, dropout=dropout, l2=l2,
                                                                  multilabel=multilabel),
                                   image_size, num_classes, weights, freeze_base, fine_tune_from, multilabel)
    build.__name__ = f"build_efficientnetv2_{variant}_classifier"
    return build


_TUNE = {"lr": {"loguniform": [1e-5, 1e-3], "grid": [1e-4, 3e-4]}, **COMMON_TUNE_SPACE}
# Downsamples by 32: below 32 px the last stage gets an empty map.
SPECS = {
    "b0": register(ModelSpec(
        name="efficientnetv2-b0", summary="EfficientNetV2-B0 on ImageNet weights, pooled into its logits",
        build=_builder("b0"), min_image_size=32, default_dropout=0.2, imagenet=True, input_scaling="pixels",
        tune_space={**_TUNE, "batch_size": {"choice": [16, 32, 64], "grid": [32]},
                    "fine_tune_from": {"choice": ["block6a_expand_conv", "block5a_expand_conv", None],
                                       "grid": ["block6a_expand_conv"]}},
        benchmark_size=224)),
    "s": register(ModelSpec(
        name="efficientnetv2-s", summary="EfficientNetV2-S on ImageNet weights, pooled into its logits",
        build=_builder("s"), min_image_size=32, default_dropout=0.2, imagenet=True, input_scaling="pixels",
        tune_space={**_TUNE, "batch_size": {"choice": [16, 32], "grid": [16]},
                    "fine_tune_from": {"choice": ["block6a_expand_conv", "block5a_expand_conv", None],
                                       "grid": ["block6a_expand_conv"]}},
        benchmark_size=224)),
}
