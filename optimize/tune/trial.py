"""One trial: a real `python -m distributed.train` run (under horovodrun for several workers) in its
own run folder, followed epoch by epoch and reported to Tune."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from launch.common import EntryPoint
from launch.local import horovodrun_command
from cxrscale.files import read_numeric_csv, write_json_atomic

log = logging.getLogger("cxrscale.tune")

# ---------------------------------------------------------------------------------------------------------
# One trial: a distributed.train run followed epoch by epoch
# ---------------------------------------------------------------------------------------------------------

def trial_command(config_file: Path, workers: int) -> list[str]:
    """The training command of a trial: the toolkit's own entry point, under horovodrun on this node for
    W > 1 (built by launch.local, as a user would start it)."""
    train = EntryPoint("distributed.train", ("--config", str(config_file)))
    if workers <= 1:
        return train.argv(sys.executable)
    return horovodrun_command(workers, [("localhost", workers)], train, python=sys.executable, gloo=True)


def die_with_parent():
    """A preexec_fn for a child that must get SIGTERM when the thread that started it dies: Ray kills a
    trial's actor when a scheduler stops the trial, and its training run must not outlive it. prctl is
    looked up here, in the parent: between fork and exec the child must not load libraries. None where
    there is no prctl (not Linux); run_trial's finally clause still stops the child there."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_trial(params: dict[str, Any], settings: dict[str, Any]) -> None:
    """Tune's function trainable. Trains `params` over `settings["base"]` with distributed.train in
    `settings["trials_dir"]/<trial id>/` and reports every finished epoch's history row to Tune."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(settings["trials_dir"]) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    reported = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            reported = int(json.loads((Path(folder) / "progress.json").read_text())["epoch"])

    finished = (run_dir / "train_summary.json").exists()
    proc = None
    if not finished:
        resume = (run_dir / "checkpoints" / "latest.json").exists()
        config = {**settings["base"], **params, "output": str(run_dir), "resume": resume}
        config_file = run_dir / "trial_config.json"
        write_json_atomic(config_file, config)
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=str(settings["threads_per_worker"]))
        with open(run_dir / "train.log", "ab") as out:
            proc = subprocess.Popen(trial_command(config_file, settings["workers"]), stdout=out,
                                    stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
    try:
        while True:
            code = None if proc is None else proc.poll()
            history = read_numeric_csv(run_dir / "history.csv")
            for row in history:
                epoch = int(row["epoch"])
                if epoch <= reported or (epoch >= settings["max_epochs"] and code is None and proc is not None):
                    # The last epoch is reported once the run has exported its model: ASHA stops a trial
                    # as soon as it reports max_t epochs, and that must not cut the export short.
                    continue
                with tempfile.TemporaryDirectory() as folder:
                    write_json_atomic(Path(folder) / "progress.json", {"epoch": epoch})
                    metrics = {k: v for k, v in row.items() if k != "epoch"}
                    seen = [r["val_auc"] for r in history
                            if int(r["epoch"]) <= epoch and r.get("val_auc") == r.get("val_auc")]
                    best = {"best_val_auc": max(seen)} if seen else {}  # what results.csv ranks by, and MLflow
                    tune.report({**metrics, **best, "epoch": epoch},
                                checkpoint=tune.Checkpoint.from_directory(folder))
                reported = epoch
            if proc is None or code is not None:
                break
            time.sleep(1.0)
    finally:
        if proc is not None:
            _stop(proc)
    if proc is not None and proc.returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"distributed.train exited with status {proc.returncode} in {run_dir}:\n"
                           + "\n".join(tail))
