"""One training run on this worker, as `distributed.train` opens it: the pieces that the fixed loop
(`distributed.train.train`) and the elastic loop (`distributed.training.elastic.run`) both use.

`open_run(config)` does, in Horovod's order, everything before the first collective: init (Horovod, or the
tf.distribute cluster: `backends`), pin a device, choose the precision, read the data's shape, build the
model with the same initial weights on every rank, scale the learning rate with the workers and wrap the
optimizer. Under Horovod nothing in it calls a collective, so a worker that joins an elastic job mid-way
opens the run the same way (tf.distribute's workers start together and fill the plain copy at the end). The
`TrainingRun` it returns then plans each worker's data for a size, starts the run folder (checks, resume,
records), builds the datasets and callbacks, fits, and finishes (calibration, export, summary).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads

import numpy as np
import tensorflow as tf

from cxrscale import tracking
from cxrscale.console import setup_logging
from cxrscale.errors import CxrError
from cxrscale.files import read_json, read_numeric_csv
from distributed.model.zoo import build_model
from distributed.model.heads import Head
from distributed.training import callbacks as cb, hvd_utils, run_record
from distributed.training.backends import open_backend
from distributed.training.config import TrainConfig
from distributed.training.data import (AugmentPolicy, DataPlan, balanced_class_weights, check_mixup, label_weights,
                                       ordered_dataset, plan_data, sample_images, train_dataset, val_dataset,
                                       with_class_weights)
from distributed.training.features import cached_train_dataset, compute_features, split_at_head
from preprocessing import schema

log = logging.getLogger("cxrscale.train")


@dataclass(frozen=True)
class Start:
    """Where a run starts: the epoch to train from, the best validation AUC so far, and whether only the
    calibration and export are left (killed after its last epoch, before the summary)."""

    epoch: int
    best: float
    finishing: bool


@dataclass(frozen=True)
class Datasets:
    """What one session fits: the model to fit (the whole model, or its head on cached features), its train
    dataset and its validation dataset, and the model that validates (the fitted one; under tf.distribute its
    plain copy, `TrainingRun.plain`)."""

    fit_model: Any
    train: tf.data.Dataset
    val: tf.data.Dataset
    val_model: Any = None


@dataclass
class TrainingRun:
    """One training run on this worker (see the module docstring). `model` is what is checkpointed and
    exported; `loss` is the head's loss (a multi-label head's weighs each label, `open_run`); `averaging` is
    the per-step weight average (--ema), None when off. `backend` is Horovod or tf.distribute
    (`distributed.training.backends`), `hvd` Horovod's Keras module (elastic training; None under tf), and
    `plain` (tf only) a copy of the model outside the strategy that every worker refreshes at the same points
    (`sync_plain`): what validates, calibrates and exports, since the chief alone may not read the distributed
    model."""

    config: TrainConfig
    backend: Any
    hvd: Any
    run_dir: Path
    gpus: list
    policy: str
    model: Any
    head: Head
    loss: Any
    optimizer: Any
    scaled_lr: float
    checkpoint: tf.train.Checkpoint
    averaging: cb.WeightAverage | None
    plain: Any = None

    def sync_plain(self) -> None:
        """Under tf.distribute, every worker at once: the plain copy takes the distributed model's weights
        (reading them all-reduces the BatchNormalization statistics). Nothing under Horovod."""
        if self.plain is not None:
            self.plain.set_weights(self.model.get_weights())

    @property
    def served(self):
        """The model that validation, the checksums and the export read: the plain copy under tf."""
        return self.plain if self.plain is not None else self.model

    # --- the data ---------------------------------------------------------------------------------------

    def plan(self, rank: int, size: int, *, verify: bool = True) -> DataPlan:
        """This worker's share of the data for `size` workers, refused on every rank at once when the data
        make the run impossible; `verify`: the shards checked against the manifest's sha256 first (rank 0)."""
        if verify:
            self.verify_shards()
        plan = plan_data(Path(self.config.data), rank, size, self.config.batch_size, self.config.model)
        steps = self.backend.gather(plan.steps_per_epoch, name="steps_per_epoch")
        if len(set(steps)) != 1:
            raise CxrError(f"workers disagree on steps per epoch ({steps}): their data folders differ")
        if self.config.calibration in ("platt", "isotonic") and not self.head.binary:  # "auto" adapts
            raise CxrError(f"--calibration {self.config.calibration} is for two classes; {self.config.data} has "
                           f"{len(plan.classes)} (use --calibration temperature)")
        check_mixup(self.config.mixup, self.head.label_form, len(plan.classes))  # before the run folder is made
        return plan

    def verify_shards(self) -> None:
        self.backend.agree(lambda: schema.verify_shards(self.config.data))

    def datasets(self, plan: DataPlan, *, seed: int, rank: int, size: int) -> Datasets:
        """With --cache-features the frozen backbone's output is computed once per image and the head (sharing
        the full model's layers) is what fits; the full model is still what gets checkpointed and exported."""
        config, form = self.config, self.head.label_form
        ds_val = val_dataset(config.data, plan, config.batch_size, rank, size)
        if not config.cache_features:
            policy = AugmentPolicy.with_ranges(config.augment_aspect, config.augment_zoom)
            return Datasets(self.model, train_dataset(config.data, plan, config.batch_size, seed=seed,
                                                      shuffle_buffer=config.shuffle_buffer, augment=config.augment,
                                                      label_form=form, mixup=config.mixup, policy=policy,
                                                      class_weight=self.class_weight(plan) if config.mixup else None),
                            ds_val, self.served)
        extractor, head = split_at_head(self.served)  # the frozen backbone: the plain copy's under tf
        if self.plain is not None:
            with self.backend.scope():  # the fitted head is a model of the strategy's, like the whole one
                _, head_fitted = split_at_head(self.model)
        else:
            head_fitted = head
        started = time.perf_counter()
        feats, labels = compute_features(extractor, ordered_dataset(plan.train_files, plan, config.batch_size, form))
        val_feats, val_labels = compute_features(extractor, ds_val)
        if rank == 0:
            log.info("cached backbone features %s of %d train + %d val images in %.1f s", feats.shape[1:],
                     len(feats), len(val_feats), time.perf_counter() - started)
        return Datasets(head_fitted, cached_train_dataset(feats, labels, config.batch_size, seed),
                        tf.data.Dataset.from_tensor_slices((val_feats, val_labels)).batch(config.batch_size), head)

    # --- the run folder ---------------------------------------------------------------------------------

    def start(self, plan: DataPlan) -> Start:
        """Check the run folder, resume from its last checkpoint (every rank), refuse a finished run that
        --epochs does not extend, and write the run record (rank 0). Calls collectives: every worker the job
        started with calls it together."""
        config, backend = self.config, self.backend
        state = backend.agree(lambda: run_record.check_run_dir(self.run_dir, config.resume))
        restored = self._resume(state) if state else None
        epoch = int(state["epoch"]) if state else 0
        finishing = epoch >= config.epochs and not (state or {}).get("finished")
        if epoch >= config.epochs and not finishing:
            raise CxrError(f"{self.run_dir} has already trained {epoch} epochs; raise --epochs to train more")
        log.info("%d worker(s) on %s, %s, %s at %dx%d px, %d train / %d val images, %d steps per epoch of %d x %d%s",
                 backend.size(), "GPU" if self.gpus else "CPU", self.policy, config.model, *plan.image_shape[:2],
                 plan.train_count, plan.val_count, plan.steps_per_epoch, backend.size(), config.batch_size,
                 ", elastic" if config.elastic else f", {backend.controller()}" if backend.name != "horovod" else "")
        if finishing:
            log.info("%s trained all %d epochs before it stopped; finishing its calibration and export",
                     self.run_dir, epoch)
        if backend.rank() == 0:
            run_record.write_run_record(self.run_dir, config, plan, self.model, policy=self.policy,
                                        workers=backend.size(), gpus=self.gpus, scaled_lr=self.scaled_lr,
                                        controller=backend.controller(),
                                        loss=self.loss, state=state, restored=restored)
        return Start(epoch, float(state["best"]) if state else -float("inf"), finishing)

    def _resume(self, state: dict) -> str:
        """Restore the last checkpoint on every rank (rank 0's copy for ranks that cannot read it) and reseed
        so that the resumed run continues deterministically; returns the restored weights' checksum."""
        epoch = int(state["epoch"])
        read = run_record.restore(self.checkpoint, state, self.run_dir)
        if self.backend.collective_writes:  # no broadcast under tf.distribute: every worker must read it
            unread = [k for k, ok in enumerate(self.backend.gather(read)) if not ok]
            if unread:
                raise CxrError(f"worker(s) {', '.join(map(str, unread))} cannot read {self.run_dir / 'checkpoints'}: "
                               "--backend tf resumes from a run folder every worker sees (a shared file system)")
        self.backend.broadcast_from_rank0(self.model.variables)
        keras.utils.set_random_seed(self.config.seed + epoch)
        self.sync_plain()
        restored = cb.weight_checksum(self.served)
        if self.backend.rank() == 0:
            log.info("resuming after epoch %d from %s (weights %s)", epoch,
                     self.run_dir / "checkpoints" / state["checkpoint"], restored)
            if restored != state.get("weights_checksum"):
                log.warning("restored weights differ from the checkpoint's record (%s)", state.get("weights_checksum"))
        return restored

    # --- fitting ----------------------------------------------------------------------------------------

    def class_weight(self, plan: DataPlan) -> dict[int, float] | None:
        """fit()'s class weights: balanced with --class-weights auto, for a head of one class per image (a
        multi-label head's weights are in its loss, `open_run`)."""
        if self.config.class_weights != "auto" or self.head.multilabel:
            return None
        return balanced_class_weights(plan.class_counts)

    def compile(self, fit_model) -> None:
        """Compile what is fitted (the model, or its head on cached features) with the run's loss and the
        head's accuracy."""
        with self.backend.scope():  # tf.distribute: the metric is created in the model's strategy
            fit_model.compile(optimizer=self.optimizer, loss=self.loss, metrics=[self.head.accuracy()],
                              jit_compile=self.config.xla)

    def callbacks(self, plan: DataPlan, ds_val: tf.data.Dataset, *, epoch: int, best: float,
                  broadcast: bool = True, val_model=None) -> list:
        """Every rank's callbacks, in the order they must run at an epoch's end (`broadcast`: rank 0's initial
        weights; an elastic state broadcasts them itself; `val_model`: what validates, default the fitted
        model). Under tf.distribute every worker also takes part in the checkpoint (the others write into a
        scratch folder), whose writing reads the distributed model."""
        config, backend, model = self.config, self.backend, self.model
        rank, size = backend.rank(), backend.size()
        scaled_lr = config.lr * size
        callbacks: list = backend.sync_callbacks(broadcast)  # Horovod: rank 0's weights, train metrics averaged
        if self.averaging:
            callbacks.append(self.averaging)  # before the BN statistics, validation and checkpoints: they see it
        bn_images = None
        if config.bn_samples and not config.cache_features and any(
                isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in model.layers):
            bn_images = sample_images(plan.train_files, plan.image_shape, -(-config.bn_samples // size), config.seed,
                                      plan.num_labels)
        if bn_images is not None or (size > 1 and backend.rank_average() is not None):
            callbacks.append(cb.BatchNormStatistics(model, bn_images, backend.rank_average()))
        if self.plain is not None:  # every worker: the plain copy takes the epoch's weights before validation
            callbacks.append(cb.LambdaEpochEnd(self.sync_plain))
        val_labels = np.concatenate([y for _, y in ds_val.as_numpy_iterator()])
        callbacks.append(cb.ExactValidation(ds_val, val_labels, backend.gather, self.head, model=val_model))
        if config.schedule == "cosine":
            # one worker has no rate to ramp up to; its warm-up starts from a tenth of the rate instead
            callbacks.append(cb.CosineLearningRate(config.lr if size > 1 else 0.1 * scaled_lr, scaled_lr,
                                                   config.warmup_epochs, config.epochs, plan.steps_per_epoch, epoch))
        else:
            if size > 1 and config.warmup_epochs > 0:
                callbacks.append(cb.WarmupLearningRate(config.lr, scaled_lr, config.warmup_epochs,
                                                       plan.steps_per_epoch, epoch))
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.5,
                                                               patience=config.reduce_lr_patience,
                                                               min_lr=config.lr * 1e-3, verbose=1 if rank == 0 else 0))
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                                       patience=config.early_stopping_patience))
        if rank == 0:  # Horovod: one writer. The history row before the checkpoint: a run killed between
            # the two redoes the epoch and rewrites its row, instead of resuming past an epoch with no row
            history = cb.HistoryWriter(self.run_dir / "history.csv", config.batch_size * size, size,
                                       read_numeric_csv(self.run_dir / "history.csv"))
            callbacks.append(history)
            if config.tracking_uri:
                callbacks.append(cb.EpochTracker(history, self.tracker()))
        if rank == 0 or backend.collective_writes:
            callbacks.append(cb.Checkpointer(self.run_dir, self.checkpoint, model, config.seed, best_value=best,
                                             scratch=rank != 0))
        if rank == 0:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(self.run_dir / "logs"), update_freq="epoch",
                                                         profile_batch=0))
        if self.averaging:
            callbacks.append(self.averaging.restore_callback())  # last: training goes on from the raw weights
        return callbacks

    def fit(self, fit_model, ds_train: tf.data.Dataset, plan: DataPlan, callbacks: list, epoch: int) -> int:
        """Fit from `epoch` to --epochs (or early stopping); returns the number of epochs run."""
        config, rank = self.config, self.backend.rank()
        # with --mixup each image's class weight is already in the data, mixed (data.train_dataset)
        class_weight = None if config.mixup else self.class_weight(plan)
        if self.backend.name == "tf":  # a distributed dataset cannot take class_weight: it rides in the data
            if class_weight:
                ds_train = with_class_weights(ds_train, class_weight)
            ds_train, class_weight = self.backend.distribute(ds_train), None
        history = fit_model.fit(ds_train, initial_epoch=epoch, callbacks=callbacks,
                                steps_per_epoch=plan.steps_per_epoch, epochs=config.epochs,
                                verbose=(1 if sys.stderr.isatty() else 2) if rank == 0 else 0,
                                class_weight=class_weight)
        return len(history.epoch)

    # --- the end ----------------------------------------------------------------------------------------

    def finish(self, plan: DataPlan, *, epochs_run: int, seconds: float, checksums: list,
               elastic: dict | None = None) -> dict[str, Any]:
        """Rank 0: calibrate, export and summarise the run (run_record.finish_run), and close its MLflow run."""
        summary = run_record.finish_run(self.run_dir, self.config, plan, self.served, epochs_run=epochs_run,
                                        seconds=seconds, checksums=checksums, elastic=elastic,
                                        backend=self.backend.name)
        tracker = self.tracker()
        totals = {"best_val_auc": summary["best_val_auc"], "best_epoch": summary["best_epoch"],
                  "epochs_completed": summary["epochs_completed"], "total_seconds": summary["seconds"],
                  "train_images_per_second": summary["train_images_per_second"]}
        tracker.log_metrics(totals, step=int(summary["epochs_completed"]))
        tracker.log_artifacts([self.run_dir / "model"])
        tracker.log_artifacts([self.run_dir / name for name in ("config.json", "history.csv", "calibration.json",
                                                                "train_summary.json", "dataset_manifest.json")], "run")
        tracker.end("FINISHED")
        return summary

    def tracker(self) -> tracking.Tracker:
        """Rank 0's MLflow run for this training run (disabled without --tracking-uri): created with the
        resolved config of RUN/config.json as params, or reopened from RUN/tracking.json on resume."""
        def params() -> dict[str, Any]:
            record = read_json(self.run_dir / "config.json", "run record")
            return {"config": record["config"], "resolved": record["resolved"]}
        return tracking.run_tracker(self.config.tracking_uri, self.config.experiment, self.run_dir,
                                    manifest=Path(self.config.data) / schema.MANIFEST, params=params)


def open_run(config: TrainConfig) -> TrainingRun:
    """Horovod's opening, before any collective: init (Horovod, or the tf.distribute cluster), pin one device
    per process, the precision policy, the model (identical initial weights on every rank, from the seed;
    under tf in the strategy's scope, plus its plain copy), the learning rate scaled with the workers and the
    optimizer wrapped to average gradients (under tf the strategy does)."""
    backend = open_backend(config.backend)  # Horovod: init and pin one GPU per process; tf: the cluster too
    rank, size = backend.rank(), backend.size()
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    gpus = backend.gpus
    policy = hvd_utils.resolve_precision(config.precision, gpus)
    keras.mixed_precision.set_global_policy(policy)
    plan = plan_data(Path(config.data), rank, size, config.batch_size, config.model)  # the shape and classes

    def build():
        keras.utils.set_random_seed(config.seed)
        return build_model(config.model, plan.image_shape[0], len(plan.classes), weights=config.resolved_weights(),
                           seed=config.seed, multilabel=bool(plan.num_labels), **config.model_options())

    # Horovod: the rate scales with the workers (their batches add up), reached by a warm-up from one's rate
    scaled_lr = config.lr * size
    warm = config.warmup_epochs > 0 and (size > 1 or config.schedule == "cosine")
    with backend.scope():
        model = build()
        optimizer = backend.wrap_optimizer(keras.optimizers.Adam(learning_rate=config.lr if warm else scaled_lr),
                                           config.elastic)
        if policy == "mixed_float16":
            # Outside the Horovod optimizer: gradients are allreduced while still scaled, then unscaled and
            # checked for inf/NaN identically on every rank, so all ranks skip or apply the same steps.
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    plain = build() if backend.name == "tf" else None  # outside the strategy: see TrainingRun
    head = Head.of_model(model)
    # a multi-label head weighs each label's negatives and positives in its loss, as class weights do for one
    # label per image (--class-weights auto); the counts are the manifest's, the same on every rank
    weights = (label_weights(plan.class_counts, plan.label_known)
               if head.multilabel and config.class_weights == "auto" else None)
    run = TrainingRun(config=config, backend=backend, hvd=getattr(backend, "hvd", None),
                      run_dir=config.resolved_output(), gpus=gpus, policy=policy, model=model, head=head,
                      loss=head.loss(config.label_smoothing, weights), optimizer=optimizer, scaled_lr=scaled_lr,
                      checkpoint=checkpoint, averaging=cb.WeightAverage(config.ema) if config.ema else None,
                      plain=plain)
    run.sync_plain()  # every worker: the strategy's initial weights (the chief's) into the plain copy
    return run
