"""A multi-label model trained for real: the findings sample under horovodrun, its masked loss and label
weights, per-label calibration, the macro validation AUC gathered across ranks, resume and the export; and
the loss and metrics on hand-made numbers."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cxrscale.errors import CxrError
from tests.training_fixtures import quiet, run_train


def test_masked_loss_and_metrics_ignore_unknown_labels():
    from distributed.model import metrics as m
    from distributed.model.heads import masked_binary_crossentropy

    y = np.array([[1.0, 0.0, -1.0], [0.0, -1.0, -1.0]], np.float32)
    p = np.array([[0.9, 0.2, 0.99], [0.3, 0.01, 0.5]], np.float32)
    loss = masked_binary_crossentropy(3)(y, p).numpy()
    expected = [(-np.log(0.9) - np.log(0.8)) / 2, -np.log(0.7)]  # unknown labels add nothing
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    weighted = masked_binary_crossentropy(3, label_weights=[(0.5, 2.0)] * 3)(y, p).numpy()
    np.testing.assert_allclose(weighted, [(-2 * np.log(0.9) - 0.5 * np.log(0.8)) / 2, -0.5 * np.log(0.7)], rtol=1e-5)
    targets = np.array([[1, 0], [0, -1], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.1, 0.99], [0.8, 0.7], [0.3, 0.1]])
    assert m.label_roc_aucs(targets, probs) == [1.0, 1.0]
    assert m.multilabel_validation_metrics(targets, probs)["val_accuracy"] == 1.0  # the unknown 0.99 ignored
    assert m.label_roc_aucs(np.array([[1, -1], [1, 0]]), np.array([[0.5, 0.5], [0.4, 0.4]])) == [None, None]


@pytest.mark.slow
def test_two_workers_train_evaluate_and_export_a_multilabel_cnn(findings32, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", str(findings32), "--model", "cnn", "--batch-size", "16", "--output", str(run),
              "--class-weights", "auto", "--lr", "0.003"]
    first = run_train(*common, "--epochs", "2", np_=2)
    assert first.returncode == 0, quiet(first.stderr)
    config = json.loads((run / "config.json").read_text())
    manifest = json.loads((findings32 / "manifest.json").read_text())
    labels = manifest["classes"]
    assert config["head"] == {"kind": "multilabel", "units": 4}
    assert config["resolved"]["loss"] == "masked_binary_crossentropy"
    train = manifest["counts"]["per_split"]["train"]
    for name in labels:  # each label weighed by its own positives among its known train images
        known = train["total"] - train["unknown"][name]
        weights = config["resolved"]["label_weights"][name]
        assert weights["positive"] == pytest.approx(known / (2 * train[name]))
        assert weights["negative"] == pytest.approx(known / (2 * (known - train[name])))
    # (a checkpoint holds the model and optimizer whatever the head, so --resume is tested on binary runs; the
    # multi-label sample goes through elastic resets from its commits in tests/distributed/test_faults.py)
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["val_auc"]) <= 1 and np.isfinite(float(r["val_loss"])) for r in rows)

    # the validation AUC in the history is the macro AUC of every validation record (both ranks' halves)
    import tensorflow as tf

    from distributed.model import metrics as m
    from preprocessing import schema

    val = list(schema.dataset(findings32, "val").as_numpy_iterator())
    images, targets = np.stack([x for x, _ in val]), np.stack([y for _, y in val])
    assert (targets == -1).any()
    calibration = json.loads((run / "calibration.json").read_text())
    temperatures = calibration["params"]["temperature"]
    assert calibration["method"] == "temperature" and len(temperatures) == 4
    served = tf.saved_model.load(str(run / "model")).signatures["serving_default"](image=tf.constant(images))
    probs = next(iter(served.values())).numpy()
    assert probs.shape == (len(images), 4) and np.all((probs >= 0) & (probs <= 1))
    summary = json.loads((run / "train_summary.json").read_text())
    best = int(summary["best_epoch"])
    # per-label temperatures keep each label's ranking, so the served model's macro AUC is the best epoch's
    assert m.macro_roc_auc(targets, probs) == pytest.approx(float(rows[best - 1]["val_auc"]), abs=1e-4)
    # evaluate reads it finding by finding; predict, export, prune_quantize and ensemble take it
    import subprocess

    from tests.conftest import PYTHON, REPO
    from tests.launch.cli import run_in_process

    evaluated = run_in_process("distributed.evaluate", "--run", str(run), "--split", "val", "--bootstrap", "50")
    assert evaluated.returncode == 0, quiet(evaluated.stderr)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "multi-label" and [r["finding"] for r in metrics["findings"]["findings"]] == labels
    aucs = [r["intervals"]["roc_auc"]["value"] for r in metrics["findings"]["findings"] if r["measured"]]
    assert m.label_roc_aucs(targets, probs) == pytest.approx(
        [r["intervals"]["roc_auc"]["value"] if r["measured"] else None for r in metrics["findings"]["findings"]])
    assert metrics["findings"]["macro_roc_auc"]["value"] == pytest.approx(np.mean(aucs))
    # each measured finding's threshold, chosen again on resamples of validation: where it lands
    assert all(r["stability"]["resamples"] == 50 for r in metrics["findings"]["findings"] if r["measured"])
    with open(run / "eval" / "scores.csv") as fh:
        scored = list(csv.DictReader(fh))
    assert len(scored) == len(targets) and f"p_{labels[0]}" in scored[0]
    gallery = [g["finding"] for g in metrics["gallery"]]  # a Grad-CAM per finding with a positive image
    assert gallery == [n for k, n in enumerate(labels) if (targets[:, k] == 1).any()]
    assert all((run / "eval" / g["file"]).stat().st_size > 500 for g in metrics["gallery"])
    card = (run / "model_card.md").read_text()
    assert all(f"| {name} |" in card for name in labels) and "Macro ROC-AUC" in card
    from distributed.predict import main as predict_main
    from optimize.export import main as export_main
    from tests.launch.cli import run_main

    images_dir = findings32.parent / "sample" / "images"
    code, out, err = run_main(predict_main, ["--run", str(run), str(images_dir / "00000.jpeg"),
                                             str(images_dir / "00001.jpeg")], capsys)
    assert code == 0, err
    predicted = list(csv.DictReader(out.splitlines()))
    thresholds = [r["threshold"] for r in metrics["findings"]["findings"]]
    for row in predicted:  # one probability column per finding, and the decision at that finding's threshold
        for name, t in zip(labels, thresholds):
            assert row[f"positive_{name}"] == ("yes" if float(row[f"p_{name}"]) >= t else "no")
        assert row["predicted"] == ("|".join(n for n in labels if row[f"positive_{n}"] == "yes") or "none")
    # Grad-CAM of each finding predict calls positive, named by its file and the finding
    code, out, err = run_main(predict_main, ["--run", str(run), "--gradcam", str(tmp_path / "cams"),
                                             str(images_dir / "00000.jpeg"), str(images_dir / "00001.jpeg")], capsys)
    assert code == 0, err
    for row in csv.DictReader(out.splitlines()):
        positive = [n for n in labels if row[f"positive_{n}"] == "yes"]
        stem = Path(row["file"]).stem
        maps = [str(tmp_path / "cams" / f"{stem}-{n}-gradcam.png") for n in positive]
        assert row["gradcam"] == "|".join(maps)
        assert all(Path(f).stat().st_size > 200 for f in maps)
    # test-time augmentation averages each finding's probability over the views
    code, out, err = run_main(predict_main, ["--run", str(run), "--tta", str(images_dir / "00000.jpeg")], capsys)
    assert code == 0, err
    [augmented] = list(csv.DictReader(out.splitlines()))
    assert all(0 <= float(augmented[f"p_{n}"]) <= 1 for n in labels)
    assert [augmented[f"p_{n}"] for n in labels] != [predicted[0][f"p_{n}"] for n in labels]

    code, _, err = run_main(export_main, ["--run", str(run), "--split", "val"], capsys)  # in this process
    assert code == 0, err
    record = json.loads((run / "export" / "export.json").read_text())
    assert set(record["formats"]) == {"serving", "onnx", "tflite"}
    assert all(f["parity"]["max_abs_difference"] < 1e-4 for f in record["formats"].values())
    assert record["finding_thresholds"] == dict(zip(labels, thresholds))
    compressed = subprocess.run([PYTHON, "-m", "optimize.prune_quantize", "--run", str(run), "--variants",
                                 "ptq-int8", "--bootstrap", "20", "--latency-runs", "3", "-q"], cwd=REPO,
                                capture_output=True, text=True, timeout=600)
    assert compressed.returncode == 0, quiet(compressed.stderr)
    comparison = json.loads((run / "optimized" / "comparison.json").read_text())
    rows = {r["name"]: r for r in comparison["variants"]}
    assert set(rows) == {"fp32", "ptq-int8"} and list(rows["ptq-int8"]["test_auc_per_finding"]) == labels
    measured = [v for v in rows["fp32"]["test_auc_per_finding"].values() if v is not None]
    assert rows["fp32"]["test_auc"] == pytest.approx(np.mean(measured))  # the macro AUC of the measured findings
    assert "Test ROC-AUC of each finding" in (run / "optimized" / "report.md").read_text()
    # site adaptation, finding by finding: a temperature and threshold for each finding with enough site labels
    # (here the sample's own images, as a plumbing check), the run's for the one without (Pneumothorax: all but
    # 12 of its labels unknown), and the adapted run's evaluation and predict use the site's thresholds
    table = (findings32.parent / "sample" / "labels.csv").read_text().splitlines()
    site_rows = [table[0]] + [line if k < 12 else line.rsplit(",", 1)[0] + ",-1" for k, line in enumerate(table[1:])]
    (findings32.parent / "sample" / "site.csv").write_text("\n".join(site_rows) + "\n")
    adapted = run_in_process("distributed.adapt", "--run", str(run), "--labelled",
                             str(findings32.parent / "sample" / "site.csv"), "--site", "b", "--output",
                             str(tmp_path / "site"), "--bootstrap", "100")
    assert adapted.returncode == 0, adapted.stderr
    assert "Pneumothorax not adapted" in adapted.stderr
    record = json.loads((tmp_path / "site" / "adaptation.json").read_text())["labelled"]
    assert [r["adapted"] for r in record["findings"]] == [True, True, True, False]
    before = json.loads((run / "calibration.json").read_text())["params"]["temperature"]
    after = json.loads((tmp_path / "site" / "calibration.json").read_text())["params"]["temperature"]
    assert after[3] == before[3] and after[:3] != before[:3]
    site_eval = json.loads((tmp_path / "site" / "eval" / "metrics.json").read_text())["findings"]["findings"]
    assert [r["threshold"] for r in site_eval[:3]] == [r["threshold"] for r in record["findings"][:3]]
    assert site_eval[3]["threshold"] == pytest.approx(thresholds[3], abs=1e-4)  # Youden's on validation again
    assert "| Pneumothorax | " in (tmp_path / "site" / "model_card.md").read_text()
    code, out, err = run_main(predict_main, ["--run", str(tmp_path / "site"), str(images_dir / "00000.jpeg")], capsys)
    assert code == 0, err
    [row] = list(csv.DictReader(out.splitlines()))
    assert all(row[f"positive_{n}"] == ("yes" if float(row[f"p_{n}"]) >= r["threshold"] else "no")
               for n, r in zip(labels, site_eval) if abs(float(row[f"p_{n}"]) - r["threshold"]) > 1e-5)  # not a tie
    # an ensemble averages the members' logits finding by finding and fits its own temperature per finding:
    # of two copies of one member, the member's own rankings, so its per-finding AUCs
    ensembled = run_in_process("distributed.ensemble", "--runs", str(run), str(run), "--output",
                               str(tmp_path / "ens"), "-q")
    assert ensembled.returncode == 0, ensembled.stderr
    assert json.loads((tmp_path / "ens" / "config.json").read_text())["head"] == {"kind": "multilabel", "units": 4}
    assert len(json.loads((tmp_path / "ens" / "calibration.json").read_text())["params"]["temperature"]) == 4
    evaluated = run_in_process("distributed.evaluate", "--run", str(tmp_path / "ens"), "--split", "val",
                               "--bootstrap", "50", "--no-gradcam")
    assert evaluated.returncode == 0, evaluated.stderr
    joined = json.loads((tmp_path / "ens" / "eval" / "metrics.json").read_text())["findings"]["findings"]
    assert [r["intervals"]["roc_auc"]["value"] if r["measured"] else None for r in joined] == pytest.approx(
        [r["intervals"]["roc_auc"]["value"] if r["measured"] else None for r in metrics["findings"]["findings"]])
    # benchmarks.members compares multi-label members finding by finding, as distributed.ensemble joins them and
    # distributed.evaluate reads them: the two-copy ensemble's temperatures and thresholds are the ones they fitted
    from benchmarks.members import main as members_main

    site = findings32.parent / "sample" / "site.csv"
    assert members_main(["--runs", str(run), str(tmp_path / "ens"), "--external", str(site), "--bootstrap", "100",
                         "--out", str(tmp_path / "bench"), "-q"]) == 0
    compared = json.loads(next((tmp_path / "bench").glob("members-*.json")).read_text())
    assert compared["task"] == "multi-label" and compared["findings"] == labels
    rows = {" + ".join(r["members"]): r for r in compared["ensembles"]}
    assert len(rows) == 3 and compared["correlation"]["external"][0][1] == pytest.approx(1.0)
    assert compared["members"]["run"]["external_macro_roc_auc"] == pytest.approx(
        rows["run"]["external"]["macro_roc_auc"]["value"])  # over the same measured findings
    ensemble_row = rows["ens"]
    assert ensemble_row["calibration"]["params"]["temperature"] == pytest.approx(
        json.loads((tmp_path / "ens" / "calibration.json").read_text())["params"]["temperature"], rel=1e-3)
    assert [r["threshold"] for r in ensemble_row["external"]["findings"]] == pytest.approx(
        [r["threshold"] for r in joined], abs=1e-3)
    for name in ("run", "run + ens"):  # the same logits, so the same figures on the site's images
        assert [r.get("intervals", {}).get("roc_auc", {}).get("value") for r in rows[name]["external"]["findings"]] \
            == pytest.approx([r.get("intervals", {}).get("roc_auc", {}).get("value")
                              for r in ensemble_row["external"]["findings"]], abs=1e-6)
    pneumothorax = ensemble_row["external"]["findings"][3]
    assert not pneumothorax["measured"] and "too few to measure" in pneumothorax["reason"]
    summary = next((tmp_path / "bench").glob("members-*.md")).read_text()
    assert "external macro ROC-AUC" not in summary and "site.csv macro ROC-AUC" in summary
    assert "| not measured |" in summary
    with pytest.raises(CxrError, match="is a folder: multi-label members are judged on a site's CSV"):
        members_main(["--runs", str(run), str(tmp_path / "ens"), "--external", str(site.parent)])
    with pytest.raises(CxrError, match="--calibration platt is for two classes"):
        members_main(["--runs", str(run), str(tmp_path / "ens"), "--external", str(site), "--calibration", "platt",
                      "--out", str(tmp_path / "bench"), "-q"])


def test_each_finding_is_measured_on_its_known_images_or_said_too_rare():
    from distributed.evaluation.findings import (MIN_CASES, add_threshold_stability, finding_summary, finding_table,
                                                 summary_lines)
    from distributed.evaluation.scores import ThresholdRule

    rng = np.random.default_rng(0)
    n = 300
    targets = np.stack([rng.random(n) < 0.4, rng.random(n) < 0.3, np.arange(n) < MIN_CASES - 2], axis=1).astype(int)
    targets[rng.random(n) < 0.1, 1] = -1  # unknown for some images
    probs = np.clip(targets * 0.5 + rng.random((n, 3)) * 0.6, 0, 1)
    probs[:, 0] = rng.random(n)  # finding 0: no signal
    summary = finding_summary(targets, probs, targets, probs, ["A", "B", "Rare"], ThresholdRule("youden"),
                              n_bootstrap=100)
    a, b, rare = summary["findings"]
    assert a["measured"] and 0.4 < a["intervals"]["roc_auc"]["value"] < 0.6
    seen = targets[:, 1] >= 0
    assert b["n"] == seen.sum() and b["unknown"] == (~seen).sum() and b["positives"] == targets[seen, 1].sum()
    from sklearn.metrics import roc_auc_score

    assert b["intervals"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(targets[seen, 1], probs[seen, 1]))
    assert b["intervals"]["roc_auc"]["low"] <= b["intervals"]["roc_auc"]["value"] <= b["intervals"]["roc_auc"]["high"]
    assert not rare["measured"] and "too few to measure" in rare["reason"]
    assert f"{MIN_CASES - 2} positive" in rare["reason"]
    assert summary["measured"] == ["A", "B"]
    assert summary["macro_roc_auc"]["value"] == pytest.approx(
        np.mean([a["intervals"]["roc_auc"]["value"], b["intervals"]["roc_auc"]["value"]]))
    _, rows = finding_table(summary)
    assert rows[2][3] == "too few to measure"
    assert any(line.startswith("**Rare: too few to measure") for line in summary_lines(summary, "test", n))

    # where each measured finding's threshold lands when validation is resampled, and what that does to it
    add_threshold_stability(summary, targets, probs, targets, probs, ThresholdRule("youden"), n_bootstrap=200)
    assert "stability" not in rare
    for k, row in ((0, a), (1, b)):
        stability, seen = row["stability"], targets[:, k] >= 0
        assert stability["resamples"] == 200 and stability["low"] <= stability["median"] <= stability["high"]
        assert set(stability["at_evaluated"]) == {"sensitivity", "specificity", "accuracy"}
        # specificity rises with the threshold: its range is that at the ends of the threshold's interval
        negatives = probs[seen, k][targets[seen, k] == 0]
        specificity = stability["at_evaluated"]["specificity"]
        assert specificity["low"] == pytest.approx(np.mean(negatives < stability["low"]), abs=0.02)
        assert specificity["high"] == pytest.approx(np.mean(negatives < stability["high"]), abs=0.02)
    # no signal: where A's threshold lands is up to the draw; B's scores separate, so its threshold moves less
    assert a["stability"]["high"] - a["stability"]["low"] > b["stability"]["high"] - b["stability"]["low"]
    _, rows = finding_table(summary)
    assert rows[1][5] == f"{b['threshold']:.3f} ({b['stability']['low']:.3f}–{b['stability']['high']:.3f})"
    line = next(line for line in summary_lines(summary, "test", n) if line.startswith("In brackets"))
    assert "200 bootstrap resamples" in line and "; B sensitivity " in line
    fixed = finding_summary(targets, probs, targets, probs, ["A", "B", "Rare"], ThresholdRule("fixed", 0.5),
                            n_bootstrap=50)
    add_threshold_stability(fixed, targets, probs, targets, probs, ThresholdRule("fixed", 0.5), n_bootstrap=50)
    assert not any("stability" in r for r in fixed["findings"])  # not chosen on validation: nothing to resample


def test_the_robust_rule_chooses_each_findings_threshold_on_its_known_images_under_the_shifts():
    from distributed.evaluation.findings import add_threshold_stability, finding_summary
    from distributed.evaluation.scores import ThresholdRule
    from distributed.model import metrics as m

    rng = np.random.default_rng(2)
    n = 300
    targets = (rng.random((n, 2)) < 0.4).astype(int)
    targets[rng.random(n) < 0.2, 1] = -1  # B unknown for some images
    probs = np.clip(targets * 0.4 + rng.random((n, 2)) * 0.6, 0, 1)
    shifted = np.stack([np.clip(probs + rng.normal(0, 0.03, probs.shape), 0, 1),
                        np.where(targets == 0, np.clip(probs + 0.15, 0, 1), probs)])  # negatives score higher
    rule = ThresholdRule("robust")
    summary = finding_summary(targets, probs, targets, probs, ["A", "B"], rule, val_shifted=shifted, n_bootstrap=50)
    add_threshold_stability(summary, targets, probs, targets, probs, rule, val_shifted=shifted, n_bootstrap=100)
    for k, row in enumerate(summary["findings"]):
        seen = targets[:, k] >= 0
        y = targets[seen, k]
        expected = m.worst_case_youden_threshold(y, np.vstack([probs[seen, k][np.newaxis], shifted[:, seen, k]]))
        assert row["threshold"] == expected
        assert row["stability"]["low"] <= expected <= row["stability"]["high"]
    assert summary["rule"] == "robust"
    unshifted = finding_summary(targets, probs, targets, probs, ["A", "B"], rule, n_bootstrap=50)
    assert all(r["threshold"] is None and "not scored under" in r["threshold_undefined"] for r in unshifted["findings"])
