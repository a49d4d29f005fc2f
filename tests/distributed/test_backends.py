"""distributed.train --backend tf against Horovod, with real processes: tf.distribute workers on localhost
ports (launch.local --backend tf, and Ray Train through launch.ray) and Horovod workers (horovodrun), on the
same prepared data, seed and global batch. (tf.distribute's two workers from scratch against Horovod's:
tests/distributed/test_train.py, test_cached_features_train_the_same_head.)"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PYTHON, REPO
from tests.training_fixtures import quiet, run_train

# What "the same curve" means: both backends compute the same steps on the same batches; only the order in
# which the two workers' gradients are summed differs (Horovod's Gloo allreduce against TensorFlow's ring
# all-reduce), a float32 rounding of about 1e-7 relative per step that grows over the steps of a short run.
LOSS_RTOL = 1e-4
COMMON = ["--model", "cnn", "--batch-size", "16", "--seed", "3", "--early-stopping-patience", "50"]


def history(run: Path) -> list[dict[str, float]]:
    with open(run / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def launch(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for key in ("loss", "val_loss", "lr"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=LOSS_RTOL, err_msg=key)
    np.testing.assert_allclose([r["val_auc"] for r in a], [r["val_auc"] for r in b], atol=1e-6)


def predict_val(run: Path, data: Path) -> np.ndarray:
    from distributed.model.kerasenv import keras
    from preprocessing import schema

    model = keras.models.load_model(str(run / "model"), compile=False)
    images = np.stack([image for image, _ in schema.dataset(data, "val").as_numpy_iterator()])
    return model.predict(images, verbose=0)


@pytest.mark.slow
def test_a_killed_tf_run_resumes_on_two_workers_under_ray_train_and_horovod_to_one_end(prepared32_fullbatch,
                                                                                       tmp_path):
    """A one-worker tf.distribute run killed after its first epoch's checkpoint, resumed on two workers by Ray
    Train (launch.ray, tf.distribute) and, from a copy of the same run folder, by horovodrun: both train the
    same curve from the same checkpoint and export the same model (tf.distribute and Horovod agree, and a
    checkpoint either wrote is one run). The run's record says who trained it."""
    data, run = prepared32_fullbatch, tmp_path / "run"
    args = ["--data", str(data), "--epochs", "3", *COMMON, "--output", str(run)]
    proc = subprocess.Popen([PYTHON, "-m", "launch.local", "--backend", "tf", "--np", "1", "--",
                             "distributed.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    latest = run / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its worker
    proc.wait()
    state = json.loads(latest.read_text())
    assert state["epoch"] == 1 and not (run / "model").exists(), "the run was not killed after its first epoch"
    from cxrscale.errors import CxrError
    from distributed.training import run_record

    with pytest.raises(CxrError, match="--resume"):  # without --resume an existing run is not overwritten
        run_record.check_run_dir(run, resume=False)
    shutil.copytree(run, tmp_path / "copy")

    on_ray = launch("launch.ray", "--np", "2", "--", "distributed.train", *args, "--resume")
    assert on_ray.returncode == 0, quiet(on_ray.stderr)[-3000:]
    on_horovod = run_train(*args[:-1], str(tmp_path / "copy"), "--resume", np_=2)
    assert on_horovod.returncode == 0, quiet(on_horovod.stderr)

    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [int(r["workers"]) for r in rows] == [1, 2, 2]
    same_curve(rows, history(tmp_path / "copy"))
    for folder, backend in ((run, "tf"), (tmp_path / "copy", "horovod")):
        config = json.loads((folder / "config.json").read_text())
        assert config["resumed"][0]["after_epoch"] == 1 and config["resumed"][0]["workers"] == 2
        assert config["resumed"][0]["restored_weights_checksum"] == state["weights_checksum"]
        assert config["config"]["backend"] == "tf"  # as the run was started; this session's, in resolved:
        assert config["resolved"]["backend"] == config["resumed"][0]["backend"] == backend
        assert config["resolved"]["global_batch"] == 32
        summary = json.loads((folder / "train_summary.json").read_text())
        assert summary["backend"] == backend and summary["epochs_this_session"] == 2 and summary["ranks_in_sync"]
    assert json.loads((run / "config.json").read_text())["resolved"]["controller"] == "tf.distribute (ring)"
    # every worker took part in each checkpoint, but only the chief's is in the run folder
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        sorted(p.name for p in (tmp_path / "copy" / "checkpoints").iterdir())
    # the exported, calibrated models score alike: evaluate, predict and export cannot tell them apart
    np.testing.assert_allclose(predict_val(run, data), predict_val(tmp_path / "copy", data), atol=1e-3)


def test_what_stays_horovod_only_is_refused_by_name(prepared32_fullbatch, tmp_path):
    from cxrscale.errors import CxrError
    from distributed.training.config import parse_config

    with pytest.raises(CxrError, match="--elastic is Horovod's"):
        parse_config(["--data", str(prepared32_fullbatch), "--backend", "tf", "--elastic"])
    refused = launch("launch.local", "--backend", "tf", "--np", "2", "-H", "node1:1,node2:1", "--",
                     "distributed.train", "--data", str(prepared32_fullbatch))
    assert refused.returncode == 2 and "started by a scheduler" in refused.stderr, refused.stderr
    elastic = launch("launch.local", "--backend", "tf", "--np", "2", "--min-np", "1", "--",
                     "distributed.train", "--data", str(prepared32_fullbatch))
    assert elastic.returncode == 2 and "--min-np" in elastic.stderr.splitlines()[-1]
    dry = launch("launch.local", "--backend", "tf", "--np", "2", "--dry-run", "--", "distributed.train", "--data",
                 str(prepared32_fullbatch))
    assert dry.returncode == 0, dry.stderr
    configs = [json.loads(line.split("'")[1]) for line in dry.stdout.splitlines() if line.startswith("TF_CONFIG=")]
    assert [c["task"]["index"] for c in configs] == [0, 1]
    assert len({tuple(c["cluster"]["worker"]) for c in configs}) == 1  # one cluster, both workers in it
    assert all(line.endswith("--backend tf") for line in dry.stdout.splitlines() if line.startswith("TF_CONFIG="))
