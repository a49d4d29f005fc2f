"""Ensembles: two real runs joined into one flat, calibrated model that evaluate, predict and optimize take as
a run folder."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from distributed.model.kerasenv import keras
from distributed.model.calibration import Calibration, logits_of
from distributed.model.heads import Head
from cxrscale.errors import CxrError
from preprocessing import schema
from tests.conftest import PYTHON, REPO
from tests.launch.cli import IN_PROCESS, run_in_process
from tests.training_fixtures import prepare, quiet, run_train


def cli(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    if module in IN_PROCESS:
        return run_in_process(module, *args)
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ensemble_run(sample_run, prepared64, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    second = folder / "seed1"
    result = run_train("--data", str(prepared64), "--model", "cnn", "--epochs", "2", "--batch-size", "16",
                       "--seed", "1", "--output", str(second))
    assert result.returncode == 0, quiet(result.stderr)
    out = folder / "ensemble"
    result = cli("distributed.ensemble", "--runs", str(sample_run), str(second), "--output", str(out), "-q")
    assert result.returncode == 0, quiet(result.stderr)
    return {"members": [sample_run, second], "run": out, "data": prepared64}


@pytest.mark.slow
def test_the_ensemble_is_the_calibrated_mean_of_its_members_logits(ensemble_run):
    run = ensemble_run["run"]
    model = keras.models.load_model(str(run / "model"), compile=False)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat, as tfmot needs
    images = np.stack([x for x, _ in schema.dataset(ensemble_run["data"], "test").take(16).as_numpy_iterator()])
    members = [keras.models.load_model(str(m / "model"), compile=False) for m in ensemble_run["members"]]
    mean_logits = np.mean([logits_of(m, images) for m in members], axis=0)
    calibration = Calibration.from_dict(json.loads((run / "calibration.json").read_text()))
    assert calibration.method == "temperature"  # auto
    expected = calibration.apply(Head.of_logits(model), mean_logits)[:, 1]
    np.testing.assert_allclose(model.predict(images, verbose=0)[:, 0], expected, atol=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert config["ensemble"]["members"] == [str(m) for m in ensemble_run["members"]]
    assert config["ensemble"]["seeds"] == [0, 1]


@pytest.mark.slow
def test_evaluate_predict_and_optimize_take_the_ensemble_as_a_run(ensemble_run, sample_images):
    run = ensemble_run["run"]
    result = cli("distributed.evaluate", "--run", str(run), "--bootstrap", "50", "--no-gradcam", "-q")
    assert result.returncode == 0, quiet(result.stderr)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["run"]["ensemble"]["combine"] == "mean of logits"
    assert "An ensemble of 2 runs" in (run / "eval" / "report.md").read_text()
    result = cli("distributed.predict", "--run", str(run), str(sample_images / "train" / "NORMAL"), "--format", "json", "-q")
    assert result.returncode == 0, quiet(result.stderr)
    rows = json.loads(result.stdout)
    assert rows and all(0 <= r["probability"] <= 1 for r in rows)
    result = cli("optimize.prune_quantize", "--run", str(run), "--variants", "ptq-dynamic",
                 "--bootstrap", "50", "--latency-runs", "2", "-q")
    assert result.returncode == 0, quiet(result.stderr)
    comparison = json.loads((run / "optimized" / "comparison.json").read_text())
    assert {v["name"] for v in comparison["variants"]} == {"fp32", "ptq-dynamic"}
    # the members' preprocessing layers (m0_pixels_to_unit, ...) stay float, so QAT applies to an ensemble too
    # (the same wrap prune_quantize fine-tunes; its CLI fine-tunes QAT in tests/optimize/test_prune_quantize.py)
    from optimize import compress

    wrapped = compress.quantize_wrap(keras.models.load_model(str(run / "model"), compile=False))
    images = np.stack([x for x, _ in schema.dataset(ensemble_run["data"], "val").take(8).as_numpy_iterator()])
    assert np.all(np.isfinite(wrapped.predict(images, verbose=0)))


@pytest.mark.slow
def test_exported_onnx_and_tflite_hold_the_whole_calibrated_ensemble(ensemble_run, tmp_path):
    """What a server runs is the members' mean logit through the ensemble's calibration, computed here from
    the members themselves."""
    import onnxruntime

    from distributed.model.scoring import load_scorer, read_run_config, run_head

    run = ensemble_run["run"]
    result = cli("optimize.export", "--run", str(run), "--format", "onnx", "tflite", "--output", str(tmp_path), "-q")
    assert result.returncode == 0, quiet(result.stderr)
    images = np.stack([x for x, _ in schema.dataset(ensemble_run["data"], "test").as_numpy_iterator()])
    members = [keras.models.load_model(str(m / "model"), compile=False) for m in ensemble_run["members"]]
    calibration = Calibration.from_dict(json.loads((run / "calibration.json").read_text()))
    mean_logits = np.mean([logits_of(m, images) for m in members], axis=0)
    expected = calibration.apply(Head.of_logits(members[0]), mean_logits)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "ensemble" / "1" / "model.onnx"))
    np.testing.assert_allclose(session.run(["probabilities"], {"images": images})[0], expected, atol=1e-4)
    np.testing.assert_allclose(load_scorer(tmp_path / "tflite" / "ensemble.tflite").predict(images), expected,
                               atol=1e-4)
    # as predict loads it beside its run: the run's head (one sigmoid unit) in the export's two columns
    recorded = run_head(read_run_config(run))
    lite = load_scorer(tmp_path / "tflite" / "ensemble.tflite", head=recorded)
    assert recorded == Head("binary", 1) and lite.head == Head("binary", 2)
    np.testing.assert_allclose(lite.predict(images), expected, atol=1e-4)


def test_ensemble_refuses_bad_members(sample_run, tmp_path):
    from distributed.ensemble import build_ensemble

    with pytest.raises(CxrError, match="at least two"):
        build_ensemble([sample_run], tmp_path / "out", "temperature")
    result = cli("distributed.ensemble", "--runs", str(sample_run), str(tmp_path / "missing"), "--output",
                 str(tmp_path / "out"))
    assert result.returncode == 2 and "run folder not found" in result.stderr


def test_kermany_gpu_members_join_on_the_positive_logit():
    """kermany-gpu's members: VGG16's 2-unit softmax and ResNet50's sigmoid unit, averaged on the positive
    logit (z1 - z0 of the softmax), calibrated, as one binary model."""
    from distributed.ensemble import join_members
    from distributed.model.calibration import calibrated_model
    from distributed.model.zoo import build_model

    vgg, resnet = build_model("vgg16", 32, 2, seed=0), build_model("resnet50", 32, 2, seed=1)
    assert (Head.of_model(vgg), Head.of_model(resnet)) == (Head("binary", 2), Head("binary", 1))
    joined = join_members([vgg, resnet])
    assert Head.of_logits(joined) == Head("binary", 1)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    z_vgg, z_resnet = logits_of(vgg, images), logits_of(resnet, images)
    expected = (z_vgg[:, 1] - z_vgg[:, 0] + z_resnet[:, 0]) / 2
    np.testing.assert_allclose(logits_of(joined, images)[:, 0], expected, rtol=1e-4, atol=1e-5)
    calibration = Calibration("platt", {"a": 2.0, "b": -0.5})
    model = calibrated_model(joined, calibration)
    np.testing.assert_allclose(model.predict(images, verbose=0)[:, 0],
                               calibration.apply(Head("binary", 1), expected[:, None])[:, 1], atol=1e-5)
    with pytest.raises(CxrError, match="one kind of head"):
        join_members([vgg, build_model("cnn", 32, 3, seed=0)])


@pytest.mark.slow
def test_benchmark_members_forms_the_ensemble_distributed_ensemble_builds(ensemble_run, sample_images, tmp_path):
    """benchmarks.members forms each ensemble from its members' logits without joining them: its row for both
    members must be the joined run's calibration, validation threshold and external ranking."""
    from distributed.adapt import labelled_sample
    from distributed.evaluation.scores import ThresholdRule
    from distributed.model import metrics as m
    from preprocessing.transform import TransformParams

    run, site = ensemble_run["run"], sample_images / "train"
    result = cli("benchmarks.members", "--runs", *map(str, ensemble_run["members"]), "--external", str(site),
                 "--bootstrap", "100", "--out", str(tmp_path / "results"), "-q")
    assert result.returncode == 0, quiet(result.stderr)
    results = json.loads(next((tmp_path / "results").glob("members-*.json")).read_text())
    assert [r["members"] for r in results["ensembles"]] == [["sample-cnn"], ["seed1"], ["sample-cnn", "seed1"]]
    both = results["ensembles"][2]
    calibration = json.loads((run / "calibration.json").read_text())
    assert both["calibration"]["params"] == pytest.approx(calibration["params"], rel=1e-4)
    model = keras.models.load_model(str(run / "model"), compile=False)
    val = list(schema.dataset(ensemble_run["data"], "val").as_numpy_iterator())
    p_val = model.predict(np.stack([x for x, _ in val]), verbose=0)[:, 0]
    assert both["threshold"] == pytest.approx(ThresholdRule("youden").choose(np.array([y for _, y in val]), p_val),
                                              abs=1e-5)
    manifest = json.loads((run / "dataset_manifest.json").read_text())
    x_site, y_site = labelled_sample(str(site), manifest["classes"], TransformParams.from_dict(manifest["transform"]))
    # the joined model's mean logit through its calibration, in float64 as the benchmark computes it (the served
    # float32 probabilities of this barely trained model tie near 1, which moves the ROC-AUC in the third place)
    p_site = Calibration.from_dict(calibration).apply(Head.of_logits(model), logits_of(model, x_site))[:, 1]
    assert both["external"]["roc_auc"]["value"] == pytest.approx(m.roc_auc(y_site, p_site), abs=1e-6)

    # a member validated on another split (the same images prepared with another seed) is refused, named
    other = tmp_path / "other-split"
    prepare(sample_images, tmp_path / "prepared-seed1", "--size", "64", "--shards", "2", "--seed", "1")
    shutil.copytree(ensemble_run["members"][1], other)
    config = json.loads((other / "config.json").read_text())
    config["config"]["data"] = str(tmp_path / "prepared-seed1")
    (other / "config.json").write_text(json.dumps(config))
    result = cli("benchmarks.members", "--runs", str(ensemble_run["members"][0]), str(other), "--external",
                 str(site), "--out", str(tmp_path / "results"), "-q")
    assert result.returncode != 0
    assert f"--runs {other} was validated on other images than {ensemble_run['members'][0]}" in result.stderr
