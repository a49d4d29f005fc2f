"""python -m distributed.train: data-parallel training of a chest X-ray classifier with Horovod.

    horovodrun -np 4 python -m distributed.train --data prepared/kermany --model resnet50

Without horovodrun it trains on one worker. The flow follows Horovod's Keras example: init, pin a device,
scale the learning rate (with a warm-up), wrap the optimizer, broadcast from rank 0, average metrics,
and let rank 0 alone write checkpoints, history and the exported model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from distributed.kerasenv import hvd_keras, keras  # first: chooses tf_keras before TensorFlow loads

import numpy as np
import tensorflow as tf

from distributed import callbacks as cb
from distributed.calibration import fit_on_validation
from distributed.config import TrainConfig, parse_config
from distributed.data import (balanced_class_weights, ordered_dataset, plan_data, sample_images, train_dataset,
                              val_dataset)
from preprocessing import schema
from preprocessing.runtime import (CxrError, USER_ERROR_EXIT, git_commit, library_versions, read_numeric_csv,
                                   setup_logging, sha256_file, write_json_atomic)

log = logging.getLogger("cxrscale.train")


def launcher_rank() -> int:
    """This process's rank as the launcher set it, readable before Horovod is initialised."""
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def cpu_threads_per_worker(local_size: int) -> int:
    """OMP_NUM_THREADS when the launcher set it (Ray does, for the CPUs it gave a task; optimize.tune does,
    for each trial's workers), else this machine's cores shared between the local workers."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, (os.cpu_count() or 1) // max(1, local_size))


def configure_devices(local_rank: int, local_size: int) -> list:
    """Pin one GPU per local rank; on CPU give each local worker its share of the cores, so that
    `-np 2` on 2 cores does not run 2 x 2 threads. Must run before TensorFlow executes anything."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")
    else:
        threads = cpu_threads_per_worker(local_size)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    return gpus


def resolve_precision(precision: str, gpus: list) -> str:
    """Keras dtype policy name: 'auto' is mixed_float16 on GPUs (tensor cores) and float32 on CPU, where
    float16 kernels are slow or missing."""
    if precision == "auto":
        return "mixed_float16" if gpus else "float32"
    return "float32" if precision == "fp32" else precision


def agree(hvd, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and give its result (or its CxrError) to every rank, so that a check made on
    rank 0's file system stops all ranks together instead of leaving the others waiting forever."""
    import horovod.tensorflow as hvd_tf

    result: Any = None
    if hvd.rank() == 0:
        try:
            result = ("ok", fn())
        except CxrError as err:
            result = ("error", str(err))
    if hvd.size() > 1:
        result = hvd_tf.broadcast_object(result, root_rank=0, name=f"agree.{fn.__name__}")
    if result[0] == "error":
        raise CxrError(result[1])
    return result[1]


def run_metadata(data_dir: Path) -> dict[str, Any]:
    return {"libraries": library_versions(("tensorflow", "tf-keras", "horovod", "numpy", "cxrscale")),
            "git_commit": git_commit(), "manifest_sha256": sha256_file(data_dir / schema.MANIFEST)}


def check_run_dir(run_dir: Path, resume: bool) -> dict | None:
    """Rank 0: the last checkpoint's state when resuming; refuse to train over an existing run otherwise."""
    state = cb.read_latest(run_dir)
    if resume:
        if state is None:
            raise CxrError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        return {**state, "finished": (run_dir / "train_summary.json").exists()}
    if state is not None or (run_dir / "model").exists():
        raise CxrError(f"{run_dir} already holds a training run: pass --resume to continue it, or choose "
                       "another --output")
    return None


def export_model(config: TrainConfig, plan, weights: list[np.ndarray], target: Path, calibration=None) -> None:
    """Save the model with `weights` as a float32 SavedModel (portable: float16 kernels are missing on
    many CPUs), built fresh so that no optimizer or Horovod wrapper is saved with it, ending in the
    `calibration` layers (distributed.calibration) when given."""
    from distributed.calibration import calibrated_model
    from distributed.models import build_model

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        model = build_model(config.model, plan.image_shape[0], len(plan.classes), weights="none",
                            **model_options(config))
        model.set_weights(weights)
        if calibration is not None:
            model = calibrated_model(model, calibration)
        tmp = target.parent / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def model_options(config: TrainConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"l2": config.l2, "freeze_base": config.freeze_base,
                               "fine_tune_from": config.fine_tune_from}
    if config.dropout is not None:
        options["dropout"] = config.dropout
    if config.model == "cnn":
        options.pop("freeze_base")
        options.pop("fine_tune_from")
    return options


def train(config: TrainConfig) -> dict[str, Any]:
    """Train on this process's Horovod rank; returns the run summary (the same on every rank)."""
    import horovod.tensorflow as hvd_tf

    from distributed.models import build_model, loss_for, min_image_size

    hvd = hvd_keras()
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    gpus = configure_devices(hvd.local_rank(), hvd.local_size())
    policy = resolve_precision(config.precision, gpus)
    keras.mixed_precision.set_global_policy(policy)

    data_dir, run_dir = Path(config.data), config.resolved_output()
    plan = plan_data(data_dir, rank, size, config.batch_size, min_image_size(config.model), config.model)
    all_steps = hvd_tf.allgather_object(plan.steps_per_epoch, name="steps_per_epoch") if size > 1 else [
        plan.steps_per_epoch]
    if len(set(all_steps)) != 1:
        raise CxrError(f"workers disagree on steps per epoch ({all_steps}): their data folders differ")
    if config.calibration in ("platt", "isotonic") and len(plan.classes) > 2:  # "auto" adapts
        raise CxrError(f"--calibration {config.calibration} is for two classes; {data_dir} has {len(plan.classes)} "
                       "(use --calibration temperature)")
    state = agree(hvd, lambda: check_run_dir(run_dir, config.resume))
    initial_epoch = int(state["epoch"]) if state else 0
    if rank == 0:
        log.info("%d worker(s) on %s, %s, %s at %dx%d px, %d train / %d val images, %d steps per epoch of %d x %d",
                 size, "GPU" if gpus else "CPU", policy, config.model, plan.image_shape[0], plan.image_shape[1],
                 plan.train_count, plan.val_count, plan.steps_per_epoch, size, config.batch_size)

    keras.utils.set_random_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config.model, plan.image_shape[0], len(plan.classes), weights=config.resolved_weights(),
                        seed=config.seed, **model_options(config))
    binary = model.output_shape[-1] == 1
    scaled_lr = config.lr * size
    first_lr = config.lr if (config.warmup_epochs > 0 and (size > 1 or config.schedule == "cosine")) else scaled_lr
    optimizer = keras.optimizers.Adam(learning_rate=first_lr)
    if size > 1:  # on one worker it would only copy every gradient through Horovod's buffers (7 % on ResNet50)
        optimizer = hvd.DistributedOptimizer(optimizer)
    if policy == "mixed_float16":
        # Outside the Horovod optimizer: gradients are allreduced while still scaled, then unscaled and
        # checked for inf/NaN identically on every rank, so all ranks skip or apply the same steps.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    accuracy = keras.metrics.BinaryAccuracy(name="accuracy") if binary else \
        keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    ds_val = val_dataset(data_dir, plan, config.batch_size, rank, size)
    train_seed = config.seed + 1000 * initial_epoch + rank
    fit_model = model
    if config.cache_features:
        # The frozen backbone's output is computed once per image; the head (sharing the full model's
        # layers) then trains on it, and the full model is what gets checkpointed and exported.
        from distributed.features import cached_train_dataset, compute_features, split_at_head

        extractor, fit_model = split_at_head(model)
        started = time.perf_counter()
        feats, labels = compute_features(extractor, ordered_dataset(plan.train_files, plan, config.batch_size,
                                                                    binary))
        ds_train = cached_train_dataset(feats, labels, config.batch_size, train_seed)
        val_feats, val_labels = compute_features(extractor, ds_val)
        ds_val = tf.data.Dataset.from_tensor_slices((val_feats, val_labels)).batch(config.batch_size)
        if rank == 0:
            log.info("cached backbone features %s of %d train + %d val images in %.1f s", feats.shape[1:],
                     len(feats), len(val_feats), time.perf_counter() - started)
    else:
        ds_train = train_dataset(data_dir, plan, config.batch_size, seed=train_seed,
                                 shuffle_buffer=config.shuffle_buffer, augment=config.augment,
                                 binary_labels=binary)
    loss = loss_for(model, config.label_smoothing)
    fit_model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy], jit_compile=config.xla)

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    if state:
        path = run_dir / "checkpoints" / state["checkpoint"] / "ckpt"
        if Path(str(path) + ".index").exists():
            checkpoint.read(str(path)).expect_partial()
        if size > 1:
            hvd_tf.broadcast_variables(model.variables, root_rank=0)  # ranks that cannot read it get rank 0's
        keras.utils.set_random_seed(config.seed + initial_epoch)  # a resumed run continues deterministically
        restored = cb.weight_checksum(model)
        if rank == 0:
            log.info("resuming after epoch %d from %s (weights %s)", initial_epoch, path.parent, restored)
            if restored != state.get("weights_checksum"):
                log.warning("restored weights differ from the checkpoint's record (%s)", state.get("weights_checksum"))
    # Killed after its last epoch but before the summary: only calibration and export are left to do.
    finishing = initial_epoch >= config.epochs and not (state or {}).get("finished")
    if initial_epoch >= config.epochs and not finishing:
        raise CxrError(f"{run_dir} has already trained {initial_epoch} epochs; raise --epochs to train more")

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {"config": config.to_dict(), "resolved": {
            "output": str(run_dir), "weights": config.resolved_weights(), "precision": policy, "workers": size,
            "device": "GPU" if gpus else "CPU", "global_batch": config.batch_size * size,
            "scaled_lr": scaled_lr, "steps_per_epoch": plan.steps_per_epoch, "classes": plan.classes,
            "image_shape": list(plan.image_shape), "loss": getattr(loss, "name", None) or loss.__name__,
            "label_smoothing": config.label_smoothing,
            "output_units": int(model.output_shape[-1])}, **run_metadata(data_dir)}
        if state:
            previous = json.loads((run_dir / "config.json").read_text())
            meta["resumed"] = previous.get("resumed", []) + [{"after_epoch": initial_epoch, "workers": size,
                                                              "restored_weights_checksum": restored}]
            meta["config"] = {**previous["config"], "epochs": config.epochs, "resume": True}
        write_json_atomic(run_dir / "config.json", meta)
        shutil.copyfile(data_dir / schema.MANIFEST, run_dir / "dataset_manifest.json")

    val_labels = np.concatenate([y for _, y in ds_val.as_numpy_iterator()])

    callbacks: list = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                       hvd.callbacks.MetricAverageCallback()]
    averaging = cb.WeightAverage(config.ema) if config.ema else None
    if averaging:
        callbacks.append(averaging)  # before the BN statistics, validation and checkpoints: they see the average
    bn_images = None
    if config.bn_samples and not config.cache_features and any(
            isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in model.layers):
        bn_images = sample_images(plan.train_files, plan.image_shape, -(-config.bn_samples // size), config.seed)
    if bn_images is not None or size > 1:
        callbacks.append(cb.BatchNormStatistics(model, bn_images, (lambda var: hvd_tf.allreduce(
            var, op=hvd_tf.Average, name=var.name.replace(":", "_"))) if size > 1 else None))
    callbacks += [cb.ExactValidation(ds_val, val_labels, lambda obj: hvd_tf.allgather_object(obj) if size > 1
                                          else [obj], len(plan.classes))]
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
    if rank == 0:
        best = float(state["best"]) if state else -float("inf")
        callbacks += [cb.Checkpointer(run_dir, checkpoint, model, config.seed, best_value=best),
                      cb.HistoryWriter(run_dir / "history.csv", plan.steps_per_epoch * config.batch_size * size,
                                       read_numeric_csv(run_dir / "history.csv")),
                      keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), update_freq="epoch",
                                                  profile_batch=0)]
    if averaging:
        callbacks.append(averaging.restore_callback())  # last: training goes on from the raw weights
    class_weight = balanced_class_weights(plan.class_counts) if config.class_weights == "auto" else None

    started = time.perf_counter()
    epochs_run = 0
    if finishing:
        if rank == 0:
            log.info("%s trained all %d epochs before it stopped; finishing its calibration and export",
                     run_dir, initial_epoch)
    else:
        history = fit_model.fit(ds_train, steps_per_epoch=plan.steps_per_epoch, epochs=config.epochs,
                                initial_epoch=initial_epoch, callbacks=callbacks, class_weight=class_weight,
                                verbose=(1 if sys.stderr.isatty() else 2) if rank == 0 else 0)
        epochs_run = len(history.epoch)
    seconds = time.perf_counter() - started

    checksums = hvd_tf.allgather_object(cb.weight_checksum(model), name="weight_checksums") if size > 1 else [
        cb.weight_checksum(model)]
    summary: dict[str, Any] = {}
    if rank == 0:
        best_dir = run_dir / "checkpoints" / "best"
        if (best_dir / "state.json").exists():
            model.load_weights(str(best_dir / "weights")).expect_partial()
        calibration = fit_on_validation(model, data_dir, config.calibration, run_dir)  # RUN/calibration.json
        export_model(config, plan, model.get_weights(), run_dir / "model", calibration)
        rows = read_numeric_csv(run_dir / "history.csv")
        best_row = max(rows, key=lambda r: r.get("val_auc", -1) if r.get("val_auc") == r.get("val_auc") else -1)
        summary = {"epochs_completed": int(rows[-1]["epoch"]) if rows else initial_epoch,
                   "epochs_this_session": epochs_run, "best_epoch": int(best_row["epoch"]),
                   "best_val_auc": best_row.get("val_auc"), "seconds": seconds,
                   "train_images_per_second": epochs_run * plan.steps_per_epoch * config.batch_size * size
                   / max(seconds, 1e-9),
                   "weight_checksums_by_rank": checksums, "ranks_in_sync": len(set(checksums)) == 1}
        write_json_atomic(run_dir / "train_summary.json", summary)
        log.info("best val AUC %.4f at epoch %d; model exported to %s", summary["best_val_auc"],
                 summary["best_epoch"], run_dir / "model")
        if not summary["ranks_in_sync"]:
            log.error("workers ended with different weights (%s): a bug, please report it", checksums)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        train(config)
    except CxrError as err:
        if launcher_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
