"""Load a trained classifier from a run, an exported model or a `.tflite` file, and score uint8 images.

Every model of this toolkit takes uint8 images (n, H, W, C) and does its own scaling, so a `Scorer` is all
evaluation, prediction and the optimize stage need: give it pixels, get probabilities (n, K), K as its
`Head` says (distributed.model.heads).

No TensorFlow here: a `.tflite` model runs on LiteRT (`ai_edge_litert`), so a process that only serves one
(`distributed.predict --model model.tflite`) never loads TensorFlow. Keras models are loaded by
`distributed.model.keras_scoring`, imported only when one is asked for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrscale.console import quiet_tensorflow
from cxrscale.errors import CxrError
from cxrscale.files import read_json
from distributed.model.heads import Head
from distributed.model.scorer import Scorer, scoring_head

KERAS_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")


def run_model_path(run_dir: str | Path) -> Path:
    """The exported model of a training run (`runs/NAME/model`), or a clear error."""
    run_dir = Path(run_dir)
    read_run_config(run_dir)
    model = run_dir / "model"
    if not (model / "saved_model.pb").is_file():
        raise CxrError(f"{run_dir} has no exported model ({model}/saved_model.pb is missing): the training run "
                       "did not finish; resume it with python -m distributed.train --resume")
    return model


def read_run_config(run_dir: str | Path) -> dict:
    if not Path(run_dir).is_dir():
        raise CxrError(f"run folder not found: {run_dir}")
    return read_json(Path(run_dir) / "config.json", "training run config")


def load_scorer(path: str | Path, *, num_threads: int | None = None, head: Head | None = None) -> Scorer:
    """A SavedModel folder or `.keras`/`.h5` file (loaded with tf_keras), or a `.tflite` file (LiteRT).
    `head`: the head the run recorded (`run_head`); without it a Keras model's head is read from its output
    layer, and a `.tflite` file's from its output units (1: binary; K: K-class softmax)."""
    path = Path(path)
    if not path.exists():
        raise CxrError(f"model not found: {path}")
    if path.suffix == ".tflite":
        return tflite_scorer(path, num_threads, head=head)
    if path.is_dir() and not (path / "saved_model.pb").is_file():
        raise CxrError(f"{path} is a folder but not a SavedModel (no saved_model.pb); pass a run with --run, "
                       "a SavedModel folder, a .keras/.h5 file or a .tflite file")
    if path.is_file() and path.suffix not in KERAS_FILE_SUFFIXES:
        raise CxrError(f"{path}: unknown model format {path.suffix!r}; expected a SavedModel folder, "
                       f"{', '.join(KERAS_FILE_SUFFIXES)} or .tflite")
    from distributed.model.keras_scoring import keras_scorer  # TensorFlow loads here, and only here

    return keras_scorer(path, head=head)


ADAPTATION_FILE = "adaptation.json"  # in a run adapted by distributed.adapt: the site, its sample, intervals


def adapted_threshold(run_dir: Path) -> tuple[float, str] | None:
    """(threshold, where it came from) of an adapted run (RUN/adaptation.json with a labelled sample)."""
    path = Path(run_dir) / ADAPTATION_FILE
    if not path.is_file():
        return None
    record = read_json(path, "adaptation record")
    site = record.get("labelled")
    if not site or "threshold" not in site:  # none, or a multi-label model's (adapted_finding_thresholds)
        return None
    return float(site["threshold"]), (f"{site['rule']} on {site['n']} labelled images of site {record['site']} "
                                      "(distributed.adapt)")


def adapted_finding_thresholds(run_dir: Path) -> tuple[dict[str, float], str] | None:
    """({finding: threshold}, where they came from) of a multi-label run adapted with a labelled sample
    (RUN/adaptation.json): the findings that had enough site labels; the others keep their validation rule."""
    path = Path(run_dir) / ADAPTATION_FILE
    if not path.is_file():
        return None
    record = read_json(path, "adaptation record")
    site = record.get("labelled") or {}
    chosen = {r["finding"]: float(r["threshold"]) for r in site.get("findings", []) if r["adapted"]}
    if not chosen:
        return None
    return chosen, f"{site['rule']} on {site['n']} labelled images of site {record['site']} (distributed.adapt)"


def run_head(run_config: dict) -> Head | None:
    """The head a run folder's config.json records (None for a run recorded before heads were: its model
    says which it has)."""
    head = run_config.get("head")
    return Head.from_dict(head) if head else None


def litert_interpreter(path: str | Path, num_threads: int | None = None):
    """A LiteRT interpreter of a `.tflite` file (`ai_edge_litert.interpreter.Interpreter`), or a clear error."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        return Interpreter(model_path=str(path), num_threads=num_threads)
    except (ValueError, RuntimeError) as err:
        raise CxrError(f"cannot load the TFLite model {path}: {str(err).splitlines()[0]}") from None


def tflite_scorer(path: Path, num_threads: int | None = None, *, head: Head | None = None) -> Scorer:
    """A Scorer of a TFLite file on LiteRT (whatever the file's name)."""
    interpreter = litert_interpreter(path, num_threads)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    shape = tuple(int(d) for d in inp["shape"][1:])
    if len(shape) != 3:
        raise CxrError(f"{path} takes inputs of shape {inp['shape']}, not images (H, W, C)")
    batch_size = [0]

    def predict(batch: np.ndarray) -> np.ndarray:
        if len(batch) != batch_size[0]:  # the converter fixes batch 1; resize to this batch once
            interpreter.resize_tensor_input(inp["index"], [len(batch), *shape])
            with quiet_tensorflow():  # the interpreter announces its XNNPACK delegate here
                interpreter.allocate_tensors()
            batch_size[0] = len(batch)
        interpreter.set_tensor(inp["index"], quantize_input(batch, inp))
        interpreter.invoke()
        return dequantize_output(interpreter.get_tensor(out["index"]), out)

    units = int(out["shape"][-1]) if len(out["shape"]) else 1
    return Scorer(path, "tflite", shape, scoring_head(head, Head.of_outputs(units), path), predict)


def quantize_input(images: np.ndarray, detail: dict) -> np.ndarray:
    """uint8 pixels -> the interpreter's input tensor: cast for float/plain-uint8 inputs, quantized with the
    tensor's (scale, zero point) for quantized integer inputs."""
    dtype = detail["dtype"]
    scale, zero = detail.get("quantization", (0.0, 0))
    identity = scale == 0.0 or (scale == 1.0 and zero == 0)
    if np.issubdtype(dtype, np.integer) and not identity:
        info = np.iinfo(dtype)
        return np.clip(np.round(images.astype(np.float32) / scale + zero), info.min, info.max).astype(dtype)
    return images.astype(dtype)


def dequantize_output(values: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(values.dtype, np.integer) and scale:
        return (values.astype(np.float32) - zero) * scale
    return values.astype(np.float32)
