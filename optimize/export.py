"""python -m optimize.export: a trained run as models to deploy: TF Serving, ONNX (ONNX Runtime, Triton), TFLite.

    python -m optimize.export --run runs/kermany-cnn --format all
    python -m optimize.export --run runs/demo/final --format onnx --name cxr-pneumonia --output deploy/

Every format computes the same thing as the run's exported model, calibration and ensemble included: uint8
images (n, H, W, 1), prepared with the run's transform (in export.json), in; calibrated class probabilities
(n, K) out, under the names `images` and `probabilities`. Under OUTPUT (default RUN/export):

    serving/NAME/V/saved_model.pb   TF Serving's versioned layout (signature serving_default)
    onnx/NAME/V/model.onnx          ONNX, opset 17, by tf2onnx; the folder is also a Triton model repository
    tflite/NAME.tflite              float32 TFLite for LiteRT (quantized variants: optimize.prune_quantize)
    export.json                     classes, input, transform, threshold, guard, each file's sha256 and parity
                                    (distributed.predict --model reads its transform and threshold)
    guard.npz                       the out-of-distribution guard (distributed.model.guard), which
                                    distributed.predict --model applies
    model_card.md                   the run's model card (distributed.evaluate writes it)

V is one more than the highest version already under serving/NAME and onnx/NAME (1 at first), so a new export
never replaces a served one. Each file is checked before it is moved into place: its probabilities on the
first --check-images radiographs of the run's test split may differ from the Keras model's by at most
--tolerance; a format that fails the check is not written.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from distributed.evaluation.model_card import CARD_NAME
from distributed.model.guard import GUARD_FILE
from distributed.model.heads import Head
from distributed.model.scoring import load_scorer, read_run_config, run_head, run_model_path, tflite_scorer
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, config_from, int_at_least, run_cli
from cxrscale.console import quiet_tensorflow, setup_logging
from cxrscale.files import (atomic_dir, atomic_path, check_writable_dir, read_json, sha256_file, write_bytes_atomic,
                            write_json_atomic)
from preprocessing import schema

if TYPE_CHECKING:
    import tensorflow as tf

    from distributed.model.kerasenv import keras

log = logging.getLogger("cxrscale.export")

FORMATS = ("serving", "onnx", "tflite")
ONNX_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


def serving_function(model: keras.Model, head: Head) -> tf.types.experimental.PolymorphicFunction:
    """uint8 images (None, H, W, C) -> {"probabilities": (None, head.columns) float32}: the model's output as
    its head's probability columns (a sigmoid unit's P(positive) widened to [1 - p, p]), so that every format
    and every class count reads alike."""
    import tensorflow as tf  # the model is loaded, so TensorFlow is: this import costs nothing

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8, name=INPUT_NAME)

    @tf.function(input_signature=[spec], autograph=False)
    def serve(images):
        probs = tf.cast(model(images, training=False), tf.float32)
        if head.columns != head.units:  # one sigmoid unit, two columns
            probs = tf.concat([1.0 - probs, probs], axis=-1)
        return {OUTPUT_NAME: tf.identity(probs, name=OUTPUT_NAME)}

    return serve


def next_version(output: Path, name: str) -> int:
    """One more than the highest numeric version folder under serving/NAME and onnx/NAME, else 1."""
    found = [int(p.name) for fmt in ("serving", "onnx") if (output / fmt / name).is_dir()
             for p in (output / fmt / name).iterdir() if p.is_dir() and p.name.isdigit()]
    return max(found, default=0) + 1


def check_images(data_dir: Path, split: str, count: int) -> np.ndarray:
    """The first `count` uint8 images of a prepared split: the radiographs every format is checked on."""
    images = [image for image, _ in schema.dataset(data_dir, split).take(count).as_numpy_iterator()]
    if not images:
        raise CxrError(f"the {split} split of {data_dir} is empty: nothing to check the exported models on")
    return np.stack(images)


def batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, size: int = 32) -> np.ndarray:
    """fn over `images` in batches of `size` (a large check split never goes through a model at once)."""
    return np.concatenate([fn(images[i:i + size]) for i in range(0, len(images), size)])


def parity(name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> dict[str, Any]:
    """{"max_abs_difference", "images"}, or a clear error when the format drifts from the Keras model."""
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    if not np.isfinite(diff) or diff > tolerance:
        raise CxrError(f"the {name} export gives probabilities up to {diff:.3g} away from the Keras model's on "
                       f"{len(want)} test radiographs (allowed {tolerance:g}); it was not written")
    log.info("%s: largest probability difference from the Keras model %.2e on %d test radiographs",
             name, diff, len(want))
    return {"max_abs_difference": diff, "images": int(len(want))}


def export_serving(serve, model: keras.Model, target: Path, images: np.ndarray, want: np.ndarray,
                   tolerance: float) -> dict[str, Any]:
    import tensorflow as tf

    holder = tf.Module()
    holder.model = model  # the variables the signature reads
    with atomic_dir(target) as tmp:
        with quiet_tensorflow():
            tf.saved_model.save(holder, str(tmp), signatures={"serving_default": serve})
        loaded = tf.saved_model.load(str(tmp)).signatures["serving_default"]
        got = batched(lambda b: loaded(**{INPUT_NAME: tf.constant(b)})[OUTPUT_NAME].numpy(), images)
        check = parity("serving", got, want, tolerance)
    return {"path": str(target), "sha256": sha256_file(target / "saved_model.pb"), "parity": check}


def _erfc_as_one_minus_erf(ctx, node, name, args) -> None:
    """tf2onnx's handler for TensorFlow's Erfc, which ONNX lacks: erfc(x) = 1 - erf(x). TensorFlow's exact
    GELU (keras's "gelu", ConvNeXt's activation) is written with Erfc, which tf2onnx 1.17 leaves in the graph
    as an op no runtime knows (onnx/tensorflow-onnx#2347)."""
    from tf2onnx import utils

    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=name)
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


def export_onnx(serve, target: Path, images: np.ndarray, want: np.ndarray, tolerance: float) -> dict[str, Any]:
    import onnxruntime
    import tf2onnx

    with atomic_dir(target.parent) as tmp:
        spec = serve.input_signature
        with quiet_tensorflow():
            tf2onnx.convert.from_function(serve, input_signature=spec, opset=ONNX_OPSET,
                                          custom_op_handlers={"Erfc": (_erfc_as_one_minus_erf, [])},
                                          output_path=str(tmp / target.name))
        session = onnxruntime.InferenceSession(str(tmp / target.name), providers=["CPUExecutionProvider"])
        got = batched(lambda b: session.run([OUTPUT_NAME], {INPUT_NAME: b})[0], images)
        check = parity("onnx", got, want, tolerance)
    versions = {"tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return {"path": str(target), "sha256": sha256_file(target), "opset": ONNX_OPSET, "parity": check, **versions}


def export_tflite(serve, model: keras.Model, target: Path, images: np.ndarray, want: np.ndarray,
                  tolerance: float) -> dict[str, Any]:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)
    with quiet_tensorflow():
        data = converter.convert()
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
        got = tflite_scorer(tmp).predict(images)
        check = parity("tflite", got, want, tolerance)
    return {"path": str(target), "sha256": sha256_file(target), "runtime": "LiteRT (ai_edge_litert)",
            "parity": check}


@dataclass(frozen=True)
class ExportConfig:
    """Every option of `python -m optimize.export` (see `build_parser`), as `parse_config` builds it."""

    run: str
    format: tuple[str, ...] = ("all",)
    output: str | None = None
    name: str | None = None
    model_version: int | None = None
    data: str | None = None
    split: str = "test"
    check_images: int = 256
    tolerance: float = DEFAULT_TOLERANCE
    quiet: bool = False


def export(config: ExportConfig) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = Path(config.run)
    run_config = read_run_config(run_dir)
    model_path = run_model_path(run_dir)
    data_dir = Path(config.data) if config.data else Path(run_config["config"]["data"])
    if not data_dir.is_dir():
        raise CxrError(f"--data {data_dir}: no such folder" if config.data else
                       f"the run's dataset {data_dir} is not here: pass --data with the prepared folder (the "
                       "exported models are checked on its test split)")
    manifest = schema.read_manifest(data_dir)
    output = Path(config.output) if config.output else run_dir / "export"
    check_writable_dir(output, "--output")
    name = config.name or run_dir.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise CxrError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names serving and Triton "
                       "model folders)")
    formats = FORMATS if "all" in config.format else tuple(dict.fromkeys(config.format))
    version = config.model_version or next_version(output, name)
    for fmt in ("serving", "onnx"):
        if fmt in formats and (output / fmt / name / str(version)).exists():
            raise CxrError(f"{output / fmt / name / str(version)} exists: served versions are never replaced; "
                           "pick another --model-version or leave it out for the next free one")

    # TensorFlow loads here (a run's model is a Keras SavedModel, loaded with tf_keras), after the checks that
    # need none: a mistake is reported without its start-up
    scorer = load_scorer(model_path, head=run_head(run_config))
    model = scorer.keras_model
    if scorer.input_shape != schema.image_shape(manifest):
        raise CxrError(f"{model_path} takes {scorer.input_shape} images but {data_dir} holds "
                       f"{schema.image_shape(manifest)}: pass --data with the run's prepared dataset")
    images = check_images(data_dir, config.split, config.check_images)
    want = scorer.predict(images)
    serve = serving_function(model, scorer.head)

    record_path = output / "export.json"
    record = read_json(record_path, "export record") if record_path.is_file() else {}
    eval_metrics = run_dir / "eval" / "metrics.json"
    evaluation = read_json(eval_metrics, "evaluation metrics") if eval_metrics.is_file() else {}
    record.update({
        "name": name, "run": str(run_dir), "model": str(model_path),
        "model_sha256": sha256_file(model_path / "saved_model.pb"),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [None, *scorer.input_shape]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, scorer.head.columns],
                   "meaning": ("calibrated probability of each finding, independent, columns in the order of "
                               "classes" if scorer.head.multilabel
                               else "calibrated class probabilities, columns in the order of classes")},
        "head": scorer.head.to_dict(),
        "classes": list(manifest["classes"]), "transform": manifest["transform"],
        "threshold": evaluation.get("threshold"), "tta": bool(evaluation.get("tta")),
        # a multi-label model's threshold of each finding, chosen on validation (distributed.predict reads it)
        **({"finding_thresholds": {r["finding"]: r["threshold"] for r in evaluation["findings"]["findings"]}}
           if evaluation.get("findings") else {}),
        "checked_on": {"data": str(data_dir), "split": config.split, "images": int(len(images)),
                       "tolerance": config.tolerance},
    })
    record.setdefault("formats", {})
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "serving": lambda: export_serving(serve, model, output / "serving" / name / str(version), images, want,
                                          config.tolerance),
        "onnx": lambda: export_onnx(serve, output / "onnx" / name / str(version) / "model.onnx", images, want,
                                    config.tolerance),
        "tflite": lambda: export_tflite(serve, model, output / "tflite" / f"{name}.tflite", images, want,
                                        config.tolerance),
    }
    for fmt in formats:
        log.info("exporting %s", fmt)
        record["formats"][fmt] = {**steps[fmt](), "version": version if fmt != "tflite" else None}
        write_json_atomic(record_path, record)  # after each format: what is written is recorded
    guard = run_dir / "eval" / GUARD_FILE
    if guard.is_file():  # so is the out-of-distribution guard, which predict --model reads beside export.json
        write_bytes_atomic(output / GUARD_FILE, guard.read_bytes())
        record["guard"] = {**(evaluation.get("guard") or {}), "file": GUARD_FILE}
    else:
        record.pop("guard", None)
        log.warning("%s has no out-of-distribution guard (%s): predictions from these exports will not flag "
                    "unfamiliar images; run python -m distributed.evaluate --run %s", run_dir, guard, run_dir)
    card = run_dir / CARD_NAME
    if card.is_file():  # the card travels with the models it describes
        write_bytes_atomic(output / CARD_NAME, card.read_bytes())
        record["model_card"] = str(output / CARD_NAME)
    else:
        log.warning("%s has no %s yet: run python -m distributed.evaluate --run %s to write it", run_dir, CARD_NAME,
                    run_dir)
    write_json_atomic(record_path, record)
    log.info("exported %s of %s to %s in %.0f s", ", ".join(formats), run_dir, output, time.perf_counter() - started)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m optimize.export", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="examples:\n  python -m optimize.export --run runs/demo/final --format all\n"
                                  "  python -m optimize.export --run runs/demo/final --format onnx tflite "
                                  "--output deploy --name cxr-pneumonia")
    parser.add_argument("--run", required=True, help="a finished training or ensemble run (runs/NAME)")
    parser.add_argument("--format", nargs="+", choices=(*FORMATS, "all"), default=["all"],
                        help="what to write (default all)")
    parser.add_argument("--output", help="the export folder (default RUN/export)")
    parser.add_argument("--name", help="the model's name in the serving and Triton layouts (default: the run "
                                       "folder's name)")
    parser.add_argument("--model-version", type=int_at_least(1),
                        help="the version folder V (default: one more than the highest already exported)")
    parser.add_argument("--data", help="the prepared dataset to check on (default: the run's)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="the split whose radiographs check every format (default test)")
    parser.add_argument("--check-images", type=int_at_least(1), default=256,
                        help="how many of its radiographs (default 256)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest probability difference from the Keras model allowed (default "
                             f"{DEFAULT_TOLERANCE:g})")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ExportConfig:
    args = build_parser().parse_args(argv)
    if not 0 < args.tolerance < 1:
        raise CxrError(f"--tolerance must be in (0, 1), got {args.tolerance}")
    return config_from(ExportConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(logging.WARNING if config.quiet else logging.INFO)
    export(config)
    return 0


if __name__ == "__main__":
    run_cli(main)
