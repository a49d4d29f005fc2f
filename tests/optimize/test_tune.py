"""optimize.tune: the declared spaces, and real searches with Ray Tune over real distributed.train runs."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import stats

from cxrscale.errors import CxrError
from cxrscale.files import read_numeric_csv
from optimize import tune as cxr_tune
from tests.conftest import PYTHON, REPO, radiograph_like, write_image
from benchmarks.injection import kill_workers, wait_for
from tests.training_fixtures import prepare, quiet


@pytest.fixture(scope="module")
def planted32(tmp_path_factory) -> Path:
    """200 images at 32 px where a bright patch marks PNEUMONIA: a good learning rate reaches a validation
    AUC near 0.8 after one epoch, so a weak trial is easy to tell apart. Two train shards (for 2 workers)."""
    root = tmp_path_factory.mktemp("planted")
    for i in range(100):
        write_image(root / "raw" / "NORMAL" / f"IM-{i:04d}-0001.jpeg", radiograph_like(i, (96, 96)))
        write_image(root / "raw" / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg",
                    radiograph_like(1000 + i, (96, 96), bright_patch=True))
    return prepare(root / "raw", root / "p32", "--size", "32", "--shards", "2", "--val-fraction", "0.2",
                   "--test-fraction", "0")


def run_tune(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "optimize.tune", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})))


def write_space(path: Path, space: dict) -> Path:
    path.write_text(json.dumps(space))
    return path


def results(output: Path) -> list[dict]:
    import csv

    with open(output / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def check_tracked_trials(uri: str, experiment: str, rows: list[dict], data: Path) -> None:
    """Every trial is one MLflow run of the experiment (Ray Tune's MLflow integration), and the comparison read
    back through the client ranks them as results.csv does."""
    from mlflow.tracking import MlflowClient

    from cxrscale.files import sha256_file

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["metrics.best_val_auc DESC"])
    assert len(runs) == len(rows) and all(r.info.status == "FINISHED" for r in runs)
    assert [float(r.data.params["lr"]) for r in runs] == [float(row["lr"]) for row in rows]
    assert [r.data.metrics["best_val_auc"] for r in runs] == pytest.approx([float(row["best_val_auc"]) for row in rows])
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
        assert run.data.tags["dataset_manifest_sha256"] == sha256_file(data / "manifest.json")
        assert run.data.tags["tune.search"] == "grid" and run.data.tags["git_commit"]


def trained_config(row: dict) -> dict:
    """The options the trial's distributed.train run actually used (its run folder's config.json)."""
    return json.loads((Path(row["run_dir"]) / "config.json").read_text())["config"]


# --- the declared spaces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["cnn", "vgg16", "resnet50"])
@pytest.mark.parametrize("search", cxr_tune.SEARCHES)
def test_default_spaces_are_valid_training_options(model, search):
    space, _ = cxr_tune.load_space(None, model)
    cxr_tune.check_space(space, search, {"data": "prepared/x", "model": model, "weights": "none"})
    assert {"lr", "batch_size", "dropout", "l2", "augment"} <= set(space)
    assert space["lr"].kind == "loguniform"


@pytest.mark.parametrize("model", ["vgg16", "resnet50"])
def test_default_unfrozen_layer_choices_name_real_backbone_layers(model):
    from distributed.model.builders import backbone_layers, set_backbone_trainable
    from distributed.model.zoo import build_model, min_image_size, model_spec

    built = build_model(model, min_image_size(model), weights="none")
    layers = backbone_layers(built)
    trainable_counts = []
    for start in model_spec(model).tune_space["fine_tune_from"]["choice"]:
        set_backbone_trainable(built, fine_tune_from=start)  # raises for a name the backbone lacks
        trainable_counts.append(sum(layer.trainable for layer in layers))
    assert trainable_counts[0] < trainable_counts[1] < trainable_counts[2] == len(layers)


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"loguniform": [1e-4, 1e-2]}}, "learning_rate is not an option of distributed.train"),
    ({"epochs": {"choice": [1, 2]}}, "epochs cannot be searched"),
    ({"lr": {"loguniform": [0, 1e-2]}}, "loguniform bounds must be positive"),
    ({"dropout": {"uniform": [0.5, 0.1]}}, "low < high"),
    ({"batch_size": {"choice": [16, 8.5]}}, "batch_size = 8.5 must be int"),
    ({"augment": {"choice": [True, "yes"]}}, "augment = 'yes' must be bool"),
    ({"lr": {"normal": [0, 1]}}, "must have one of loguniform, uniform, choice, randint"),
    ({"lr": {"choice": []}}, "needs a non-empty list"),
])
def test_bad_spaces_are_refused_with_the_option_named(space, message):
    with pytest.raises(CxrError, match=message):
        cxr_tune.parse_space(space, "--space s.json")


def test_space_values_are_checked_against_training_rules_before_any_trial():
    space = cxr_tune.parse_space({"dropout": {"choice": [0.2, 1.5]}}, "--space s.json")
    with pytest.raises(CxrError, match=r"dropout = 1.5 is not a valid training option.*--dropout must be in"):
        cxr_tune.check_space(space, "random", {"data": "d", "model": "cnn"})
    no_grid = cxr_tune.parse_space({"lr": {"loguniform": [1e-4, 1e-2]}}, "--space s.json")
    with pytest.raises(CxrError, match="lr declare.*no grid values"):
        cxr_tune.check_space(no_grid, "grid", {"data": "d", "model": "cnn"})


def test_random_draws_follow_the_declared_distributions():
    space = cxr_tune.parse_space({"lr": {"loguniform": [1e-5, 1e-2]}, "dropout": {"uniform": [0.1, 0.6]},
                                  "batch_size": {"choice": [16, 32, 64]}, "seed": {"randint": [0, 5]},
                                  "augment": {"grid": [False, True]}}, "--space s.json")
    domains = cxr_tune.param_space(space, "random")
    rng = np.random.default_rng(0)
    n = 4000
    lr = np.asarray(domains["lr"].sample(size=n, random_state=rng))
    assert lr.min() >= 1e-5 and lr.max() <= 1e-2
    # log-uniform: log10(lr) is uniform on [-5, -2]; a plain uniform on [1e-5, 1e-2] would put ~90 % above 1e-3
    assert stats.kstest(np.log10(lr), stats.uniform(loc=-5, scale=3).cdf).pvalue > 0.01
    assert 0.28 < np.mean(lr < 1e-4) < 0.39
    dropout = np.asarray(domains["dropout"].sample(size=n, random_state=rng))
    assert stats.kstest(dropout, stats.uniform(loc=0.1, scale=0.5).cdf).pvalue > 0.01
    for name, values in (("batch_size", [16, 32, 64]), ("seed", [0, 1, 2, 3, 4]), ("augment", [False, True])):
        drawn = list(domains[name].sample(size=n, random_state=rng))
        counts = [drawn.count(v) for v in values]
        assert sum(counts) == n, f"{name} drew values outside {values}"
        assert stats.chisquare(counts).pvalue > 0.01, (name, counts)


# --- real searches ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grid_search_on_two_horovod_workers_and_its_best_config_trains(planted32, tmp_path, mlflow_server):
    space = write_space(tmp_path / "space.json", {"lr": {"grid": [1e-3, 3e-3]}, "batch_size": 16,
                                                  "augment": False})
    out = tmp_path / "grid"
    result = run_tune("--data", str(planted32), "--search", "grid", "--space", str(space), "--max-epochs", "2",
                      "--workers-per-trial", "2", "--cpus-per-trial", "2", "--output", str(out), "-q",
                      "--tracking-uri", mlflow_server, "--experiment", "grid-search")
    assert result.returncode == 0, quiet(result.stderr)[-3000:]
    rows = results(out)
    check_tracked_trials(mlflow_server, "grid-search", rows, planted32)
    assert sorted(float(r["lr"]) for r in rows) == [1e-3, 3e-3]
    aucs = [float(r["best_val_auc"]) for r in rows]
    assert aucs == sorted(aucs, reverse=True) and all(0 <= a <= 1 for a in aucs)
    for row in rows:
        run = Path(row["run_dir"])
        assert row["status"] == "completed" and int(row["epochs"]) == 2
        assert (run / "model" / "saved_model.pb").exists()
        meta = json.loads((run / "config.json").read_text())
        assert meta["resolved"]["workers"] == 2  # each trial really ran data-parallel under horovodrun
        assert meta["config"]["lr"] == float(row["lr"]) and meta["config"]["batch_size"] == 16
        history = read_numeric_csv(run / "history.csv")
        assert max(h["val_auc"] for h in history) == pytest.approx(float(row["best_val_auc"]))
    assert f"| 1 | {rows[0]['trial']} |" in (out / "report.md").read_text()
    assert cv2.imread(str(out / "auc_vs_params.png")) is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_run_dir"] == rows[0]["run_dir"]
    assert summary["ray_address"].startswith("127.0.0.1:")  # the private Ray listens on loopback only

    best = json.loads((out / "best_config.json").read_text())
    assert best["lr"] == float(rows[0]["lr"]) and best["model"] == "cnn" and "output" not in best
    # distributed.train takes it as its --config: every option as the best trial trained with it
    from distributed.training.config import parse_config

    again = parse_config(["--config", str(out / "best_config.json"), "--epochs", "1"])
    assert {k: getattr(again, k) for k in best if k != "epochs"} == {k: v for k, v in best.items() if k != "epochs"}
    assert {k: v for k, v in trained_config(rows[0]).items() if k in best and k != "epochs"} == \
        {k: v for k, v in best.items() if k != "epochs"}


def running_commands_with(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
def test_asha_stops_a_planted_bad_learning_rate_early_and_draws_from_the_declared_space(planted32, tmp_path):
    """Two given points (a sound rate, then a diverging one) and one draw from a YAML space: ASHA stops the
    diverging trial early, and the drawn trial trains with values inside the declared distributions."""
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1.0e-3, 3.0e-3]}\ndropout: {uniform: [0.1, 0.5]}\n"
                     "batch_size: {choice: [8, 16]}\naugment: false\nearly_stopping_patience: 100\n")
    points = tmp_path / "points.json"
    points.write_text(json.dumps([{"lr": 1e-3, "dropout": 0.3, "batch_size": 16},
                                  {"lr": 10.0, "dropout": 0.3, "batch_size": 16}]))
    out = tmp_path / "asha"
    result = run_tune("--data", str(planted32), "--search", "asha", "--trials", "3", "--space", str(space),
                      "--points-to-evaluate", str(points), "--max-epochs", "4", "--max-concurrent", "1",
                      "--output", str(out), "-q")
    assert result.returncode == 0, quiet(result.stderr)[-3000:]
    rows = results(out)
    assert len(rows) == 3
    by_lr = {float(r["lr"]): r for r in rows}
    good, bad = by_lr.pop(1e-3), by_lr.pop(10.0)
    assert good["status"] == "completed" and int(good["epochs"]) == 4
    assert (Path(good["run_dir"]) / "model" / "saved_model.pb").exists()
    assert bad["status"].startswith("stopped by ASHA") and int(bad["epochs"]) < 4, bad
    assert float(bad["best_val_auc"]) < float(good["best_val_auc"])
    assert not (Path(bad["run_dir"]) / "model").exists()
    assert not running_commands_with(str(Path(bad["run_dir"]))), "the stopped trial's training outlived it"
    assert json.loads((out / "best_config.json").read_text())["lr"] != 10.0
    [drawn] = by_lr.values()
    lr, dropout, batch = float(drawn["lr"]), float(drawn["dropout"]), int(drawn["batch_size"])
    assert 1e-3 <= lr <= 3e-3 and 0.1 <= dropout <= 0.5 and batch in (8, 16)
    used = trained_config(drawn)
    assert (used["lr"], used["dropout"], used["batch_size"], used["augment"]) == (lr, dropout, batch, False)


@pytest.mark.slow
def test_a_killed_trial_is_retried_and_a_killed_search_resumes_where_it_stopped(planted32, tmp_path):
    """Two faults in one search: the first trial's training is killed (as a lost node would end it) and Tune
    retries it from its own checkpoint; then the whole search is killed, and the same command resumes it."""
    space = write_space(tmp_path / "space.json", {"lr": {"grid": [1e-3, 3e-3]}, "batch_size": 16,
                                                  "early_stopping_patience": 100})
    out = tmp_path / "killed"
    args = ["--data", str(planted32), "--search", "grid", "--space", str(space), "--max-epochs", "8",
            "--max-concurrent", "1", "--output", str(out), "-q"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TUNE_GLOBAL_CHECKPOINT_S="0.5")
    proc = subprocess.Popen([PYTHON, "-m", "optimize.tune", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def first_epochs() -> int:
        epochs = [len(read_numeric_csv(h)) for h in out.glob("trials/*/history.csv")]
        return max(epochs) if epochs else 0

    try:
        wait_for(lambda: first_epochs() >= 2, 300, "two epochs of the first trial", alive=lambda: proc.poll() is None)
        assert kill_workers(str(out / "trials"), {}), "no training process to kill"
        # Tune retries the trial from its checkpoint: its log says so, and it goes on past the kill
        wait_for(lambda: any("resuming after epoch" in (t / "train.log").read_text()
                             for t in out.glob("trials/*") if (t / "train.log").is_file()) and first_epochs() >= 4,
                 300, "the retried trial to resume and train on", alive=lambda: proc.poll() is None)
        time.sleep(1.0)  # let Tune save its state (every 0.5 s here)
        assert proc.poll() is None, "the search ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a lost job or node would
        proc.wait()
    [first] = list(out.glob("trials/*"))
    done_before = len(read_numeric_csv(first / "history.csv"))
    assert 4 <= done_before < 8 and not (first / "train_summary.json").exists()

    changed = run_tune(*[a if a != "8" else "9" for a in args])
    assert changed.returncode == 2 and "holds a search with other settings (" in changed.stderr
    assert "max_epochs" in changed.stderr

    result = run_tune(*args)
    assert result.returncode == 0, quiet(result.stderr)[-3000:]
    rows = results(out)  # each trial shown once, the retried one too
    assert len(rows) == 2 and all(r["status"] == "completed" and int(r["epochs"]) == 8 for r in rows)
    resumed = next(r for r in rows if Path(r["run_dir"]) == first)
    log = (first / "train.log").read_text()
    assert log.count("resuming after epoch") >= 2 and log.count("best val AUC") == 1  # continued, never restarted
    history = read_numeric_csv(first / "history.csv")
    assert [int(h["epoch"]) for h in history] == list(range(1, 9))
    assert float(resumed["best_val_auc"]) == pytest.approx(max(h["val_auc"] for h in history))

    stamps = {p: p.stat().st_mtime for p in out.glob("trials/*/history.csv")}
    rerun = run_tune(*args)  # a finished search: nothing is trained again
    assert rerun.returncode == 0, quiet(rerun.stderr)[-2000:]
    assert {p: p.stat().st_mtime for p in out.glob("trials/*/history.csv")} == stamps
    assert [r["trial"] for r in results(out)] == [r["trial"] for r in rows]


def test_cli_refuses_bad_input_before_starting_ray(planted32, tmp_path):
    cases = [
        (["--data", str(tmp_path / "missing")], "missing"),
        (["--data", str(planted32), "--max-epochs", "0"], "--max-epochs must be at least 1"),
        (["--data", str(planted32), "--space", str(tmp_path / "nope.json")], "--space"),
        (["--data", str(planted32), "--search", "grid", "--points-to-evaluate", str(tmp_path / "p.json")],
         "--points-to-evaluate is for --search random or asha"),
        (["--data", str(planted32), "--space", str(write_space(tmp_path / "big.json", {"batch_size": {
            "choice": [16, 4096]}}))], "batch_size 4096: the global batch (4096 per worker x 1 workers = 4096) is "
                                      "larger than the train split (160 images)"),
        (["--data", str(planted32), "--workers-per-trial", "3"], "has 2 train shard files for 3 workers"),
    ]
    for args, message in cases:
        result = run_tune(*args, "--output", str(tmp_path / "out"))
        assert result.returncode == 2, (args, result.stderr[-1500:])
        assert "Traceback" not in result.stderr and message in result.stderr, result.stderr[-1500:]
    assert run_tune("--help").returncode == 0


@pytest.mark.slow
def test_a_failing_trial_is_reported_and_the_others_complete(findings32, tmp_path):
    # on the multi-label sample: a trial reads the macro validation AUC of its findings
    space = write_space(tmp_path / "space.json", {"weights": {"grid": ["none", str(tmp_path / "missing.h5")]},
                                                  "batch_size": 16})
    out = tmp_path / "failing"
    result = run_tune("--data", str(findings32), "--search", "grid", "--space", str(space), "--max-epochs", "1",
                      "--max-failures", "0", "--output", str(out), "-q")
    assert result.returncode == 1, quiet(result.stderr)[-3000:]  # finished, with a failed trial to look at
    by_status = {r["status"]: r for r in results(out)}
    assert set(by_status) == {"completed", "error"}
    assert "missing.h5" in by_status["error"]["error"]
    assert "## Failed trials" in (out / "report.md").read_text()
    assert json.loads((out / "best_config.json").read_text())["weights"] == "none"
    completed = by_status["completed"]
    assert json.loads((Path(completed["run_dir"]) / "config.json").read_text())["head"]["kind"] == "multilabel"
    with open(Path(completed["run_dir"]) / "history.csv", newline="") as fh:
        history = [float(r["val_auc"]) for r in csv.DictReader(fh)]
    assert float(completed["best_val_auc"]) == pytest.approx(max(history)) and 0 <= max(history) <= 1
