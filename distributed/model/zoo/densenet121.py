"""DenseNet121 (Huang et al. 2017), CheXNet's backbone (Rajpurkar et al. 2017) and TorchXRayVision's, from
keras.applications, with CheXNet's head: the pooled features into one unit per class or finding."""
from __future__ import annotations

from distributed.model.registry import COMMON_TUNE_SPACE, ModelSpec, register


def build_densenet121_classifier(image_size: int, num_classes: int = 2, *, weights: str = "none",
                                 dropout: float = 0.2, l2: float = 1e-4, freeze_base: bool = False,
                                 fine_tune_from: str | None = None, multilabel: bool = False):
    """DenseNet121 on uint8 greyscale input.

    image (s, s, 1) uint8 -> pixels_to_float -> grey_to_rgb (s, s, 3) -> imagenet_torch_norm (x / 255, then
    ImageNet's mean and std: keras.applications.densenet.preprocess_input) -> DenseNet121 base without top
    (conv1_conv .. relu: (s/32, s/32, 1024)) -> head_global_avg_pool (1024) -> head_dropout -> logits (1 for
    two classes, K) -> predictions (sigmoid; softmax for K > 2 classes; K sigmoids with `multilabel`).

    The base holds 7,037,504 parameters, the logits
    1,025 x units, at any image size.
    """
    from distributed.model.builders import pooled_head, transfer_classifier
    from distributed.model.kerasenv import keras

    return transfer_classifier(SPEC, keras.applications.DenseNet121,
                               pooled_head(num_classes, dropout=dropout, l2=l2, multilabel=multilabel),
                               image_size, num_classes, weights, freeze_base, fine_tune_from, multilabel)


# Downsamples by 32 (a stride-2 stem, a pool and three transitions): below 32 px the last block gets no map.
SPEC = register(ModelSpec(
    name="densenet121", summary="DenseNet121 on ImageNet weights, CheXNet's backbone, pooled into its logits",
    build=build_densenet121_classifier, min_image_size=32, default_dropout=0.2, imagenet=True,
    input_scaling="imagenet-torch",
    # CheXNet: Adam at 1e-3 with batch 16, the whole network trained
    tune_space={"lr": {"loguniform": [1e-5, 1e-3], "grid": [1e-4, 1e-3]},
                "batch_size": {"choice": [16, 32], "grid": [16]}, **COMMON_TUNE_SPACE,
                "fine_tune_from": {"choice": ["conv5_block1_0_bn", "conv4_block1_0_bn", None],
                                   "grid": ["conv5_block1_0_bn"]}},
    benchmark_size=224))
