"""MLflow tracking against a real `mlflow server` on 127.0.0.1, read back through the MLflow client: training on
two Horovod workers (rank 0 alone logs), its evaluation and its resumption in the same MLflow run, an embedded
SQLite store, and a server that is down (one warning, and the work goes on)."""
from __future__ import annotations

import argparse
import json
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from cxrscale import tracking
from cxrscale.files import sha256_file
from tests.conftest import PYTHON, REPO
from tests.launch.cli import run_in_process, run_module
from tests.training_fixtures import closed_port_uri, quiet, run_train


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return run_in_process("distributed.evaluate", "--no-gradcam", "--bootstrap", "50", *args)


def test_resolve_uri_makes_folders_absolute_and_names_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    embedded = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"  # MLflow 3 refuses its old plain-file store
    assert tracking.resolve_uri("file:./mlruns") == embedded == tracking.resolve_uri("mlruns")
    assert tracking.resolve_uri("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    with pytest.raises(argparse.ArgumentTypeError, match="expected a folder, file:PATH or an http"):
        tracking.resolve_uri("ftp://example.org/runs")
    bad = subprocess.run([PYTHON, "-m", "distributed.train", "--data", "x", "--tracking-uri", "ftp://h/x"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tracking-uri" in bad.stderr and "ftp://h/x" in bad.stderr


def test_two_worker_training_its_evaluation_and_resume_share_one_mlflow_run(prepared64, mlflow_server, tmp_path):
    """Two workers started by launch.local (horovodrun on this node) log one MLflow run; the evaluation and a
    resume on one worker add to it."""
    client = MlflowClient(mlflow_server)
    run = tmp_path / "tracked"
    tracked = ("--tracking-uri", mlflow_server, "--experiment", "two-workers")
    result = run_module("launch.local", "--np", "2", "--", "distributed.train", "--data", str(prepared64), "--epochs",
                        "2", "--batch-size", "16", "--output", str(run), *tracked, timeout=600)
    assert result.returncode == 0, quiet(result.stderr + result.stdout)[-3000:]
    assert "starting:" in result.stderr and "horovodrun -np 2" in result.stderr
    [logged] = runs_of(client, "two-workers")  # rank 0 alone: one run, not one per worker
    record = json.loads((run / tracking.RECORD).read_text())
    assert record["run_id"] == logged.info.run_id and logged.info.status == "FINISHED"
    config = json.loads((run / "config.json").read_text())
    assert logged.data.params["config.model"] == "cnn" and logged.data.params["resolved.workers"] == "2"
    assert float(logged.data.params["resolved.scaled_lr"]) == config["resolved"]["scaled_lr"]
    assert logged.data.tags["dataset_manifest_sha256"] == sha256_file(prepared64 / "manifest.json")
    assert logged.data.tags["git_commit"] == config["git_commit"]
    history = client.get_metric_history(logged.info.run_id, "val_auc")
    rows = [json.loads(json.dumps(r)) for r in __import__("csv").DictReader(open(run / "history.csv"))]
    assert [h.step for h in history] == [1, 2]
    assert [h.value for h in history] == pytest.approx([float(r["val_auc"]) for r in rows])
    summary = json.loads((run / "train_summary.json").read_text())
    assert logged.data.metrics["best_val_auc"] == pytest.approx(summary["best_val_auc"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"model", "run"} <= artifacts
    assert "model/saved_model.pb" in {a.path for a in client.list_artifacts(logged.info.run_id, "model")}

    evaluated = evaluate("--run", str(run), *tracked)
    assert evaluated.returncode == 0, quiet(evaluated.stderr)[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    after = client.get_run(logged.info.run_id)  # the evaluation lands in the training run's MLflow run
    auc = metrics["at_threshold"]["intervals"]["roc_auc"]
    assert after.data.metrics["test_roc_auc"] == pytest.approx(auc["value"])
    assert after.data.metrics["test_roc_auc_ci_low"] == pytest.approx(auc["low"])
    assert after.data.metrics["test_roc_auc_ci_high"] == pytest.approx(auc["high"])
    assert after.data.metrics["threshold"] == pytest.approx(metrics["threshold"]["value"])
    assert after.data.metrics["test_sensitivity_at_0.5"] == pytest.approx(metrics["at_0.5"]["sensitivity"])
    reports = {a.path for a in client.list_artifacts(logged.info.run_id, "eval")}
    assert {"eval/report.html", "eval/report.md", "eval/metrics.json", "eval/model_card.md"} <= reports

    # resumed on one worker: the MLflow run is the training run's, whatever the number of workers
    resumed = run_train("--data", str(prepared64), "--epochs", "3", "--batch-size", "16", "--output", str(run),
                        "--resume", *tracked)
    assert resumed.returncode == 0, quiet(resumed.stderr)[-3000:]
    assert len(runs_of(client, "two-workers")) == 1
    assert [h.step for h in client.get_metric_history(logged.info.run_id, "val_auc")] == [1, 2, 3]
    assert client.get_run(logged.info.run_id).info.status == "FINISHED"


def test_a_server_that_is_down_gives_one_warning_and_the_run_goes_on(prepared64, tmp_path):
    down = closed_port_uri()
    run = tmp_path / "untracked"
    result = run_train("--data", str(prepared64), "--epochs", "1", "--batch-size", "16", "--output", str(run),
                       "--tracking-uri", down)
    assert result.returncode == 0, quiet(result.stderr)[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "MLflow tracking at" in line]
    assert len(warnings) == 1 and down in warnings[0] and "goes on without tracking" in warnings[0], warnings
    assert (run / "model" / "saved_model.pb").exists() and not (run / tracking.RECORD).exists()
    evaluated = evaluate("--run", str(run), "--tracking-uri", down)
    assert evaluated.returncode == 0 and (run / "eval" / "metrics.json").exists()
    assert sum("MLflow tracking at" in line for line in evaluated.stderr.splitlines()) == 1


def test_an_embedded_store_needs_no_server(sample_run, tmp_path):
    store = tmp_path / "mlruns"
    model = sample_run / "model"
    evaluated = evaluate("--model", str(model), "--data", json.loads((sample_run / "config.json").read_text())[
        "config"]["data"], "--output", str(tmp_path / "eval"), "--tracking-uri", f"file:{store}",
        "--experiment", "embedded")
    assert evaluated.returncode == 0, quiet(evaluated.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    [logged] = runs_of(client, "embedded")
    assert client.get_experiment_by_name("embedded").artifact_location == (store / "artifacts").as_uri()
    assert "eval/report.html" in {a.path for a in client.list_artifacts(logged.info.run_id, "eval")}
    assert logged.info.run_name == "evaluate model" and logged.data.params["model"] == str(model)
    assert 0 <= logged.data.metrics["test_roc_auc"] <= 1 and "test_roc_auc_ci_low" in logged.data.metrics
