"""python -m distributed.train: data-parallel training of a chest X-ray classifier with Horovod.

    horovodrun -np 4 python -m distributed.train --data prepared/kermany --model resnet50

Without horovodrun it trains on one worker. `train()` reads as Horovod's Keras example does: init, pin a
device, scale the learning rate (with a warm-up), wrap the optimizer, broadcast from rank 0, average
metrics, and let rank 0 alone write checkpoints, history and the exported model. The pieces live in
`distributed.training`: the config, the input pipelines, the callbacks, the Horovod helpers (hvd_utils)
and what a run leaves on disk (run_record).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from distributed.model.kerasenv import hvd_keras, keras  # first: chooses tf_keras before TensorFlow loads

import numpy as np
import tensorflow as tf

from distributed.model.builders import build_model, loss_for
from distributed.training import callbacks as cb, elastic, hvd_utils, run_record
from distributed.training.config import TrainConfig, parse_config
from distributed.training.data import (DataPlan, balanced_class_weights, ordered_dataset, plan_data, sample_images,
                                       train_dataset, val_dataset)
from distributed.training.features import cached_train_dataset, compute_features, split_at_head
from cxrscale import tracking
from cxrscale.errors import CxrError
from cxrscale.cli import run_cli
from cxrscale.console import setup_logging
from cxrscale.files import read_json, read_numeric_csv
from preprocessing import schema

log = logging.getLogger("cxrscale.train")


def train(config: TrainConfig) -> dict[str, Any]:
    """Train on this process's Horovod rank; returns the run summary (rank 0; {} on the others)."""
    hvd = hvd_keras()
    hvd.init()  # Horovod: one process per device, ranks 0..size-1
    rank, size = hvd.rank(), hvd.size()
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    gpus = hvd_utils.configure_devices(hvd.local_rank(), hvd.local_size())  # Horovod: pin one GPU per process
    policy = hvd_utils.resolve_precision(config.precision, gpus)
    keras.mixed_precision.set_global_policy(policy)
    if config.elastic:
        return train_elastic(config, hvd, gpus, policy)

    run_dir = config.resolved_output()
    plan = checked_plan(config, rank, size, hvd)
    state = hvd_utils.agree(hvd, lambda: run_record.check_run_dir(run_dir, config.resume))
    initial_epoch = int(state["epoch"]) if state else 0
    log_start(config, plan, size, gpus, policy)
    model, optimizer, scaled_lr = build_for_training(config, plan, hvd, policy)
    fit_model, ds_train, ds_val = datasets(config, plan, model, seed=config.seed + 1000 * initial_epoch + rank,
                                           rank=rank, size=size)
    loss = compile_model(fit_model, model, optimizer, config)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    restored = resume(checkpoint, model, state, run_dir, config.seed, hvd) if state else None
    finishing = check_epochs(config, state, run_dir)
    if rank == 0:
        run_record.write_run_record(run_dir, config, plan, model, policy=policy, workers=size, gpus=gpus,
                                    scaled_lr=scaled_lr, loss=loss, state=state, restored=restored)

    averaging = cb.WeightAverage(config.ema) if config.ema else None
    callbacks = training_callbacks(config, plan, model, ds_val, run_dir, checkpoint, hvd, initial_epoch=initial_epoch,
                                   best=float(state["best"]) if state else -float("inf"), averaging=averaging)
    started, epochs_run = time.perf_counter(), 0
    if not finishing:
        epochs_run = len(fit_model.fit(ds_train, initial_epoch=initial_epoch, callbacks=callbacks,
                                       **fit_options(config, plan, rank)).epoch)
    seconds = time.perf_counter() - started

    checksums = hvd_utils.gather(hvd, cb.weight_checksum(model), name="weight_checksums")
    if rank != 0:
        return {}
    summary = run_record.finish_run(run_dir, config, plan, model, epochs_run=epochs_run, seconds=seconds,
                                    checksums=checksums)
    finish_tracking(config, run_dir, summary)
    return summary


def train_elastic(config: TrainConfig, hvd, gpus: list, policy: str) -> dict[str, Any]:
    """`train` under Horovod elastic (distributed.training.elastic). A worker that joins a running job
    starts here too, so nothing before `elastic.run` may call a collective: the checks and the resume that
    need one run in the first session, which only the workers the job started with go through."""
    run_dir = config.resolved_output()
    plan = plan_data(Path(config.data), hvd.rank(), hvd.size(), config.batch_size, config.model)
    model, optimizer, scaled_lr = build_for_training(config, plan, hvd, policy)
    loss = compile_model(model, model, optimizer, config)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    averaging = cb.WeightAverage(config.ema) if config.ema else None

    def open_run(session_plan: DataPlan) -> tuple[int, float, bool]:
        """The first session, on every starting worker: (epoch to start from, best value so far, only the
        export left)."""
        hvd_utils.agree(hvd, lambda: schema.verify_shards(config.data))
        state = hvd_utils.agree(hvd, lambda: run_record.check_run_dir(run_dir, config.resume))
        restored = resume(checkpoint, model, state, run_dir, config.seed, hvd) if state else None
        finishing = check_epochs(config, state, run_dir)
        log_start(config, session_plan, hvd.size(), gpus, policy)
        if hvd.rank() == 0:
            run_record.write_run_record(run_dir, config, session_plan, model, policy=policy, workers=hvd.size(),
                                        gpus=gpus, scaled_lr=scaled_lr, loss=loss, state=state, restored=restored)
        epoch = int(state["epoch"]) if state else 0
        return epoch, float(state["best"]) if state else -float("inf"), finishing

    session = elastic.Session(
        open_run=open_run,
        plan=lambda rank, size: checked_plan(config, rank, size, hvd, verify=False),
        datasets=lambda p, seed, rank, size: datasets(config, p, model, seed=seed, rank=rank, size=size)[1:],
        callbacks=lambda p, ds, epoch, best: training_callbacks(config, p, model, ds, run_dir, checkpoint, hvd,
                                                                initial_epoch=epoch, best=best, averaging=averaging,
                                                                broadcast=False),
        fit=lambda ds, p, callbacks, epoch: model.fit(ds, initial_epoch=epoch, callbacks=callbacks,
                                                      **fit_options(config, p, hvd.rank())))
    started = time.perf_counter()
    record = elastic.run(hvd, model, optimizer, session, averaging=averaging, epochs=config.epochs,
                         base_lr=config.lr, warmup_epochs=config.warmup_epochs, seed=config.seed,
                         batch_size=config.batch_size, commit_every=config.commit_every)
    seconds = time.perf_counter() - started
    if hvd.rank() != 0:  # the ranks after the last reset
        return {}
    plan = plan_data(Path(config.data), 0, len(record["checksums"]), config.batch_size, config.model)
    summary = run_record.finish_run(run_dir, config, plan, model, epochs_run=record["epochs"], seconds=seconds,
                                    checksums=record["checksums"], elastic=record)
    finish_tracking(config, run_dir, summary)
    return summary


def run_tracker(config: TrainConfig, run_dir: Path) -> tracking.Tracker:
    """Rank 0's MLflow run for this training run (disabled without --tracking-uri): created with the resolved
    config of RUN/config.json as params, or reopened from RUN/tracking.json on resume."""
    def params() -> dict[str, Any]:
        record = read_json(run_dir / "config.json", "run record")
        return {"config": record["config"], "resolved": record["resolved"]}
    return tracking.run_tracker(config.tracking_uri, config.experiment, run_dir,
                                manifest=Path(config.data) / schema.MANIFEST, params=params)


def finish_tracking(config: TrainConfig, run_dir: Path, summary: dict[str, Any]) -> None:
    """The summary's numbers, and the exported model and run records as artifacts; the MLflow run ends."""
    tracker = run_tracker(config, run_dir)
    totals = {"best_val_auc": summary["best_val_auc"], "best_epoch": summary["best_epoch"],
              "epochs_completed": summary["epochs_completed"], "total_seconds": summary["seconds"],
              "train_images_per_second": summary["train_images_per_second"]}
    tracker.log_metrics(totals, step=int(summary["epochs_completed"]))
    tracker.log_artifacts([run_dir / "model"])
    tracker.log_artifacts([run_dir / name for name in ("config.json", "history.csv", "calibration.json",
                                                       "train_summary.json", "dataset_manifest.json")], "run")
    tracker.end("FINISHED")


def log_start(config: TrainConfig, plan: DataPlan, size: int, gpus: list, policy: str) -> None:
    log.info("%d worker(s) on %s, %s, %s at %dx%d px, %d train / %d val images, %d steps per epoch of %d x %d%s",
             size, "GPU" if gpus else "CPU", policy, config.model, *plan.image_shape[:2], plan.train_count,
             plan.val_count, plan.steps_per_epoch, size, config.batch_size, ", elastic" if config.elastic else "")


def build_for_training(config: TrainConfig, plan: DataPlan, hvd, policy: str):
    """(the model with identical initial weights on every rank, its optimizer, the scaled learning rate)."""
    size = hvd.size()
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.model, plan.image_shape[0], len(plan.classes), weights=config.resolved_weights(),
                        seed=config.seed, **config.model_options())
    # Horovod: the rate scales with the workers (their batches add up), reached by a warm-up from one's rate
    scaled_lr = config.lr * size
    warm = config.warmup_epochs > 0 and (size > 1 or config.schedule == "cosine")
    optimizer = keras.optimizers.Adam(learning_rate=config.lr if warm else scaled_lr)
    if size > 1 or config.elastic:  # Horovod: average the gradients (one fixed worker has nothing to average)
        optimizer = hvd.DistributedOptimizer(optimizer)
    if policy == "mixed_float16":
        # Outside the Horovod optimizer: gradients are allreduced while still scaled, then unscaled and
        # checked for inf/NaN identically on every rank, so all ranks skip or apply the same steps.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    return model, optimizer, scaled_lr


def compile_model(fit_model, model, optimizer, config: TrainConfig):
    """Compile what is fitted (the model, or its head on cached features); returns the loss."""
    loss = loss_for(model, config.label_smoothing)
    accuracy = keras.metrics.BinaryAccuracy(name="accuracy") if model.output_shape[-1] == 1 else \
        keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    fit_model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy], jit_compile=config.xla)
    return loss


def check_epochs(config: TrainConfig, state: dict | None, run_dir: Path) -> bool:
    """Whether only the calibration and export are left (killed after its last epoch, before the summary);
    refuses a finished run that --epochs does not extend."""
    epoch = int(state["epoch"]) if state else 0
    finishing = epoch >= config.epochs and not (state or {}).get("finished")
    if epoch >= config.epochs and not finishing:
        raise CxrError(f"{run_dir} has already trained {epoch} epochs; raise --epochs to train more")
    if finishing:
        log.info("%s trained all %d epochs before it stopped; finishing its calibration and export", run_dir, epoch)
    return finishing


def checked_plan(config: TrainConfig, rank: int, size: int, hvd, verify: bool = True) -> DataPlan:
    """This worker's share of the data for `size` workers, refused on every rank at once when the data make
    the run impossible; `verify`: the shards checked against the manifest's sha256 first (rank 0)."""
    if verify:
        hvd_utils.agree(hvd, lambda: schema.verify_shards(config.data))
    plan = plan_data(Path(config.data), rank, size, config.batch_size, config.model)
    check_plan(config, plan, hvd)
    return plan


def fit_options(config: TrainConfig, plan: DataPlan, rank: int) -> dict[str, Any]:
    return dict(steps_per_epoch=plan.steps_per_epoch, epochs=config.epochs,
                verbose=(1 if sys.stderr.isatty() else 2) if rank == 0 else 0,
                class_weight=balanced_class_weights(plan.class_counts) if config.class_weights == "auto" else None)


def check_plan(config: TrainConfig, plan: DataPlan, hvd) -> None:
    """Refuse, on every rank at once, what the data makes impossible."""
    steps = hvd_utils.gather(hvd, plan.steps_per_epoch, name="steps_per_epoch")
    if len(set(steps)) != 1:
        raise CxrError(f"workers disagree on steps per epoch ({steps}): their data folders differ")
    if config.calibration in ("platt", "isotonic") and len(plan.classes) > 2:  # "auto" adapts
        raise CxrError(f"--calibration {config.calibration} is for two classes; {config.data} has "
                       f"{len(plan.classes)} (use --calibration temperature)")


def datasets(config: TrainConfig, plan: DataPlan, model, *, seed: int, rank: int, size: int):
    """(the model to fit, its train dataset, its validation dataset). With --cache-features the frozen
    backbone's output is computed once per image and the head (sharing the full model's layers) is what
    fits; the full model is still what gets checkpointed and exported."""
    binary = model.output_shape[-1] == 1
    ds_val = val_dataset(config.data, plan, config.batch_size, rank, size)
    if not config.cache_features:
        return model, train_dataset(config.data, plan, config.batch_size, seed=seed,
                                    shuffle_buffer=config.shuffle_buffer, augment=config.augment,
                                    binary_labels=binary), ds_val

    extractor, head = split_at_head(model)
    started = time.perf_counter()
    feats, labels = compute_features(extractor, ordered_dataset(plan.train_files, plan, config.batch_size, binary))
    val_feats, val_labels = compute_features(extractor, ds_val)
    if rank == 0:
        log.info("cached backbone features %s of %d train + %d val images in %.1f s", feats.shape[1:], len(feats),
                 len(val_feats), time.perf_counter() - started)
    return head, cached_train_dataset(feats, labels, config.batch_size, seed), \
        tf.data.Dataset.from_tensor_slices((val_feats, val_labels)).batch(config.batch_size)


def resume(checkpoint: tf.train.Checkpoint, model, state: dict, run_dir: Path, seed: int, hvd) -> str:
    """Restore the last checkpoint on every rank (rank 0's copy for ranks that cannot read it) and reseed
    so that the resumed run continues deterministically; returns the restored weights' checksum."""
    epoch = int(state["epoch"])
    run_record.restore(checkpoint, state, run_dir)
    hvd_utils.broadcast_from_rank0(hvd, model.variables)
    keras.utils.set_random_seed(seed + epoch)
    restored = cb.weight_checksum(model)
    if hvd.rank() == 0:
        log.info("resuming after epoch %d from %s (weights %s)", epoch, run_dir / "checkpoints" / state["checkpoint"],
                 restored)
        if restored != state.get("weights_checksum"):
            log.warning("restored weights differ from the checkpoint's record (%s)", state.get("weights_checksum"))
    return restored


def training_callbacks(config: TrainConfig, plan: DataPlan, model, ds_val, run_dir: Path, checkpoint, hvd, *,
                       initial_epoch: int, best: float, averaging: cb.WeightAverage | None,
                       broadcast: bool = True) -> list:
    """Every rank's callbacks, in the order they must run at an epoch's end (`broadcast`: rank 0's initial
    weights; an elastic state broadcasts them itself)."""
    rank, size = hvd.rank(), hvd.size()
    scaled_lr = config.lr * size
    callbacks: list = [hvd.callbacks.BroadcastGlobalVariablesCallback(0)] if broadcast else []
    callbacks.append(hvd.callbacks.MetricAverageCallback())  # Horovod: train metrics averaged over ranks
    if averaging:
        callbacks.append(averaging)  # before the BN statistics, validation and checkpoints: they see the average
    bn_images = None
    if config.bn_samples and not config.cache_features and any(
            isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in model.layers):
        bn_images = sample_images(plan.train_files, plan.image_shape, -(-config.bn_samples // size), config.seed)
    if bn_images is not None or size > 1:
        callbacks.append(cb.BatchNormStatistics(model, bn_images, hvd_utils.rank_average(hvd)))
    val_labels = np.concatenate([y for _, y in ds_val.as_numpy_iterator()])
    callbacks.append(cb.ExactValidation(ds_val, val_labels, lambda obj: hvd_utils.gather(hvd, obj),
                                        len(plan.classes)))
    if config.schedule == "cosine":
        # one worker has no rate to ramp up to; its warm-up starts from a tenth of the rate instead
        callbacks.append(cb.CosineLearningRate(config.lr if size > 1 else 0.1 * scaled_lr, scaled_lr,
                                               config.warmup_epochs, config.epochs, plan.steps_per_epoch,
                                               initial_epoch))
    else:
        if size > 1 and config.warmup_epochs > 0:
            callbacks.append(cb.WarmupLearningRate(config.lr, scaled_lr, config.warmup_epochs, plan.steps_per_epoch,
                                                   initial_epoch))
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.5,
                                                           patience=config.reduce_lr_patience,
                                                           min_lr=config.lr * 1e-3, verbose=1 if rank == 0 else 0))
    callbacks.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                                   patience=config.early_stopping_patience))
    if rank == 0:  # Horovod: one writer. The history row before the checkpoint: a run killed between
        # the two redoes the epoch and rewrites its row, instead of resuming past an epoch with no row
        history = cb.HistoryWriter(run_dir / "history.csv", config.batch_size * size, size,
                                   read_numeric_csv(run_dir / "history.csv"))
        callbacks.append(history)
        if config.tracking_uri:
            callbacks.append(cb.EpochTracker(history, run_tracker(config, run_dir)))
        callbacks += [cb.Checkpointer(run_dir, checkpoint, model, config.seed, best_value=best),
                      keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), update_freq="epoch",
                                                  profile_batch=0)]
    if averaging:
        callbacks.append(averaging.restore_callback())  # last: training goes on from the raw weights
    return callbacks


def main(argv: Sequence[str] | None = None) -> int:
    try:
        train(parse_config(argv))
    except BaseException:
        tracking.end_open("FAILED")  # a resumed run sets its MLflow run running again
        raise
    return 0


if __name__ == "__main__":
    run_cli(main)
