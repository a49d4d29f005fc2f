"""optimize.measure on real TFLite conversions of the tiny thesis CNN (32 px): sizes, stored weights,
latency, Pareto front, recommendation and the trade-off plot."""
from __future__ import annotations

import gzip
import os

from distributed.model.kerasenv import keras

import cv2
import numpy as np
import pytest
import tensorflow as tf

from distributed.model.zoo import build_model
from cxrscale.errors import CxrError
from optimize.measure import latency, pareto_front, recommend, sizes, tradeoff_plot, weight_report

SIZE = 32
pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")  # int8 converter


def _representative():
    rng = np.random.default_rng(1)
    for _ in range(8):
        yield [rng.integers(0, 256, size=(1, SIZE, SIZE, 1), dtype=np.uint8)]


def _convert(model, path, variant: str):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.uint8
    elif variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    path.write_bytes(converter.convert())
    return path


def _convs(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def _expected_parameters(model) -> int:
    """Kernels of conv/dense layers plus their biases of >= 16 elements (conv biases come from folding BN)."""
    layers = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    return sum(int(layer.kernel.shape.num_elements()) + (layer.kernel.shape[-1] if layer.kernel.shape[-1] >= 16
                                                         else 0) for layer in layers)


def _model():
    """The CNN with random (not zero) biases: identical zero biases would be stored once by the converter."""
    model = build_model("cnn", SIZE, 2, weights="none", seed=0)
    rng = np.random.default_rng(0)
    for bias in [layer.beta for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)] + \
            [layer.bias for layer in model.layers if isinstance(layer, keras.layers.Dense)]:
        bias.assign(rng.normal(0.0, 0.1, bias.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """.tflite paths of the variants "fp32", "int8", "float16" and "sparse" (fp32 with 80 % of every conv
    kernel zeroed by magnitude), and the two Keras models."""
    out = tmp_path_factory.mktemp("tflite")
    dense = _model()
    paths = {v: _convert(dense, out / f"{v}.tflite", v) for v in ("fp32", "int8", "float16")}
    sparse = _model()
    for layer in _convs(sparse):
        kernel = layer.kernel.numpy()
        kernel[np.abs(kernel) < np.quantile(np.abs(kernel), 0.8)] = 0.0
        layer.kernel.assign(kernel)
    paths["sparse"] = _convert(sparse, out / "sparse.tflite", "fp32")
    return paths, dense, sparse


def test_sizes_of_files_and_folders(models, tmp_path):
    paths = models[0]
    for path in paths.values():
        assert sizes(path) == {"bytes": os.stat(path).st_size,
                               "gzip_bytes": len(gzip.compress(path.read_bytes(), compresslevel=9))}
    dense, sparse = sizes(paths["fp32"]), sizes(paths["sparse"])
    assert sparse["bytes"] == dense["bytes"]  # zeros take as much room as any float...
    assert sparse["gzip_bytes"] < 0.45 * dense["gzip_bytes"]  # ...until compressed
    assert dense["gzip_bytes"] < dense["bytes"]

    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"a" * 5000)
    (folder / "variables" / "v.data").write_bytes(bytes(3000))
    first = sizes(folder)
    assert first["bytes"] == 8000 and 0 < first["gzip_bytes"] < 1000
    os.utime(folder / "saved_model.pb", (0, 12345678))  # the tar ignores mtimes: same size
    assert sizes(folder) == first
    with pytest.raises(CxrError, match="not found"):
        sizes(tmp_path / "missing.tflite")


def test_weight_report_dtypes(models):
    paths, dense, _ = models
    expected = _expected_parameters(dense)
    fp32, int8, f16 = (weight_report(paths[v]) for v in ("fp32", "int8", "float16"))
    assert fp32["weight_dtypes"] == {"float32": expected} and fp32["parameters"] == expected
    assert fp32["int8_fraction"] == 0 and fp32["sparsity"] == 0
    assert int8["parameters"] == expected and int8["weight_dtypes"]["int8"] > 0
    assert int8["int8_fraction"] > 0.9 and set(int8["weight_dtypes"]) <= {"int8", "int32"}  # int32 biases
    assert f16["weight_dtypes"] == {"float16": expected} and f16["int8_fraction"] == 0
    top = fp32["per_tensor"][0]
    assert top["dtype"] == "float32" and top["shape"] == [256, 3, 3, 128] and top["sparsity"] == 0
    assert len(fp32["per_tensor"]) <= 20 and all(set(t) == {"name", "dtype", "shape", "sparsity"}
                                                 for t in fp32["per_tensor"])


def test_weight_report_sparsity_matches_the_zeroed_kernels(models, tmp_path):
    paths, _, sparse = models
    report = weight_report(paths["sparse"])
    by_shape = {tuple(t["shape"]): t for t in report["per_tensor"]}
    zeros = total = 0
    for layer in _convs(sparse):
        kernel = layer.kernel.numpy()  # (kh, kw, in, out); TFLite stores (out, kh, kw, in)
        kh, kw, cin, cout = kernel.shape
        want = float(np.mean(kernel == 0))
        assert abs(want - 0.8) < 0.01
        assert by_shape[(cout, kh, kw, cin)]["sparsity"] == pytest.approx(want, abs=0.02)
        zeros, total = zeros + int(np.sum(kernel == 0)), total + kernel.size
    assert report["sparsity"] == pytest.approx(zeros / report["parameters"], abs=0.02)
    assert report["sparsity"] > 0.7
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"x" * 64)
    with pytest.raises(CxrError, match="not a TFLite model"):
        weight_report(fake)


def test_latency(models):
    paths = models[0]
    for variant, shape in (("int8", None), ("fp32", (SIZE, SIZE, 1))):
        result = latency(paths[variant], shape, threads=(1, 2), warmup=3, runs=15)
        assert set(result["threads"]) == {"1", "2"}
        for stats in result["threads"].values():
            assert stats["runs"] == 15 and 0 < stats["median_ms"] <= stats["p90_ms"] and stats["mean_ms"] > 0
        assert result["peak_rss_delta_mb"] >= 0


def test_pareto_front():
    rows = [{"auc": 0.95, "mb": 10}, {"auc": 0.94, "mb": 5}, {"auc": 0.93, "mb": 6}, {"auc": 0.95, "mb": 12},
            {"auc": None, "mb": 1}, {"auc": 0.90, "mb": 1}, {"auc": 0.95, "mb": 10}, {"auc": 0.99}]
    assert pareto_front(rows, maximize="auc", minimize="mb") == [True, True, False, False, False, True, True,
                                                                 False]
    assert pareto_front([], maximize="auc", minimize="mb") == []


def test_recommend_smallest_within_the_validation_budget():
    rows = [{"name": "fp32", "val_auc": 0.950, "gzip_bytes": 100},
            {"name": "float16", "val_auc": 0.949, "gzip_bytes": 50},
            {"name": "int8", "val_auc": 0.945, "gzip_bytes": 25},
            {"name": "pruned", "val_auc": 0.930, "gzip_bytes": 10},
            {"name": "broken", "val_auc": None, "gzip_bytes": 1}]
    assert recommend(rows, baseline="fp32")["name"] == "int8"
    assert recommend(rows, baseline="fp32", max_drop=0.001)["name"] == "float16"  # drop exactly 0.001
    assert recommend(rows, baseline="fp32", max_drop=0.0)["name"] == "fp32"  # only the baseline qualifies
    assert recommend(rows, baseline="fp32", max_drop=0.05)["name"] == "pruned"
    assert recommend(rows, baseline="float16", metric="val_auc", max_drop=0.0)["name"] == "float16"
    assert recommend(rows, baseline="missing") is None
    assert recommend([{"variant": r["name"], **r} for r in rows], baseline="fp32", label="variant") == {
        "variant": "int8", **rows[2]}
    assert recommend(rows, baseline="broken") is None


def test_tradeoff_plot_writes_a_png(tmp_path):
    rows = [{"variant": "fp32", "mb": 1.49, "auc": 0.950}, {"variant": "float16", "mb": 0.73, "auc": 0.950},
            {"variant": "dynamic-range", "mb": 0.41, "auc": 0.949}, {"variant": "int8", "mb": 0.40, "auc": 0.948},
            {"variant": "qat-int8", "mb": 0.40, "auc": 0.949}, {"variant": "pruned-50", "mb": 0.80, "auc": 0.947},
            {"variant": "pruned-80", "mb": 0.45, "auc": 0.938},
            {"variant": "pruned-80+int8", "mb": 0.15, "auc": 0.936}, {"variant": "failed", "mb": 0.1, "auc": None}]
    for log_x in (False, True):
        path = tradeoff_plot(rows, tmp_path / f"plots/tradeoff_{log_x}.png", x="mb", xlabel="gzip size (MB)",
                             ylabel="AUC", title="accuracy vs size", log_x=log_x)
        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 300
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["tradeoff_False.png", "tradeoff_True.png"]
    with pytest.raises(ValueError, match="no rows"):
        tradeoff_plot(rows[-1:], tmp_path / "none.png", x="mb", xlabel="x", ylabel="y", title="t")
