"""What a training run leaves on disk, read and written by rank 0: the resume state, `config.json` (the
resolved config and its provenance), the exported model, and `train_summary.json`.

    RUN/config.json  checkpoints/  history.csv  logs/  calibration.json  model/  train_summary.json
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads

import numpy as np
import tensorflow as tf

from distributed.model.zoo import build_model
from distributed.model.calibration import calibrated_model, fit_on_validation
from distributed.model.heads import Head
from distributed.training import callbacks as cb
from distributed.training import hvd_utils
from distributed.training.config import TrainConfig
from distributed.training.data import DataPlan, balanced_class_weights, label_weights
from cxrscale.errors import CxrError
from cxrscale.files import atomic_dir, read_numeric_csv, sha256_file, write_json_atomic
from cxrscale.provenance import git_commit, library_versions
from preprocessing import schema

log = logging.getLogger("cxrscale.train")


def check_run_dir(run_dir: Path, resume: bool) -> dict | None:
    """The last checkpoint's state (plus whether the run had finished) when resuming; None for a new run.
    Refuses to train over an existing run without --resume."""
    state = cb.read_latest(run_dir)
    if resume:
        if state is None:
            raise CxrError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        return {**state, "finished": (run_dir / "train_summary.json").exists()}
    if state is not None or (run_dir / "model").exists():
        raise CxrError(f"{run_dir} already holds a training run: pass --resume to continue it, or choose "
                       "another --output")
    return None


def restore(checkpoint: tf.train.Checkpoint, state: dict, run_dir: Path) -> bool:
    """Read the checkpoint `state` names into `checkpoint`; False when this rank cannot see it."""
    path = run_dir / "checkpoints" / state["checkpoint"] / "ckpt"
    if not Path(str(path) + ".index").exists():
        return False
    checkpoint.read(str(path)).expect_partial()
    return True


def write_run_record(run_dir: Path, config: TrainConfig, plan: DataPlan, model, *, policy: str, workers: int,
                     gpus: list, scaled_lr: float, loss, state: dict | None, restored: str | None,
                     controller: str | None = None) -> None:
    """RUN/config.json (what was asked, what it resolved to, library versions, git commit, the dataset's
    manifest hash; on resume, the sessions so far) and a copy of the dataset's manifest."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(config.data)
    meta: dict[str, Any] = {
        "config": config.to_dict(),
        "resolved": {"output": str(run_dir), "weights": config.resolved_weights(), "precision": policy,
                     "workers": workers, "device": "GPU" if gpus else "CPU", "backend": config.backend,
                     "controller": controller or hvd_utils.controller(),
                     "global_batch": config.batch_size * workers, "scaled_lr": scaled_lr,
                     "steps_per_epoch": plan.steps_per_epoch, "classes": plan.classes,
                     "image_shape": list(plan.image_shape), "loss": getattr(loss, "name", None) or loss.__name__,
                     "label_smoothing": config.label_smoothing, "output_units": Head.of_model(model).units,
                     "train_class_counts": dict(zip(plan.classes, plan.class_counts)),
                     # the loss weight of each class index, as fit() gets them (None: unweighted); a
                     # multi-label run's (negative, positive) weight of each label, in its loss
                     **(_label_weight_record(config, plan) if plan.num_labels else {
                         "class_weights": balanced_class_weights(plan.class_counts)
                         if config.class_weights == "auto" else None})},
        "head": Head.of_model(model).to_dict(),
        "libraries": library_versions(("tensorflow", "tf-keras", "horovod", "numpy", "cxrscale")),
        "git_commit": git_commit(), "manifest_sha256": sha256_file(data_dir / schema.MANIFEST)}
    if state:
        previous = json.loads((run_dir / "config.json").read_text())
        meta["resumed"] = previous.get("resumed", []) + [{"after_epoch": int(state["epoch"]), "workers": workers,
                                                          "backend": config.backend,
                                                          "restored_weights_checksum": restored}]
        meta["config"] = {**previous["config"], "epochs": config.epochs, "resume": True}
    write_json_atomic(run_dir / "config.json", meta)
    shutil.copyfile(data_dir / schema.MANIFEST, run_dir / "dataset_manifest.json")


def _label_weight_record(config: TrainConfig, plan: DataPlan) -> dict[str, Any]:
    """A multi-label run's record: its labels' known train images, and their loss weights."""
    weights = label_weights(plan.class_counts, plan.label_known) if config.class_weights == "auto" else None
    return {"train_label_known": dict(zip(plan.classes, plan.label_known)),
            "label_weights": None if weights is None else {c: {"negative": w[0], "positive": w[1]}
                                                            for c, w in zip(plan.classes, weights)}}


def export_model(config: TrainConfig, plan: DataPlan, weights: list[np.ndarray], target: Path,
                 calibration=None) -> None:
    """Save the model with `weights` as a float32 SavedModel (portable: float16 kernels are missing on
    many CPUs), built fresh so that no optimizer or Horovod wrapper is saved with it, ending in the
    `calibration` layers (distributed.model.calibration) when given."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        model = build_model(config.model, plan.image_shape[0], len(plan.classes), weights="none",
                            multilabel=bool(plan.num_labels), **config.model_options())
        model.set_weights(weights)
        if calibration is not None:
            model = calibrated_model(model, calibration)
        with atomic_dir(target) as tmp:
            model.save(str(tmp))
    finally:
        keras.mixed_precision.set_global_policy(policy)


def finish_run(run_dir: Path, config: TrainConfig, plan: DataPlan, model, *, epochs_run: int, seconds: float,
               checksums: list[str], elastic: dict | None = None, backend: str = "horovod") -> dict[str, Any]:
    """After the last epoch: load the best checkpoint, fit the calibration on validation, export the model
    and write RUN/train_summary.json, which it returns (with `elastic`: its resets and sizes)."""
    best_dir = run_dir / "checkpoints" / "best"
    if (best_dir / "state.json").exists():
        model.load_weights(str(best_dir / "weights")).expect_partial()
    calibration = fit_on_validation(model, Path(config.data), config.calibration, run_dir)  # RUN/calibration.json
    export_model(config, plan, model.get_weights(), run_dir / "model", calibration)
    rows = read_numeric_csv(run_dir / "history.csv")
    best_row = max(rows, key=lambda r: r.get("val_auc", -1) if r.get("val_auc") == r.get("val_auc") else -1)
    workers = len(checksums)
    summary = {"backend": backend, "epochs_completed": int(rows[-1]["epoch"]), "epochs_this_session": epochs_run,
               "best_epoch": int(best_row["epoch"]), "best_val_auc": best_row.get("val_auc"), "seconds": seconds,
               "train_images_per_second": epochs_run * plan.steps_per_epoch * config.batch_size * workers
               / max(seconds, 1e-9),
               "weight_checksums_by_rank": checksums, "ranks_in_sync": len(set(checksums)) == 1}
    if elastic is not None:
        summary["elastic"] = {k: elastic[k] for k in ("resets", "workers_per_session", "reset_times")}
    write_json_atomic(run_dir / "train_summary.json", summary)
    log.info("best val AUC %.4f at epoch %d; model exported to %s", summary["best_val_auc"], summary["best_epoch"],
             run_dir / "model")
    if not summary["ranks_in_sync"]:
        log.error("workers ended with different weights (%s): a bug, please report it", checksums)
    return summary
