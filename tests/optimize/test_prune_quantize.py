"""optimize.compress and python -m optimize.prune_quantize with real tfmot, TFLite and Horovod."""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess

import numpy as np
import pytest

from distributed.model.kerasenv import keras
import tensorflow_model_optimization as tfmot  # noqa: E402

from distributed.model.zoo import build_model  # noqa: E402
from distributed.model.heads import Head  # noqa: E402
from distributed.model.scoring import load_scorer  # noqa: E402
from optimize import compress, measure  # noqa: E402
from optimize.prune_quantize import representative_images  # noqa: E402
from preprocessing import schema  # noqa: E402
from tests.conftest import PYTHON, REPO  # noqa: E402
from tests.training_fixtures import HOROVODRUN, quiet  # noqa: E402


def random_batch(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), rng.integers(0, 2, n)


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_pruning_reaches_the_requested_sparsity_and_strips_to_plain_layers(target):
    model = build_model("cnn", 32, 2, weights="none", seed=0)
    before = [w.copy() for w in model.get_weights()]
    x, y = random_batch(64, 32)
    wrapped = compress.prune_wrap(model, target, total_steps=8)
    wrapped.compile(keras.optimizers.Adam(1e-3), Head.of_model(wrapped).loss())
    wrapped.fit(x, y, batch_size=8, epochs=1, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=0)
    stripped = compress.strip_pruning(wrapped)
    assert not any("PruneLowMagnitude" in type(layer).__name__ for layer in stripped.layers)
    assert [type(layer) for layer in stripped.layers] == [type(layer) for layer in model.layers]
    measured = compress.layer_sparsity(stripped)
    pruned = compress.prune_targets(model)
    assert pruned == ["block2_conv1", "block3_conv1", "head_dense_128"]  # not the 576-weight first conv, not logits
    for name in pruned:
        assert measured[name] == pytest.approx(target, abs=0.01), (name, measured)
    assert measured["logits"] == 0 and measured["block1_conv1"] == 0
    # the original model is untouched, so the next variant starts from the trained weights again
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.fixture(scope="module")
def converted(sample_run, tmp_path_factory):
    """The sample run's model as every TFLite kind, and 32 prepared validation images to compare on."""
    folder = tmp_path_factory.mktemp("tflite")
    model = keras.models.load_model(str(sample_run / "model"), compile=False)
    data = json.loads((sample_run / "config.json").read_text())["config"]["data"]
    images = np.stack([img for img, _ in schema.dataset(data, "val").take(32).as_numpy_iterator()])
    rep, _ = representative_images(data, 64)
    paths = {}
    for kind in compress.TFLITE_KINDS:
        paths[kind] = folder / f"{kind}.tflite"
        paths[kind].write_bytes(compress.to_tflite(model, kind, compress.representative_from(rep)))
    return model, images, paths


# stated tolerances on P(positive): fp32 is the same arithmetic; float16 weights round at 1e-3 relative;
# int8 (weights and activations, uint8 output in steps of 1/256) within 0.05 of the float model
TOLERANCE = {"fp32": 1e-5, "float16": 5e-3, "dynamic": 0.03, "int8": 0.05}


@pytest.mark.parametrize("kind", compress.TFLITE_KINDS)
def test_tflite_variants_agree_with_the_keras_model(converted, kind):
    model, images, paths = converted
    expected = model(images, training=False).numpy()[:, 0]
    got = load_scorer(paths[kind]).predict(images)[:, 1]
    assert np.max(np.abs(got - expected)) <= TOLERANCE[kind], np.max(np.abs(got - expected))


def test_int8_models_hold_int8_weights(converted):
    _, _, paths = converted
    int8 = measure.weight_report(paths["int8"])
    assert int8["int8_fraction"] > 0.95 and "int8" in int8["weight_dtypes"]
    assert measure.weight_report(paths["fp32"])["int8_fraction"] == 0
    assert "float16" in measure.weight_report(paths["float16"])["weight_dtypes"]
    assert measure.sizes(paths["int8"])["bytes"] * 3.5 < measure.sizes(paths["fp32"])["bytes"]


def test_representative_images_come_from_train_only(prepared64):
    _, ids = representative_images(prepared64, 40, seed=3)
    with open(prepared64 / "split.csv") as fh:
        split_of = {row["id"]: row["split"] for row in csv.DictReader(fh)}
    assert len(ids) == 40 and {split_of[i] for i in ids} == {"train"}


class Scale(keras.layers.Layer):
    """A custom layer with a weight, which neither tfmot registry knows."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def test_an_unsupported_layer_skips_the_variant_naming_it():
    image = keras.Input((32, 32, 1), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255, name="pixels_to_unit")(image)
    x = keras.layers.Conv2D(64, 3, name="conv")(x)
    x = Scale(name="my_scale")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="logits")(x)
    model = keras.Model(image, out)
    with pytest.raises(compress.VariantSkipped, match="'my_scale' \\(Scale\\).*pruning"):
        compress.prune_targets(model)
    with pytest.raises(compress.VariantSkipped, match="my_scale"):
        compress.quantize_wrap(model)
    x, _ = random_batch(4, 32)
    assert compress.to_tflite(model, "fp32")  # post-training conversion still works for this model


def test_layer_normalization_stays_float_in_quantization_aware_training(tmp_path):
    """ConvNeXt's LayerNormalization has no tfmot 8-bit configuration: it is annotated to stay float, the
    convolution around it is fake-quantized, and the QAT model trains and converts to an int8 TFLite file."""
    image = keras.Input((16, 16, 1), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255, name="pixels_to_unit")(image)
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    x = keras.layers.Activation("gelu", name="gelu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(image, keras.layers.Dense(1, activation="sigmoid", name="logits")(x))
    qat = compress.quantize_wrap(model)
    wrapped = {layer.layer.name: layer for layer in qat.layers if hasattr(layer, "quantize_config")}
    assert isinstance(wrapped["norm"].quantize_config, compress.FloatQuantizeConfig)
    # no quantizer range of its own: only the wrapper's step counter beside the layer's weights
    assert [w.name.split("/")[-1] for w in wrapped["norm"].weights] == ["gamma:0", "beta:0", "optimizer_step:0"]
    assert any("kernel_min" in w.name for w in wrapped["conv"].weights)  # the conv's weights are fake-quantized
    x, y = random_batch(32, 16)
    qat.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    qat.fit(x, y, batch_size=8, epochs=1, verbose=0)
    (tmp_path / "qat.tflite").write_bytes(compress.to_tflite(qat, "int8", compress.representative_from(list(x))))
    got = load_scorer(tmp_path / "qat.tflite").predict(x)[:, 1]
    expected = qat(x, training=False).numpy()[:, 0]
    assert np.max(np.abs(got - expected)) <= TOLERANCE["int8"]


def test_depthwise_convolutions_are_left_whole_as_tfmot_leaves_them():
    """EfficientNetV2's and ConvNeXt's depthwise convolutions hold a depthwise kernel, which tfmot's registry
    does not prune; the pointwise layers around them are pruned."""
    image = keras.Input((16, 16, 1), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255, name="pixels_to_unit")(image)
    x = keras.layers.Conv2D(32, 3, padding="same", name="conv")(x)
    x = keras.layers.DepthwiseConv2D(7, padding="same", name="depthwise")(x)  # 7 x 7 x 32 = 1,568 weights
    x = keras.layers.Dense(64, name="pointwise")(x)  # 32 x 64 = 2,048 weights
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(image, keras.layers.Dense(1, activation="sigmoid", name="logits")(x))
    assert compress.prune_targets(model) == ["pointwise"]
    wrapped = compress.prune_wrap(model, 0.5, total_steps=8)
    wrapped.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    x, y = random_batch(64, 16)
    wrapped.fit(x, y, batch_size=8, epochs=1, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=0)
    measured = compress.layer_sparsity(compress.strip_pruning(wrapped))
    assert measured["pointwise"] == pytest.approx(0.5, abs=0.01) and "depthwise" not in measured


def run_optimize(*args: str, np_: int = 1, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [PYTHON, "-m", "optimize.prune_quantize", *args]
    if np_ > 1:
        command = [HOROVODRUN, "-np", str(np_), "--gloo", *command]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def check_tracked_variants(uri: str, rows: dict[str, dict], recommended: str) -> None:
    """One child run per variant (size, latency, AUC with interval) under one "optimize RUN" parent run (the
    sample run was trained without tracking), read back through the MLflow client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("optimize").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "optimize sample-cnn" and parent.data.tags["optimize.recommended"] == recommended
    assert "optimized/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "optimized")}
    children = {r.data.params["variant"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(rows)
    for name, child in children.items():
        logged, row = child.data.metrics, rows[name]
        assert logged["bytes"] == row["bytes"] and logged["test_auc"] == pytest.approx(row["test_auc"])
        assert logged["latency.1.median_ms"] == pytest.approx(row["latency"]["1"]["median_ms"])
        assert logged["test_auc_ci_low"] <= logged["test_auc_ci_high"]
        assert [a.path for a in client.list_artifacts(child.info.run_id, "model")] == [f"model/{row['file']}"]


def test_cli_builds_measures_and_resumes_under_horovodrun(sample_run, tmp_path, mlflow_server):
    out = tmp_path / "opt"
    # one converted and one fine-tuned variant (plain pruning: test_pruning_reaches_the_requested_sparsity_...)
    args = ["--run", str(sample_run), "--output", str(out), "--variants", "ptq-int8,prune-qat",
            "--sparsity", "0.8", "--fine-tune-epochs", "1", "--batch-size", "16", "--latency-runs", "5",
            "--bootstrap", "20"]
    result = run_optimize(*args, "--tracking-uri", mlflow_server, "--experiment", "optimize", np_=2)
    assert result.returncode == 0, quiet(result.stderr + result.stdout)
    comparison = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in comparison["variants"]}
    check_tracked_variants(mlflow_server, rows, comparison["recommended"])
    assert list(rows) == ["fp32", "ptq-int8", "prune-qat-80"]
    for row in rows.values():  # every number is read back from a file that exists
        data = (out / row["file"]).read_bytes()
        assert row["bytes"] == len(data) and row["gzip_bytes"] == len(gzip.compress(data, compresslevel=9))
        assert 0 <= row["test_auc"] <= 1 and row["latency"]["1"]["median_ms"] > 0
    assert rows["prune-qat-80"]["sparsity"] > 0.7 and rows["ptq-int8"]["sparsity"] < 0.5  # measured in the files
    assert rows["prune-qat-80"]["int8_fraction"] > 0.95 and rows["fp32"]["int8_fraction"] == 0
    assert rows["prune-qat-80"]["gzip_ratio_vs_fp32"] > 8
    assert rows["fp32"]["max_prob_diff_vs_fp32"] == 0
    assert comparison["recommended"] in rows and comparison["representative"]["split"] == "train"
    report = (out / "report.md").read_text()
    assert "prune-qat-80" in report and "Recommendation" in report
    for png in ("auc_vs_size.png", "auc_vs_latency.png"):
        assert (out / png).stat().st_size > 10_000
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "variants").iterdir()}
    again = run_optimize(*args)  # a re-run resumes: nothing is rebuilt, the comparison is rewritten
    assert again.returncode == 0, quiet(again.stderr)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "variants").iterdir()} == stamps
    assert "reusing the evaluation and latency measured at" in again.stderr
    # other latency settings: the same files, measured again (a figure is never reported under other settings)
    built = {name: (out / row["file"]).stat().st_mtime_ns for name, row in rows.items()}
    remeasured = run_optimize(*["7" if a == "5" else a for a in args])
    assert remeasured.returncode == 0, quiet(remeasured.stderr)
    assert {name: (out / row["file"]).stat().st_mtime_ns for name, row in rows.items()} == built
    records = [json.loads(p.read_text()) for p in (out / "variants").glob("*.json")]
    assert len(records) == 3 and all(r["measured"]["latency_runs"] == 7 for r in records)
    assert all(r["measured"]["at"] >= rows[r["name"]]["measured"]["at"] for r in records)
    # other build settings are refused before anything is built (its own process: the CLI sets TensorFlow's
    # thread pools, which this test process has already started)
    other = run_optimize(*args[:-2], "--fine-tune-epochs", "2")
    assert other.returncode == 2 and "--overwrite" in other.stderr


def test_help_and_bad_arguments(tmp_path, capsys):
    """The real CLI's main, in this process (each entry point's own process: tests/cxrscale/test_runtime.py)."""
    from optimize.prune_quantize import main
    from tests.launch.cli import run_main

    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0 and "Example" in out
    code, _, err = run_main(main, ["--run", str(tmp_path), "--variants", "ptq-int4"], capsys)
    assert code == 2 and "ptq-int4" in err
    code, _, err = run_main(main, ["--run", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "run folder not found" in err
