"""benchmarks.robustness: the suite re-reads a run's own test split from its files, through the real transform,
model and CLI, under each acquisition shift (tests/preprocessing/test_shifts.py checks the shifts)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import robustness as R
from tests.conftest import PYTHON, REPO
from tests.training_fixtures import quiet


@pytest.mark.slow
def test_suite_on_a_real_run_matches_evaluate_and_scores_every_shift(real_run, shared_data, tmp_path):
    run, data = real_run["run"], real_run["data"]
    salt = tmp_path / "salt"
    salt.write_bytes(real_run["salt"])
    result = subprocess.run([PYTHON, "-m", "benchmarks.robustness", "--run", str(run), "--input", str(real_run["csv"]),
                             "--salt-file", str(salt), "--fullres", str(shared_data / "kermany-fullres"),
                             "--bootstrap", "50", "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, quiet(result.stderr)
    [path] = list((tmp_path / "out").glob("robustness-*.json"))
    results = json.loads(path.read_text())
    shifts = results["shifts"]
    assert set(R.SHIFTS) | {"fullres"} == set(shifts)
    test_count = json.loads((data / "manifest.json").read_text())["counts"]["per_split"]["test"]["total"]
    assert all(shifts[name]["n"] == test_count for name in R.SHIFTS)
    assert 0 < shifts["fullres"]["n"] < test_count  # only the test images that have a full-resolution original
    assert all(0.5 <= shifts[name]["roc_auc"] <= 1 for name in R.SHIFTS)
    # "none" re-reads the files through the same transform the shards were written with: evaluate's test AUC
    from distributed.evaluation.scores import score_split
    from distributed.model.metrics import roc_auc
    from distributed.model.scoring import load_scorer

    test = score_split(load_scorer(run / "model"), data, "test")
    assert shifts["none"]["roc_auc"] == pytest.approx(roc_auc(test.labels, test.probs[:, 1]), abs=1e-6)
    assert (tmp_path / "out" / "robustness-auc.png").is_file()
    assert "AUC drop under jpeg-40" in result.stdout
    # the run's own training and calibration, judged beside the shifts
    training = results["training"]
    history = training["history"]
    assert training["epochs"] == len(history) == 4 and training["calibration_fitted_on"] == "val"
    assert training["best_val_auc"] == max(r["val_auc"] for r in history)
    assert training["loss_over_best"] >= 1 and training["accuracy_below_best"] >= 0
    names = {c["name"] for c in results["checks"]}
    assert {"best validation AUC", "validation loss after epoch 2 / its best"} <= names
    assert not any("ECE" in n for n in names)  # reported per shift; judged at another site by benchmarks.shift
    assert training["calibration"] == "temperature"


def test_bad_arguments_are_clear(tmp_path):
    result = subprocess.run([PYTHON, "-m", "benchmarks.robustness", "--run", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--run needs --input and --salt-file" in result.stderr


def test_an_ensembles_training_is_judged_by_its_weakest_member(tmp_path):
    def member(name: str, aucs: list[float], losses: list[float], accuracies: list[float]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        rows = ["epoch,val_loss,val_accuracy,val_auc"] + [f"{i},{l},{a},{u}" for i, (u, l, a) in
                                                          enumerate(zip(aucs, losses, accuracies))]
        (folder / "history.csv").write_text("\n".join(rows) + "\n")
        return folder

    steady = member("steady", [0.9, 0.97, 0.98, 0.99], [0.5, 0.3, 0.2, 0.2], [0.8, 0.9, 0.93, 0.94])
    swinging = member("swinging", [0.9, 0.95, 0.96, 0.94], [0.5, 0.3, 0.9, 0.3], [0.8, 0.9, 0.7, 0.9])
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "config.json").write_text(json.dumps({"ensemble": {"members": [str(steady), str(swinging)]}}))
    (ensemble / "calibration.json").write_text(json.dumps({"method": "temperature", "fitted_on": "val"}))
    out = R.training_stability(ensemble)
    assert out["best_val_auc"] == 0.96 and out["loss_over_best"] == pytest.approx(0.9 / 0.3)
    assert out["accuracy_below_best"] == pytest.approx(0.2) and out["epochs"] == 4
    assert set(out["members"]) == {str(steady), str(swinging)} and out["calibration_fitted_on"] == "val"
    single = R.training_stability(steady)
    assert single["best_val_auc"] == 0.99 and len(single["history"]) == 4


def test_the_summary_says_where_the_operating_point_moves_most():
    shift = lambda auc, sens, spec: {"n": 312, "roc_auc": auc, "roc_auc_ci": {"low": auc - 0.01, "high": auc + 0.01},
                                     "accuracy": 0.9, "sensitivity": sens, "specificity": spec, "ece": 0.05}
    results = {"run": "r", "data": "d", "threshold": 0.19, "tta": False, "training": {},
               "shifts": {"none": shift(0.979, 0.990, 0.795), "gamma-0.7": shift(0.978, 0.995, 0.701),
                          "zoom-in-1.11": shift(0.973, 1.0, 0.530), "gamma-1.4": shift(0.979, 0.969, 0.838)}}
    assert R.operating_point_moves(results["shifts"]) == {
        "sensitivity": ("gamma-1.4", pytest.approx(0.021), 0.990),
        "specificity": ("zoom-in-1.11", pytest.approx(0.265), 0.795)}
    checks, md = R.summarise(results)
    assert "specificity at the validation threshold falls most under zoom-in-1.11, by 0.265 (from 0.795)" in md
    assert all(c["status"] == "met" for c in checks if c["name"].startswith("AUC drop"))
    steady = {name: shift(0.979, 0.990, 0.795) for name in ("none", "blur")}
    assert R.operating_point_moves(steady) == {}
