"""Elastic training (`distributed.train --elastic`): Horovod's elastic Keras API, so that a job survives a
worker that dies or a host that leaves or joins, without a person restarting it.

    horovodrun -np 2 --min-np 1 --max-np 4 --host-discovery-script discover.sh \\
        python -m distributed.train --elastic --data prepared/kermany ...

How it follows Horovod's API (`horovod.tensorflow.keras.elastic`), and where it cannot:
- `TrainingState` is a `hvd.elastic.KerasState` that also holds the weight average's variables and the
  counters of the schedule callbacks. KerasState itself calls `optimizer.variables()`, but tf_keras 2.21's
  optimizers have `variables` as a list property (calling it raises TypeError), and their slots do not exist
  before the first step, so a worker that joins would broadcast fewer variables than the others and hang
  (horovod/horovod#2652). Here the slots are built before the state is made and the list is read right.
- `hvd.elastic.CommitStateCallback` commits every `--commit-every` batches and at every epoch end;
  `hvd.elastic.run` restores the last commit after a lost worker, re-initialises Horovod and calls the
  session again with the new size.
- `UpdateBatchStateCallback` / `UpdateEpochStateCallback` are replaced by `ElasticProgress`: they count the
  epoch from the start of each `fit` (so with `initial_epoch` every reset would add the epochs twice),
  store the index of the last batch rather than how many ran, and shorten the resumed epoch through
  `params["steps"]`, which tf_keras's `fit` ignores. `ElasticProgress` counts the images of the epoch
  already trained, and `fit` resumes at the step that many images make at the new global batch (through
  the same hook Keras's BackupAndRestore uses to resume mid-epoch).

Every session (the first, and one after every reset) plans the data for the size it finds: each worker's
train shard files, its share of the validation records and of the BatchNormalization images, the steps per
epoch of the new global batch, and the learning rate scaled to the new worker count.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads

import tensorflow as tf

from distributed.training import callbacks as cb, hvd_utils
from distributed.training.data import plan_data
from distributed.training.trainer import TrainingRun

log = logging.getLogger("cxrscale.train")

# what each schedule callback keeps between epochs; Keras resets it in on_train_begin, i.e. at every reset
COUNTERS = {keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch"),
            keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter")}


def optimizer_variables(optimizer) -> list:
    """The optimizer's variables (its step count and slots) in creation order, for tf_keras's optimizers
    (a property) and for the legacy ones (a method)."""
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


def build_optimizer_slots(optimizer, variables) -> None:
    """Create the optimizer's slots now, so every worker, old or just joined, has the same variables to
    broadcast (a LossScaleOptimizer builds its inner optimizer's)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if hasattr(inner, "build"):
        inner.build(variables)


def _kerasstate_class():
    from horovod.tensorflow.keras import elastic as hvd_elastic

    class TrainingState(hvd_elastic.KerasState):
        """KerasState over the model, the optimizer and `extra` variables (the weight average), plus the
        Python attributes given as keyword arguments (epoch, images_done, counters ...)."""

        def __init__(self, model, optimizer, extra: list, **kwargs):
            self.extra = list(extra)
            super().__init__(model, optimizer=optimizer, **kwargs)
            self._bcast_model = self._broadcast

        def variables(self) -> list:
            return list(self.model.variables) + optimizer_variables(self.optimizer) + self.extra

        def _broadcast(self) -> None:
            from horovod.tensorflow import broadcast_variables

            broadcast_variables(self.variables(), root_rank=0)

        def _save_model(self) -> None:
            self._saved_variables = [tf.identity(v) for v in self.variables()]

        def _load_model(self) -> None:
            for var, saved in zip(self.variables(), self._saved_variables):
                var.assign(saved)

    return TrainingState


def make_state(model, optimizer, extra: list, *, lr_per_worker: float):
    """The elastic state, committed in host memory and broadcast from rank 0 at every reset."""
    return _kerasstate_class()(model, optimizer, extra, opened=False, finishing=False, epoch=0, start_epoch=0,
                               images_done=0, progress_at=time.time(), best=-float("inf"),
                               lr_per_worker=lr_per_worker, counters={}, sizes=[])


class ElasticProgress(keras.callbacks.Callback):
    """Keeps the state's progress current before each commit: the epoch, the images of the current epoch
    already trained (over all workers), the best validation AUC, the per-worker learning rate and the
    schedule callbacks' counters. At the start of a session it resumes `fit` at the step those images make
    at the current global batch, and puts the counters back into the schedule callbacks."""

    def __init__(self, state, global_batch: int, size: int, schedule_callbacks: list, warmup_epochs: float = 0.0,
                 monitor: str = "val_auc", on_first_step: Callable[[], None] | None = None):
        super().__init__()
        self.on_first_step = on_first_step
        self.state = state
        self.global_batch = global_batch
        self.size = size
        self.schedule_callbacks = schedule_callbacks
        self.warmup_epochs = warmup_epochs
        self.monitor = monitor

    # the hook tf_keras's fit asks after on_train_begin (BackupAndRestore's WorkerTrainingState answers it)
    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch: int, initial_epoch: int, mode=None):
        return initial_epoch, min(self.state.images_done // self.global_batch, max(0, steps_per_epoch - 1))

    def on_train_begin(self, logs: dict | None = None) -> None:
        for callback in self.schedule_callbacks:
            for name, value in self.state.counters.get(type(callback).__name__, {}).items():
                setattr(callback, name, value)
        self.model._training_state = self

    def on_train_end(self, logs: dict | None = None) -> None:
        self.model._training_state = None

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.on_first_step is not None:
            self.on_first_step()
            self.on_first_step = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.state.images_done = (batch + 1) * self.global_batch
        self.state.progress_at = time.time()  # what a commit at this batch's end keeps

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.state.epoch = epoch + 1
        self.state.images_done = 0
        self.state.progress_at = time.time()
        if epoch + 1 >= self.warmup_epochs:  # past the ramp: the rate per worker, as plateaus have lowered it
            self.state.lr_per_worker = float(keras.backend.get_value(self.model.optimizer.learning_rate)) / self.size
        # as the Checkpointer judges it, on every rank (the validation metrics are the same everywhere), so
        # that whichever rank is rank 0 after a reset keeps the right best model
        value = float((logs or {}).get(self.monitor, float("nan")))
        if not math.isnan(value) and value > self.state.best:
            self.state.best = value
        self.state.counters = {type(c).__name__: {n: getattr(c, n) for n in _counter_names(c)}
                               for c in self.schedule_callbacks}


def _counter_names(callback) -> tuple[str, ...]:
    for kind, names in COUNTERS.items():
        if isinstance(callback, kind):
            return names
    return ()


class ResetLog:
    """This process's record of each reset, for train_summary.json (epoch seconds): when it came, when the
    state it went back to was committed, when the next session took its first step and on how many workers."""

    def __init__(self, hvd, state, averaging):
        self.hvd, self.state, self.averaging = hvd, state, averaging
        self.resets: list[dict[str, Any]] = []

    def on_reset(self) -> None:
        """Horovod's reset callback: a worker was lost or a host came or went."""
        if self.averaging is not None:
            self.averaging.raw = None  # a reset between swapping the average in and out: the commit has the raw
        now, state = time.time(), self.state
        # after a lost worker the state is back at its last commit; after a host change it was just committed
        self.resets.append({"reset_at": now, "last_commit_at": state.progress_at, "workers": self.hvd.size()})
        log.warning("elastic reset: %d worker(s) now; training goes on in epoch %d after %d of its images "
                    "(committed %.1f s before the reset)", self.hvd.size(), state.epoch + 1, state.images_done,
                    now - state.progress_at)

    def session_size(self, size: int) -> None:
        """A session after a reset has synced: how many workers it has."""
        if self.resets and "resumed_at" not in self.resets[-1]:
            self.resets[-1]["workers"] = size

    def resumed(self) -> None:
        """The session's first step: training runs again."""
        if self.resets and "resumed_at" not in self.resets[-1]:
            self.resets[-1]["resumed_at"] = time.time()


def run(training: TrainingRun) -> dict[str, Any]:
    """Train `training` to --epochs through resets; on rank 0 after the last reset, finish it (calibrate,
    export, summarise) and return its summary; {} on the other ranks. The summary's "elastic" record: the
    epochs trained, every rank's weight checksum at the end, how many resets, the size of each session, and
    this process's `ResetLog`."""
    from horovod.tensorflow.keras import elastic as hvd_elastic

    config, hvd, model, optimizer, averaging = (training.config, training.hvd, training.model, training.optimizer,
                                                training.averaging)
    training.compile(model)  # --cache-features is refused with --elastic: the whole model is what fits
    build_optimizer_slots(optimizer, model.trainable_variables)
    if averaging is not None:
        averaging.attach(model)
    state = make_state(model, optimizer, averaging.variables() if averaging is not None else [],
                       lr_per_worker=config.lr)
    resets = ResetLog(hvd, state, averaging)
    state.register_reset_callbacks([resets.on_reset])

    @hvd_elastic.run
    def train_session(state) -> list[str]:
        rank, size = hvd.rank(), hvd.size()
        plan = training.plan(rank, size, verify=False)
        if not state.opened:  # the job's first session: every worker it started with is here
            training.verify_shards()
            start = training.start(plan)
            state.epoch, state.best, state.finishing = start.epoch, start.best, start.finishing
            state.start_epoch, state.opened = state.epoch, True
            if averaging is not None:
                averaging.restart(model)  # from the resumed weights
        state.sizes = state.sizes + [size]  # after the sync: the same on every rank, joined ones too
        state.save()
        resets.session_size(size)
        data = training.datasets(plan, seed=config.seed + 1000 * state.epoch + 100 * len(state.sizes) + rank,
                                 rank=rank, size=size)
        callbacks = training.callbacks(plan, data.val, epoch=state.epoch, best=state.best, broadcast=False,
                                       val_model=data.val_model)
        # the rate for this many workers (a warm-up callback, if any, sets its own while it ramps)
        cb.set_learning_rate(optimizer, state.lr_per_worker * size)
        schedule = [c for c in callbacks if _counter_names(c)]
        callbacks += [ElasticProgress(state, config.batch_size * size, size, schedule, config.warmup_epochs,
                                      on_first_step=resets.resumed),
                      hvd_elastic.CommitStateCallback(state, batches_per_commit=config.commit_every)]  # last
        if rank == 0:
            log.info("elastic session %d on %d worker(s): epoch %d of %d from step %d, %d steps per epoch",
                     len(state.sizes), size, state.epoch + 1, config.epochs,
                     state.images_done // (config.batch_size * size), plan.steps_per_epoch)
        if state.epoch < config.epochs and not state.finishing:
            training.fit(model, data.train, plan, callbacks, state.epoch)
        return hvd_utils.gather(hvd, cb.weight_checksum(model), name="weight_checksums")

    started = time.perf_counter()
    checksums = train_session(state)
    seconds = time.perf_counter() - started
    if hvd.rank() != 0:  # the ranks after the last reset
        return {}
    record = {"epochs": state.epoch - state.start_epoch, "checksums": checksums, "resets": len(state.sizes) - 1,
              "workers_per_session": state.sizes, "reset_times": resets.resets}
    plan = plan_data(Path(config.data), 0, len(checksums), config.batch_size, config.model)
    return training.finish(plan, epochs_run=record["epochs"], seconds=seconds, checksums=checksums, elastic=record)
