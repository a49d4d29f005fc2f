"""optimize.export on a CNN trained on real radiographs: TF Serving, ONNX (checked with ONNX Runtime) and TFLite
(on LiteRT) compute the run's calibrated probabilities, and a .tflite prediction never loads TensorFlow."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from distributed.model.scoring import load_scorer
from preprocessing import schema
from tests.conftest import PYTHON, REPO
from tests.launch.cli import IN_PROCESS, run_in_process
from tests.training_fixtures import quiet

pytestmark = pytest.mark.slow


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    if module in IN_PROCESS:
        return run_in_process(module, *args)
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_every_format_gives_the_runs_calibrated_probabilities_on_real_radiographs(real_run, tmp_path):
    import onnxruntime
    import tensorflow as tf

    run, data = real_run["run"], real_run["data"]
    if not (run / "model_card.md").is_file():  # distributed.evaluate writes it; this test may run on its own
        result = run_module("distributed.evaluate", "--run", str(run), "--bootstrap", "50", "--no-gradcam", "-q")
        assert result.returncode == 0, quiet(result.stderr)
    out = tmp_path / "export"
    result = run_module("optimize.export", "--run", str(run), "--output", str(out), "--name", "cxr", "-q")
    assert result.returncode == 0, quiet(result.stderr)
    record = json.loads((out / "export.json").read_text())
    assert set(record["formats"]) == {"serving", "onnx", "tflite"}
    serving, onnx_file, tflite_file = out / "serving/cxr/1", out / "onnx/cxr/1/model.onnx", out / "tflite/cxr.tflite"
    assert (serving / "saved_model.pb").is_file() and (serving / "variables").is_dir()
    assert onnx_file.is_file() and tflite_file.is_file()
    assert record["classes"] == ["NORMAL", "PNEUMONIA"] and record["input"]["shape"] == [None, 64, 64, 1]
    assert record["transform"] == json.loads((run / "dataset_manifest.json").read_text())["transform"]
    assert (out / "model_card.md").read_text() == (run / "model_card.md").read_text()
    # the out-of-distribution guard travels with the exports, so predict --model EXPORT applies it
    assert (out / "guard.npz").read_bytes() == (run / "eval" / "guard.npz").read_bytes()
    assert record["guard"]["file"] == "guard.npz" and record["guard"]["threshold"] is not None

    # An independent check on every radiograph of the test split, against the run's own Keras model.
    images = np.stack([x for x, _ in schema.dataset(data, "test").as_numpy_iterator()])
    scorer = load_scorer(run / "model")
    want, before = scorer.predict_with_uncalibrated(images)
    assert np.max(np.abs(before - want)) > 1e-3  # the calibration changes the outputs: it must be in the exports
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(["probabilities"], {"images": images})[0]
    lite = load_scorer(tflite_file)
    assert lite.kind == "tflite"
    lite_probs = lite.predict(images)
    served = tf.saved_model.load(str(serving)).signatures["serving_default"]
    serving_probs = served(images=tf.constant(images))["probabilities"].numpy()
    diffs = {name: float(np.max(np.abs(p - want))) for name, p in
             (("onnx", onnx_probs), ("tflite", lite_probs), ("serving", serving_probs))}
    print(f"largest probability difference from the Keras model on {len(images)} real test radiographs: {diffs}")
    assert diffs["onnx"] <= 1e-4 and diffs["tflite"] <= 1e-4 and diffs["serving"] <= 1e-5, diffs
    for fmt, entry in record["formats"].items():
        assert entry["parity"]["max_abs_difference"] <= 1e-4 and entry["parity"]["images"] == len(images), fmt

    # A served version is never replaced: the next export is version 2, an explicit clash is refused.
    again = run_module("optimize.export", "--run", str(run), "--output", str(out), "--name", "cxr", "--format",
                       "onnx", "-q")
    assert again.returncode == 0, quiet(again.stderr)
    assert (out / "onnx/cxr/2/model.onnx").is_file() and json.loads((out / "export.json").read_text())["formats"][
        "onnx"]["version"] == 2
    clash = run_module("optimize.export", "--run", str(run), "--output", str(out), "--name", "cxr",
                       "--model-version", "1")
    assert clash.returncode == 2 and clash.stderr.count("\n") == 1 and "exists" in clash.stderr, clash.stderr

    # LiteRT serves the .tflite without TensorFlow (its transform and threshold from export.json), and agrees
    # with the Keras model read from the same files.
    files = [row.split(",")[0] for row in (real_run["csv"]).read_text().splitlines()[1:9]]
    child = ("import json, sys\nfrom distributed import predict\n"
             f"code = predict.main(['--model', {str(tflite_file)!r}, '--format', 'json', '--output', "
             f"{str(tmp_path / 'lite.json')!r}, '-q', *{files!r}])\n"
             "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tf_keras', 'keras'})\n"
             "print(json.dumps({'code': code, 'loaded': loaded}))")
    result = subprocess.run([PYTHON, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, quiet(result.stderr)
    assert json.loads(result.stdout.splitlines()[-1]) == {"code": 0, "loaded": []}
    keras_rows = json.loads(run_module("distributed.predict", "--run", str(run), "--format", "json", "-q",
                                       *files).stdout)
    lite_rows = json.loads((tmp_path / "lite.json").read_text())
    assert [r["file"] for r in lite_rows] == files
    for a, b in zip(lite_rows, keras_rows):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4) and a["threshold"] == b["threshold"]
        assert a["ood_score"] == pytest.approx(b["ood_score"]) and a["outside"] == b["outside"]


def test_export_refuses_a_run_without_a_model(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": {"data": str(tmp_path)}}))
    result = run_module("optimize.export", "--run", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no exported model" in result.stderr and str(tmp_path / "run") in result.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_onnx_takes_tensorflows_exact_gelu(tmp_path):
    """keras's "gelu" (ConvNeXt's activation) is written by TensorFlow with Erfc, which ONNX lacks; the ONNX
    export still computes the Keras model's probabilities."""
    from distributed.model.heads import Head
    from distributed.model.kerasenv import keras
    from optimize.export import export_onnx, serving_function

    image = keras.Input((8, 8, 1), dtype="uint8", name="image")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 64)(image))
    x = keras.layers.Activation("gelu")(keras.layers.Dense(16)(x))
    logits = keras.layers.Dense(1, name="logits")(x)
    model = keras.Model(image, keras.layers.Activation("sigmoid", name="predictions")(logits))
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    p = model.predict(images, verbose=0)
    want = np.concatenate([1 - p, p], axis=1)  # the served columns of one sigmoid unit
    record = export_onnx(serving_function(model, Head("binary", 1)), tmp_path / "onnx" / "model.onnx", images,
                         want, 1e-5)
    assert record["parity"]["max_abs_difference"] < 1e-5
