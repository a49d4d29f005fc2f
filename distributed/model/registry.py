"""The model registry's record: what a model `--model` can name is, as plain data (no TensorFlow).

Each model is one file in `distributed.model.zoo` that defines its builder and registers a `ModelSpec`
for it; `distributed.model.zoo` loads them all and is where the rest of the toolkit asks (names, specs,
`build_model`). Training's config checks a name and its weights here, tuning takes its default search
space, the benchmarks their setting, and the docs their one-line summary, so a new backbone is one zoo file
and its test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from distributed.model.heads import ModelError

_MODELS: dict[str, "ModelSpec"] = {}
# What every model's default search space (optimize.tune) draws besides its own rate, batch and backbone
# choices: each parameter names the distribution random search and ASHA draw from and the values grid search
# tries (see optimize/tune/space.py for the form). lr in a spec is per worker: distributed.train scales it by
# the worker count.
COMMON_TUNE_SPACE: dict[str, Any] = {
    "dropout": {"uniform": [0.1, 0.6], "grid": [0.3]},
    "l2": {"loguniform": [1e-6, 1e-3], "grid": [1e-4]},
    "augment": {"choice": [False, True], "grid": [False, True]},
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo.

    name: what --model takes. summary: one line for --help and the docs. build: the builder,
    (image_size, num_classes, *, weights, dropout, l2, freeze_base, fine_tune_from, multilabel) -> an uncompiled
    keras.Model taking uint8 (s, s, 1) images (it imports Keras when called). min_image_size: the smallest
    side in pixels it takes. default_dropout: the head's dropout when --dropout is not given. imagenet:
    Keras has ImageNet weights for its backbone, so --weights auto means imagenet, and freezing, fine-tuning
    from a layer and --cache-features apply; without them it trains whole from random weights.
    input_scaling: how the graph scales uint8 pixels ("unit": x / 255; for an ImageNet backbone the frame
    of its keras.applications preprocess_input, `builders.INPUT_SCALINGS`). tune_space: optimize.tune's
    default search space (see optimize/tune/space.py for the form). benchmark_size and benchmark_args: the
    image side and extra distributed.train flags benchmarks.train measures it with.
    """

    name: str
    summary: str
    build: Callable[..., Any] = field(repr=False)
    min_image_size: int
    default_dropout: float
    imagenet: bool
    input_scaling: str
    tune_space: dict[str, Any] = field(default_factory=dict, repr=False)
    benchmark_size: int = 224
    benchmark_args: tuple[str, ...] = ()


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to the registry (a zoo module calls this once, at import); returns it."""
    if spec.name in _MODELS and _MODELS[spec.name] is not spec:
        raise ValueError(f"two models registered as {spec.name!r}")
    _MODELS[spec.name] = spec
    return spec


def registered() -> dict[str, ModelSpec]:
    """Every registered model by name, in name order (`distributed.model.zoo` has loaded them)."""
    return dict(sorted(_MODELS.items()))


def check_image_size(spec: ModelSpec, image_size: int, minimum: int | None = None, source: str = "the data") -> None:
    """ModelError unless `spec`'s model takes square images of `image_size` px (its smallest side, or
    `minimum`): the one check of an image size against a model, for the builders and for a prepared dataset
    alike."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise ModelError(f"--model {spec.name}: the image size must be a whole number of pixels, got {image_size!r}")
    minimum = spec.min_image_size if minimum is None else minimum
    if image_size < minimum:
        raise ModelError(f"--model {spec.name} needs images of at least {minimum} px; {source} is {image_size} px: "
                         f"prepare it again with a larger --size (python -m preprocessing --size)")
