"""The model zoo: every model `--model` can name, one module each, registered as the module is imported.

    from distributed.model.zoo import build_model, model_names
    model = build_model("resnet50", image_size=224, weights="imagenet", freeze_base=True, seed=1)

A module of this package defines a builder and registers its `ModelSpec` (distributed.model.registry);
this package imports every module in it, so adding a backbone is adding one file (and its test): training's
config, the tuning spaces, the benchmarks and `--help` all read the registry. No TensorFlow is imported
until a model is built.
"""
from __future__ import annotations

import importlib
import pkgutil

from distributed.model.heads import ModelError
from distributed.model.registry import ModelSpec, check_image_size as _check_spec_size, registered

for _module in sorted(found.name for found in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")


def model_names() -> tuple[str, ...]:
    """Every model --model can name, in name order."""
    return tuple(registered())


def model_spec(name: str) -> ModelSpec:
    """The spec of model `name` (case-insensitive); ModelError naming --model and the choices otherwise."""
    key = str(name).strip().lower()
    models = registered()
    if key not in models:
        raise ModelError(f"--model {name!r} is not a known model; choose one of {', '.join(models)}")
    return models[key]


def min_image_size(name: str) -> int:
    """Smallest input side, in pixels, that `build_model(name, ...)` accepts (with default settings)."""
    return model_spec(name).min_image_size


def check_image_size(name: str, image_size: int, minimum: int | None = None, source: str = "the data") -> None:
    """ModelError unless model `name` takes square images of `image_size` px (its smallest side), naming
    `source` and the fix."""
    _check_spec_size(model_spec(name), image_size, minimum, source)


def build_model(name: str, image_size: int, num_classes: int = 2, *, weights: str = "none",
                dropout: float | None = None, l2: float = 1e-4, freeze_base: bool = False,
                fine_tune_from: str | None = None, seed: int | None = None, multilabel: bool = False):
    """Build model `name` of the zoo for uint8 (batch, image_size, image_size, 1) input: an uncompiled
    keras.Model whose head (`Head.of_model`) gives its loss, accuracy and probabilities.

    Args:
        name: a name of `model_names()` (case-insensitive).
        image_size: input side in pixels; at least `min_image_size(name)`.
        num_classes: K >= 2. For K == 2 the heads are the thesis's (VGG16: 2-unit softmax, ResNet50 and the
            CNN: 1-unit sigmoid); for K > 2 every model ends in a K-unit softmax.
        multilabel: K >= 1 labels, each its own sigmoid unit (a multi-label dataset's head).
        weights: "none" (random init, seeded by `seed`), "imagenet" (models with `spec.imagenet`; Keras
            downloads the notop file), or a path to a weights file (.h5, .keras, .weights.h5, a TF checkpoint
            prefix or a SavedModel directory) saved from the same architecture, or, for an ImageNet model, a
            backbone-only .h5 such as Keras's ImageNet "notop" file.
        dropout: head dropout rate; None means the model's `default_dropout`.
        l2: L2 factor on the dense layers' kernels.
        freeze_base: backbone layers not trainable (the thesis's VGG16 setup).
        fine_tune_from: a backbone layer name; layers before it are frozen, it and later ones trainable.
            Takes precedence over `freeze_base`.
        seed: when given, `keras.utils.set_random_seed(seed)` first, so the initial weights (and later
            dropout masks) are reproducible.

    Raises:
        ModelError: unknown name, image too small, num_classes < 2, bad weights, unknown fine_tune_from.
    """
    spec = model_spec(name)
    if isinstance(weights, str) and weights.strip().lower() == "imagenet" and not spec.imagenet:
        raise ModelError(f"--weights imagenet: there are no ImageNet weights for --model {spec.name}; "
                         f"use --weights none or a weights file saved from a {spec.name} run")
    if seed is not None:
        from distributed.model.kerasenv import keras

        keras.utils.set_random_seed(int(seed))
    return spec.build(image_size, num_classes, weights=weights,
                      dropout=spec.default_dropout if dropout is None else dropout, l2=l2, freeze_base=freeze_base,
                      fine_tune_from=fine_tune_from, multilabel=multilabel)
