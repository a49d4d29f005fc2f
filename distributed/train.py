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
from distributed.training import callbacks as cb, hvd_utils, run_record
from distributed.training.config import TrainConfig, parse_config
from distributed.training.data import (DataPlan, balanced_class_weights, ordered_dataset, plan_data, sample_images,
                                       train_dataset, val_dataset)
from distributed.training.features import cached_train_dataset, compute_features, split_at_head
from launch.runtime import CxrError, read_numeric_csv, run_cli, setup_logging

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

    data_dir, run_dir = Path(config.data), config.resolved_output()
    plan = plan_data(data_dir, rank, size, config.batch_size, config.model)
    check_plan(config, plan, hvd)
    state = hvd_utils.agree(hvd, lambda: run_record.check_run_dir(run_dir, config.resume))
    initial_epoch = int(state["epoch"]) if state else 0
    if rank == 0:
        log.info("%d worker(s) on %s, %s, %s at %dx%d px, %d train / %d val images, %d steps per epoch of %d x %d",
                 size, "GPU" if gpus else "CPU", policy, config.model, *plan.image_shape[:2], plan.train_count,
                 plan.val_count, plan.steps_per_epoch, size, config.batch_size)

    keras.utils.set_random_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config.model, plan.image_shape[0], len(plan.classes), weights=config.resolved_weights(),
                        seed=config.seed, **config.model_options())
    binary = model.output_shape[-1] == 1
    # Horovod: the rate scales with the workers (their batches add up), reached by a warm-up from one's rate
    scaled_lr = config.lr * size
    warm = config.warmup_epochs > 0 and (size > 1 or config.schedule == "cosine")
    optimizer = keras.optimizers.Adam(learning_rate=config.lr if warm else scaled_lr)
    if size > 1:  # Horovod: average the gradients (on one worker it would only copy them through its buffers)
        optimizer = hvd.DistributedOptimizer(optimizer)
    if policy == "mixed_float16":
        # Outside the Horovod optimizer: gradients are allreduced while still scaled, then unscaled and
        # checked for inf/NaN identically on every rank, so all ranks skip or apply the same steps.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)

    fit_model, ds_train, ds_val = datasets(config, plan, model, seed=config.seed + 1000 * initial_epoch + rank,
                                           rank=rank, size=size)
    loss = loss_for(model, config.label_smoothing)
    accuracy = keras.metrics.BinaryAccuracy(name="accuracy") if binary else \
        keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    fit_model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy], jit_compile=config.xla)

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    restored = resume(checkpoint, model, state, run_dir, config.seed, hvd) if state else None
    # Killed after its last epoch but before the summary: only calibration and export are left to do.
    finishing = initial_epoch >= config.epochs and not (state or {}).get("finished")
    if initial_epoch >= config.epochs and not finishing:
        raise CxrError(f"{run_dir} has already trained {initial_epoch} epochs; raise --epochs to train more")
    if rank == 0:
        run_record.write_run_record(run_dir, config, plan, model, policy=policy, workers=size, gpus=gpus,
                                    scaled_lr=scaled_lr, loss=loss, state=state, restored=restored)

    callbacks = training_callbacks(config, plan, model, ds_val, run_dir, checkpoint, state, hvd)
    started, epochs_run = time.perf_counter(), 0
    if finishing:
        if rank == 0:
            log.info("%s trained all %d epochs before it stopped; finishing its calibration and export",
                     run_dir, initial_epoch)
    else:
        history = fit_model.fit(
            ds_train, steps_per_epoch=plan.steps_per_epoch, epochs=config.epochs, initial_epoch=initial_epoch,
            callbacks=callbacks, verbose=(1 if sys.stderr.isatty() else 2) if rank == 0 else 0,
            class_weight=balanced_class_weights(plan.class_counts) if config.class_weights == "auto" else None)
        epochs_run = len(history.epoch)
    seconds = time.perf_counter() - started

    checksums = hvd_utils.gather(hvd, cb.weight_checksum(model), name="weight_checksums")
    if rank != 0:
        return {}
    return run_record.finish_run(run_dir, config, plan, model, epochs_run=epochs_run, seconds=seconds,
                                 checksums=checksums)


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


def training_callbacks(config: TrainConfig, plan: DataPlan, model, ds_val, run_dir: Path, checkpoint,
                       state: dict | None, hvd) -> list:
    """Every rank's callbacks, in the order they must run at an epoch's end."""
    rank, size = hvd.rank(), hvd.size()
    initial_epoch = int(state["epoch"]) if state else 0
    scaled_lr = config.lr * size
    callbacks: list = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # Horovod: rank 0's initial weights
                       hvd.callbacks.MetricAverageCallback()]  # Horovod: train metrics averaged over ranks
    averaging = cb.WeightAverage(config.ema) if config.ema else None
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
        callbacks += [cb.HistoryWriter(run_dir / "history.csv", plan.steps_per_epoch * config.batch_size * size,
                                       read_numeric_csv(run_dir / "history.csv")),
                      cb.Checkpointer(run_dir, checkpoint, model, config.seed,
                                      best_value=float(state["best"]) if state else -float("inf")),
                      keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), update_freq="epoch",
                                                  profile_batch=0)]
    if averaging:
        callbacks.append(averaging.restore_callback())  # last: training goes on from the raw weights
    return callbacks


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_config(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
