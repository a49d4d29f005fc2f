"""python -m distributed.evaluate and python -m distributed.predict on real trained runs."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from distributed.evaluation.scores import SplitScores, ThresholdRule, compute_metrics, parse_threshold
from distributed.model.heads import Head
from preprocessing.records import keyed_hash
from benchmarks.ood_set import write_ood_set
from tests.conftest import PYTHON, REPO, radiograph_like, shared_data_root, write_image
from tests.launch.cli import IN_PROCESS, run_in_process
from tests.training_fixtures import quiet

CLASSES = ["NORMAL", "PNEUMONIA"]


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    if module in IN_PROCESS:
        return run_in_process(module, *args)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def scores(labels, p_pos, split="test") -> SplitScores:
    p = np.asarray(p_pos, dtype=float)
    return SplitScores(split, np.asarray(labels), np.stack([1 - p, p], axis=1), [f"r{i}" for i in range(len(p))],
                       Head("binary", 1))


def test_threshold_is_fitted_on_validation_only():
    rng = np.random.default_rng(0)
    y_val = rng.integers(0, 2, 200)
    val = scores(y_val, np.clip(0.3 * y_val + rng.normal(0.35, 0.2, 200), 0, 1), "val")
    y_test = rng.integers(0, 2, 150)
    p_test = np.clip(0.3 * y_test + rng.normal(0.35, 0.2, 150), 0, 1)
    for rule in (ThresholdRule("youden"), parse_threshold("sensitivity:0.95"), parse_threshold("specificity:0.9")):
        a = compute_metrics(val, scores(y_test, p_test), CLASSES, rule, n_bootstrap=20)
        b = compute_metrics(val, scores(1 - y_test, p_test), CLASSES, rule, n_bootstrap=20)
        assert a["threshold"]["value"] == b["threshold"]["value"], rule
        assert a["at_threshold"]["sensitivity"] != b["at_threshold"]["sensitivity"]
    sens = compute_metrics(val, scores(y_test, p_test), CLASSES, parse_threshold("sensitivity:0.95"), n_bootstrap=20)
    assert sens["validation_at_threshold"]["sensitivity"] >= 0.95
    spec = compute_metrics(val, scores(y_test, p_test), CLASSES, parse_threshold("specificity:0.9"), n_bootstrap=20)
    assert spec["validation_at_threshold"]["specificity"] >= 0.9
    fixed = compute_metrics(val, scores(y_test, p_test), CLASSES, parse_threshold("0.3"), n_bootstrap=20)
    assert fixed["threshold"]["value"] == 0.3 and fixed["at_0.5"]["threshold"] == 0.5


def test_intervals_contain_the_point_estimates():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    val = scores(y, np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0, 1), "val")
    result = compute_metrics(val, val, CLASSES, ThresholdRule("youden"), n_bootstrap=200)
    for name, ci in result["at_threshold"]["intervals"].items():
        assert ci["low"] <= ci["value"] <= ci["high"], name
        assert ci["value"] == pytest.approx(result["at_threshold"][name])


def test_threshold_stability_is_wide_where_few_validation_images_decide_it():
    """Two validation splits of the same size: one with a wide empty gap between the classes (every resample
    puts the threshold on one of the lowest positives), one whose classes overlap (a few images near the
    boundary move it). The evaluated split's specificity moves with the threshold in the second; a fixed
    threshold is not chosen on validation and has no such figure."""
    from distributed.evaluation.scores import describe_stability, threshold_stability

    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], [60, 140])
    gap = scores(y, np.where(y == 1, rng.uniform(0.6, 1.0, 200), rng.uniform(0.0, 0.2, 200)), "val")
    overlap = scores(y, np.clip(np.where(y == 1, rng.normal(0.6, 0.15, 200), rng.normal(0.4, 0.15, 200)), 0, 1),
                     "val")
    y_test = np.repeat([0, 1], [100, 100])
    test = scores(y_test, np.linspace(0, 1, 200)[np.argsort(np.argsort(y_test + rng.uniform(0, 1.5, 200)))])

    def threshold(val, rule: ThresholdRule, resamples: int) -> dict:
        """The threshold's record as distributed.evaluate writes it."""
        out = compute_metrics(val, test, CLASSES, rule, n_bootstrap=resamples)["threshold"]
        stability = threshold_stability(rule, val.labels, val.probs[:, 1], test.labels, test.probs[:, 1],
                                        n_resamples=resamples)
        return {**out, "stability": stability} if stability else out

    narrow = threshold(gap, ThresholdRule("youden"), 300)
    wide = threshold(overlap, ThresholdRule("youden"), 300)
    # with a gap the threshold stays on the lowest few positives
    assert 0.6 <= narrow["stability"]["low"] <= narrow["value"] <= narrow["stability"]["high"] < 0.63
    assert wide["stability"]["low"] < wide["value"] < wide["stability"]["high"]
    assert wide["stability"]["high"] - wide["stability"]["low"] > 0.1

    def spread(threshold: dict) -> float:
        at = threshold["stability"]["at_evaluated"]["specificity"]
        return at["high"] - at["low"]

    assert spread(narrow) < 0.05 < 0.1 < spread(wide)
    assert wide["stability"]["resamples"] == 300
    text = describe_stability(wide, "test")
    assert f"{wide['stability']['low']:.3f}-{wide['stability']['high']:.3f}" in text and "specificity" in text
    fixed = threshold(overlap, parse_threshold("0.3"), 50)
    assert "stability" not in fixed and describe_stability(fixed, "test") is None


def test_the_robust_rule_holds_under_the_worst_shift():
    """Validation scored as it is and under two shifts, one of which raises every normal's probability by
    0.2: the robust threshold is the worst-case Youden threshold over the three, above plain Youden's, and its
    stability resamples the shifted scores with the same images. Without the shifted scores it is refused."""
    from cxrscale.errors import CxrError
    from distributed.evaluation.scores import threshold_stability
    from distributed.model import metrics as m

    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], [80, 120])
    p = np.clip(np.where(y == 1, rng.normal(0.7, 0.12, 200), rng.normal(0.3, 0.12, 200)), 0, 1)
    shifted = np.stack([np.clip(p + rng.normal(0, 0.02, 200), 0, 1), np.where(y == 0, np.clip(p + 0.2, 0, 1), p)])
    val = scores(y, p, "val")
    val.shifted = np.stack([1 - shifted, shifted], axis=-1)
    rule = parse_threshold("robust")
    assert rule.needs_shifts and str(rule) == "robust" and "9 acquisition shifts" in rule.describe()
    out = compute_metrics(val, scores(y, p), CLASSES, rule, n_bootstrap=50)
    assert out["threshold"]["value"] == m.worst_case_youden_threshold(y, np.vstack([p[np.newaxis], shifted]))
    assert out["threshold"]["value"] > ThresholdRule("youden").choose(y, p) + 0.05
    stability = threshold_stability(rule, y, p, y, p, shifted=shifted, n_resamples=100)
    assert stability["low"] <= out["threshold"]["value"] <= stability["high"]
    with pytest.raises(CxrError, match="--threshold robust: the validation split was not scored under"):
        compute_metrics(scores(y, p, "val"), scores(y, p), CLASSES, rule, n_bootstrap=50)


@pytest.mark.parametrize("text", ["sensitivity", "sensitivity:1.5", "youden:3", "1.2", "auto"])
def test_bad_threshold_rules_are_refused(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="expected youden"):
        parse_threshold(text)


def test_evaluate_cli_writes_a_complete_self_contained_report(sample_run, tmp_path):
    result = run_module("distributed.evaluate", "--run", str(sample_run), "--bootstrap", "200",
                        "--threshold", "sensitivity:0.9")
    assert result.returncode == 0, quiet(result.stderr)
    out = sample_run / "eval"
    assert f"report: {out / 'report.html'}" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"]["rule"] == "sensitivity:0.9" and metrics["threshold"]["chosen_on"] == "val"
    stability = metrics["threshold"]["stability"]
    assert stability["resamples"] == 200 and stability["low"] <= stability["median"] <= stability["high"]
    for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc",
                "average_precision", "log_loss", "brier", "ece"):
        assert key in metrics["at_threshold"] and key in metrics["at_0.5"]
    assert set(metrics["at_threshold"]["intervals"]) == {"roc_auc", "sensitivity", "specificity", "accuracy"}
    for name in ("curves", "roc", "pr", "confusion", "calibration", "histograms", "gallery"):
        image = cv2.imread(str(out / metrics["plots"][name]))
        assert image is not None and min(image.shape[:2]) > 200, name
    assert metrics["gallery"] and all((out / g["file"]).is_file() for g in metrics["gallery"])
    assert {g["gradcam_layer"] for g in metrics["gallery"]} == {"block3_relu1"}
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "http" not in page.replace(
        "<!DOCTYPE html>", "")
    assert page.count("data:image/png;base64,") == len(metrics["plots"]) - 1  # every plot but "skipped"
    md = (out / "report.md").read_text()
    assert "95 % CI" in md and "at 0.5" in md and "not told apart" in md
    assert f"the threshold falls in {stability['low']:.3f}-{stability['high']:.3f}" in md
    rows = list(csv.DictReader(io.StringIO((out / "scores.csv").read_text())))
    assert len(rows) == metrics["n"]
    cal = metrics["calibration"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val"  # auto
    assert set(cal["before"]) == set(cal["after"]) == {"ece", "brier", "log_loss"}
    assert "## Calibration" in md and metrics["tta"] is False
    card = (sample_run / "model_card.md").read_text()  # the run's card, from these very metrics
    assert "Demonstration only" in card and "synthetic" in card
    assert f"Operating threshold **{metrics['threshold']['value']:.4f}** (sensitivity:0.9" in card
    assert f"the threshold falls in {stability['low']:.3f}-{stability['high']:.3f}" in card
    auc = metrics["at_threshold"]["intervals"]["roc_auc"]
    assert f"| ROC-AUC | {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f}) |" in card
    assert f"| as served | {cal['after']['ece']:.3f} | {cal['after']['brier']:.3f} |" in card


def test_external_datasets_are_checked_before_scoring(tmp_path):
    """--external refuses the run's own training data and a dataset prepared with another transform, naming it."""
    from cxrscale.errors import CxrError
    from cxrscale.files import sha256_file
    from distributed.evaluate import Target, check_external
    from preprocessing import schema
    from preprocessing.transform import TransformParams

    def prepared(name: str, size: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({
            "schema_version": schema.SCHEMA_VERSION, "classes": ["NORMAL", "PNEUMONIA"],
            "transform": TransformParams(size=size, body_parts=() if name == "site" else ("CHEST",)).to_dict()}))
        return folder

    own, site, other = prepared("own", 64), prepared("site", 64), prepared("other", 96)
    manifest = json.loads((own / "manifest.json").read_text())
    target = Target(own / "model", own, tmp_path / "eval", own, {"manifest_sha256": sha256_file(own / "manifest.json")})
    assert [d for d, _ in check_external([str(site)], target, manifest)] == [site]  # header rules may differ
    with pytest.raises(CxrError, match=r"--external .*own is the dataset the run was trained on"):
        check_external([str(own)], target, manifest)
    with pytest.raises(CxrError, match=r"--external .*other was prepared with another transform"):
        check_external([str(site), str(other)], target, manifest)


def test_tta_views_are_mild_and_unflipped():
    from distributed.model.scorer import tta_views

    image = np.zeros((2, 64, 64, 1), np.uint8)
    image[:, 16:48, 4:30] = 200  # a bright block on the left
    views = tta_views(image)
    assert len(views) == 4 and all(v.shape == image.shape and v.dtype == np.uint8 for v in views)
    assert np.array_equal(views[0], image)
    for view in views[1:]:
        assert view[:, :, :32].mean() > 3 * view[:, :, 32:].mean()  # still on the left: never flipped


def test_tta_in_evaluate_and_predict(sample_run, sample_images, tmp_path):
    result = run_module("distributed.evaluate", "--run", str(sample_run), "--bootstrap", "50", "--no-gradcam",
                        "--tta", "--output", str(tmp_path / "eval"), "-q")
    assert result.returncode == 0, quiet(result.stderr)
    with_tta = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert with_tta["tta"] is True
    folder = str(sample_images / "train" / "PNEUMONIA")
    plain = run_module("distributed.predict", "--run", str(sample_run), folder, "--format", "json", "-q")
    tta = run_module("distributed.predict", "--run", str(sample_run), folder, "--format", "json", "--tta",
                     "--threshold", "0.5", "-q")
    assert plain.returncode == tta.returncode == 0, quiet(plain.stderr + tta.stderr)
    p_plain = np.array([r["probability"] for r in json.loads(plain.stdout)])
    p_tta = np.array([r["probability"] for r in json.loads(tta.stdout)])
    assert len(p_plain) == len(p_tta) and not np.allclose(p_plain, p_tta)
    assert np.all((p_tta >= 0) & (p_tta <= 1))
    from distributed.model.scorer import tta_views
    from distributed.model.scoring import load_scorer
    from preprocessing import schema

    scorer = load_scorer(sample_run / "model")
    data = json.loads((sample_run / "config.json").read_text())["config"]["data"]
    images = np.stack([x for x, _ in schema.dataset(data, "val").take(8).as_numpy_iterator()])
    expected = np.mean([scorer.predict(view) for view in tta_views(images)], axis=0)
    scorer.tta = True
    np.testing.assert_allclose(scorer.predict(images), expected, atol=1e-6)  # the mean over the four views


def test_real_data_predict_agrees_with_evaluate(real_run, prepared64, tmp_path):
    """Predict re-reads the original JPEGs and re-applies the run's transform; its probabilities must equal
    evaluate's on the prepared test shards for the same images. Another prepared dataset (--external, here
    the synthetic sample) is scored beside the run's own splits."""
    result = run_module("distributed.evaluate", "--run", str(real_run["run"]), "--bootstrap", "200",
                        "--external", str(prepared64))
    assert result.returncode == 0, quiet(result.stderr)
    metrics = json.loads((real_run["run"] / "eval" / "metrics.json").read_text())
    rows = {row["split"]: row for row in metrics["splits"]}
    assert list(rows) == ["val", "test", "external:prepared64"]
    assert rows["test"]["origin"] == "carved at random from the pool, grouped by patient"
    assert rows["external:prepared64"]["n"] == 128 and 0 <= rows["external:prepared64"]["flagged"] <= 1
    assert rows["test"]["intervals"]["roc_auc"]["value"] == pytest.approx(
        metrics["at_threshold"]["intervals"]["roc_auc"]["value"])
    assert "## Every split, side by side" in (real_run["run"] / "eval" / "report.md").read_text()
    auc = metrics["at_threshold"]["intervals"]["roc_auc"]
    print(f"real test AUC {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f}), n={metrics['n']}")
    assert auc["value"] > 0.75
    card = (real_run["run"] / "model_card.md").read_text()
    for section in ("Intended use", "Not for", "Training data", "Preprocessing", "Model", "Performance",
                    "Calibration", "Subgroups", "Known limitations", "Provenance"):
        assert section in card, section
    assert "doi:10.17632/rscbjbr9sj.2" in card and "Demonstration only" not in card  # real radiographs, credited
    # a carved test split is named as such, and the card quotes no figure that is not this model's own
    assert "carved from the training source" in card and "0.929" not in card
    assert f"{metrics['n']} images: {metrics['class_counts']['NORMAL']} NORMAL" in card
    evaluated = {r["id"]: float(r["p_PNEUMONIA"]) for r in
                 csv.DictReader(io.StringIO((real_run["run"] / "eval" / "scores.csv").read_text()))}
    paths = [row["path"] for row in csv.DictReader(open(real_run["csv"]))]
    by_id = {keyed_hash(real_run["salt"], "id", p): p for p in paths}
    test_files = [by_id[i] for i in list(evaluated)[:40]]
    # beside them, images that are not the model's kind: the DICOMs are refused by their headers, the rest
    # predicted and flagged by the guard the evaluation fitted (eval/guard.npz)
    ood = write_ood_set(tmp_path / "ood", shared_data_root())
    ood_files = [str(p) for group in ood.values() for p in group]
    result = run_module("distributed.predict", "--run", str(real_run["run"]), "--format", "json", *test_files,
                        *ood_files)
    assert result.returncode == 1, quiet(result.stderr)  # the two refused DICOMs
    predicted = json.loads(result.stdout)
    assert [r["file"] for r in predicted] == test_files + ood_files
    threshold = metrics["threshold"]["value"]
    for row in predicted[:len(test_files)]:
        expected = evaluated[keyed_hash(real_run["salt"], "id", row["file"])]
        assert row["probability"] == pytest.approx(expected, abs=2e-6)
        assert row["threshold"] == pytest.approx(threshold)  # the validation-chosen one, from eval/metrics.json
        assert row["predicted"] == ("PNEUMONIA" if expected >= threshold else "NORMAL")
    assert metrics["guard"]["file"] == "guard.npz" and metrics["guard"]["val_flagged"] <= 0.05
    assert sum(r["outside"] for r in predicted[:len(test_files)]) <= 2  # the same source: about 0.5 % flagged
    for row in predicted[len(test_files):]:
        if row["file"].endswith(".dcm"):
            assert re.search("body part examined EXTREMITY|modality CT", row["error"]) and "outside" not in row
        else:
            assert row["outside"] is True and row["ood_score"] > metrics["guard"]["threshold"], row
    assert "are outside what the model was trained on" in result.stderr
    assert "out-of-distribution" in card and "guard" in card and "Every split, side by side" in card


def test_evaluate_chooses_the_robust_threshold_on_validation_under_the_shifts(real_run, tmp_path):
    """--threshold robust on real radiographs: evaluate scores the prepared validation images under each of
    preprocessing.shifts' shifts, and the threshold it writes is the worst-case Youden threshold over them."""
    from distributed.evaluation.scores import score_split
    from distributed.model import metrics as m
    from distributed.model.scoring import load_scorer
    from preprocessing import schema
    from preprocessing.shifts import SHIFTS, shifted_batch

    result = run_module("distributed.evaluate", "--run", str(real_run["run"]), "--threshold", "robust",
                        "--bootstrap", "100", "--no-gradcam", "--output", str(tmp_path / "eval"), "-q")
    assert result.returncode == 0, quiet(result.stderr)
    threshold = json.loads((tmp_path / "eval" / "metrics.json").read_text())["threshold"]
    assert threshold["rule"] == "robust" and "acquisition shifts" in threshold["description"]
    scorer = load_scorer(real_run["run"] / "model")
    val = score_split(scorer, real_run["data"], "val", shifted=True)
    assert val.shifted.shape == (len(SHIFTS), len(val.labels), 2)
    images = np.stack([x for x, _ in schema.dataset(real_run["data"], "val").as_numpy_iterator()])
    for row, shift in zip(val.shifted, SHIFTS.values()):
        np.testing.assert_allclose(row, scorer.predict(shifted_batch(images, shift)), atol=1e-6)
    p = np.vstack([val.probs[np.newaxis, :, 1], val.shifted[..., 1]])
    assert threshold["value"] == pytest.approx(m.worst_case_youden_threshold(val.labels, p))
    assert threshold["stability"]["low"] <= threshold["value"] <= threshold["stability"]["high"]
    assert "robust: maximises the smallest Youden's J" in (tmp_path / "eval" / "model_card.md").read_text()


def test_predict_reports_a_corrupt_file_and_predicts_the_rest(sample_run, tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        write_image(folder / f"ok{i}.png", radiograph_like(i))
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    result = run_module("distributed.predict", "--run", str(sample_run), str(folder), "--gradcam",
                        str(tmp_path / "cams"), "--threshold", "0.5")
    assert result.returncode == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [Path(r["file"]).name for r in rows] == ["broken.jpeg", "ok0.png", "ok1.png", "ok2.png"]
    assert rows[0]["error"] and not rows[0]["predicted"] and "broken.jpeg" in result.stderr
    for row in rows[1:]:
        assert row["predicted"] in CLASSES and 0 <= float(row["probability"]) <= 1 and not row["error"]
        assert cv2.imread(row["gradcam"]).shape == (64, 64, 3)
    missing = run_module("distributed.predict", "--run", str(sample_run), str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "input not found" in missing.stderr


def test_tflite_model_predicts_and_evaluates_like_the_savedmodel(sample_run, tmp_path):
    import tensorflow as tf

    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(sample_run / "model")).convert())
    image = write_image(tmp_path / "x.png", radiograph_like(5))
    keras_rows = json.loads(run_module("distributed.predict", "--run", str(sample_run), "--format", "json",
                                       str(image)).stdout)
    lite = run_module("distributed.predict", "--model", str(tflite), "--manifest",
                      str(sample_run / "dataset_manifest.json"), "--format", "json", str(image))
    assert lite.returncode == 0, quiet(lite.stderr)
    assert json.loads(lite.stdout)[0]["probability"] == pytest.approx(keras_rows[0]["probability"], abs=1e-4)
    result = run_module("distributed.evaluate", "--model", str(tflite), "--data",
                        json.loads((sample_run / "config.json").read_text())["config"]["data"], "--bootstrap", "50",
                        "--threshold", "robust")  # the LiteRT interpreter scores validation under the shifts too
    assert result.returncode == 0, quiet(result.stderr)
    metrics = json.loads((tmp_path / "eval-model" / "metrics.json").read_text())
    assert metrics["model"]["kind"] == "tflite" and "Grad-CAM needs a Keras model" in result.stderr
    assert metrics["threshold"]["rule"] == "robust" and 0 <= metrics["threshold"]["value"] <= 1
    no_cam = run_module("distributed.predict", "--model", str(tflite), "--manifest",
                        str(sample_run / "dataset_manifest.json"), "--gradcam", str(tmp_path / "c"), str(image))
    assert no_cam.returncode == 2 and "--gradcam needs a Keras model" in no_cam.stderr


@pytest.mark.parametrize("args, message", [
    (["--run", "nowhere"], "run folder not found"),
    (["--model", "x.onnx", "--data", "d"], "model not found"),
])
def test_evaluate_bad_input_exits_2(args, message, capsys):
    from distributed.evaluate import main
    from tests.launch.cli import run_main

    code, _, err = run_main(main, args, capsys)
    assert code == 2 and message in err, err


def test_help(capsys):
    from distributed import evaluate, predict
    from tests.launch.cli import run_main

    for module in (evaluate, predict):
        code, out, _ = run_main(module.main, ["--help"], capsys)
        assert code == 0 and "Example" in out, module.__name__


def test_without_threshold_a_run_keeps_its_previous_evaluations_rule(tmp_path):
    """Evaluating a run again (with --external or --tta, say) must not move its operating point: without
    --threshold the rule of its eval/metrics.json is kept; a run never evaluated, or whose record names no
    single rule, gets Youden's."""
    from distributed.evaluate import default_rule, finding_rules
    from distributed.evaluation.scores import evaluated_rule

    run = tmp_path / "run"
    assert evaluated_rule(run) is None and default_rule(run) == ThresholdRule("youden")
    (run / "eval").mkdir(parents=True)
    for recorded, expected in (("robust", ThresholdRule("robust")),
                               ("sensitivity:0.95", ThresholdRule("sensitivity", 0.95)),
                               ("0.41 / youden", ThresholdRule("youden")),  # per finding, partly a site's
                               (None, ThresholdRule("youden"))):
        (run / "eval" / "metrics.json").write_text(json.dumps({"threshold": {"rule": recorded, "value": 0.3}}))
        assert default_rule(run) == expected, recorded
        assert finding_rules(run, ["A", "B"]) == [expected, expected], recorded
    (run / "eval" / "metrics.json").write_text("{not json")
    assert default_rule(run) == ThresholdRule("youden")
