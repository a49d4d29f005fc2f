"""Keras callbacks of data-parallel training: warm-up, exact validation, atomic checkpoints, history.

Every rank runs the same callbacks in the same order, so every decision that depends on a metric
(early stopping, reduce-on-plateau) is taken identically everywhere: diverging ranks would hang.
Only rank 0 writes files.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from distributed.model.kerasenv import keras

from distributed.model.metrics import multilabel_validation_metrics, validation_metrics
from distributed.model.builders import recalibrate_batchnorm
from distributed.model.heads import Head
from cxrscale.files import atomic_dir, write_json_atomic, write_text_atomic

log = logging.getLogger("cxrscale.train")


def set_learning_rate(optimizer, value: float) -> None:
    optimizer.learning_rate.assign(value)


class WarmupLearningRate(keras.callbacks.Callback):
    """Linear warm-up from the one-worker rate to the scaled rate over the first `warmup_epochs` (Goyal et
    al., "Accurate, Large Minibatch SGD"; the same ramp as Horovod's LearningRateWarmupCallback, which does
    not work with tf_keras's current optimizers). After the warm-up it leaves the rate alone, so
    ReduceLROnPlateau can lower it."""

    def __init__(self, base_lr: float, scaled_lr: float, warmup_epochs: float, steps_per_epoch: int,
                 initial_epoch: int = 0):
        super().__init__()
        self.base_lr, self.scaled_lr = base_lr, scaled_lr
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        self.epoch = initial_epoch

    def rate(self, step: int) -> float:
        """Learning rate for global step `step` (0-based)."""
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.scaled_lr
        return self.base_lr + (self.scaled_lr - self.base_lr) * (step + 1) / self.warmup_steps

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        step = self.epoch * self.steps_per_epoch + batch
        if step <= self.warmup_steps:
            set_learning_rate(self.model.optimizer, self.rate(step))


class CosineLearningRate(keras.callbacks.Callback):
    """Linear warm-up over `warmup_epochs` from `start_lr` to `peak_lr`, then cosine decay to
    `final_fraction` x peak at the end of `epochs` (Loshchilov & Hutter 2017; Goyal et al. 2017 for the
    warm-up). The rate is a function of the global step alone, so a resumed run continues the same curve."""

    def __init__(self, start_lr: float, peak_lr: float, warmup_epochs: float, epochs: int, steps_per_epoch: int,
                 initial_epoch: int = 0, final_fraction: float = 0.01):
        super().__init__()
        self.start_lr, self.peak_lr, self.final_fraction = start_lr, peak_lr, final_fraction
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))
        self.total_steps = max(1, epochs * steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = initial_epoch

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        low = self.final_fraction * self.peak_lr
        return low + 0.5 * (self.peak_lr - low) * (1.0 + math.cos(math.pi * progress))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        set_learning_rate(self.model.optimizer, self.rate(self.epoch * self.steps_per_epoch + batch))


class WeightAverage(keras.callbacks.Callback):
    """An exponential moving average of the trained weights (Polyak averaging; "EMA" in timm and the
    EfficientNet recipes), updated after every step, that is what validation, checkpoints and the export
    see: at each epoch end the averaged weights are swapped in (put this callback before BatchNormStatistics,
    so the statistics are re-estimated for them, and before validation and checkpointing), and
    `restore_callback()`, placed last, swaps the raw weights back for the next epoch. A resumed run
    continues from the averaged weights of its checkpoint.

    The decay warms up as in `tf.train.ExponentialMovingAverage(num_updates=...)`: after t updates it is
    min(decay, (1 + t) / (10 + t)), so the average forgets the random initial weights within the first
    epoch instead of keeping decay ** t of them (27 % after 130 steps at 0.99)."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow: list[tf.Variable] = []
        self.updates: tf.Variable | None = None
        self.raw: list[np.ndarray] | None = None
        self._update = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.attach(self.model)

    def variables(self) -> list[tf.Variable]:
        """The average's state: one shadow per trainable weight, then the update count."""
        return [*self.shadow, self.updates]

    def attach(self, model) -> None:
        """Start the average from `model`'s current weights, once: a later `fit` (after an elastic reset)
        carries on with the same average."""
        if self._update is not None:
            return
        weights = model.trainable_weights
        self.shadow = [tf.Variable(w, trainable=False, name=f"ema_{i}") for i, w in enumerate(weights)]
        self.updates = updates = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="ema_updates")
        decay = self.decay

        # It runs after every step and reads and writes every trainable weight, so its memory traffic is the
        # cost: s -= (1 - d)(s - w), as tf.train.ExponentialMovingAverage's assign_moving_average, compiled by
        # XLA into one pass over each weight (what that saves per step: docs/benchmarks.md, "where the time
        # went").
        @tf.function(jit_compile=True)
        def update():
            updates.assign_add(1.0)
            d = tf.minimum(decay, (1.0 + updates) / (10.0 + updates))
            for s, w in zip(self.shadow, weights):
                s.assign_sub(tf.cast(1.0 - d, s.dtype) * (s - tf.cast(w, s.dtype)))

        self._update = update

    def restart(self, model) -> None:
        """Start the average again from `model`'s weights (after a resume)."""
        for s, w in zip(self.shadow, model.trainable_weights):
            s.assign(w)
        self.updates.assign(0.0)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._update()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        weights = self.model.trainable_weights
        self.raw = [w.numpy() for w in weights]
        for w, s in zip(weights, self.shadow):
            w.assign(s)

    def restore_callback(self) -> keras.callbacks.Callback:
        average = self

        class RestoreRawWeights(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                if average.raw is not None:
                    for w, r in zip(average.model.trainable_weights, average.raw):
                        w.assign(r)
                    average.raw = None

            def on_train_end(self, logs: dict | None = None) -> None:
                for w, s in zip(average.model.trainable_weights, average.shadow):  # end on the average
                    w.assign(s)

        return RestoreRawWeights()


class BatchNormStatistics(keras.callbacks.Callback):
    """At each epoch end, before validation and checkpoints: re-estimate the BatchNormalization statistics
    of the current weights on `images` (this rank's uint8 train images, dropout off; "precise BN", see
    `models.recalibrate_batchnorm`), then, with `average`, average them over the ranks.

    Keras's moving averages lag the weights and carry the dropout variance shift: on real data they made
    inference-mode predictions swing from one class to the other between epochs (validation accuracy at
    0.5 from 0.94 to 0.26 and back) while the training loss fell smoothly. Horovod averages gradients, not
    these statistics, so without averaging each rank's would describe its own shards; averaged, every rank
    validates, checkpoints and exports the same model. images=None keeps Keras's moving averages (only
    averaged); `full_model` is the whole model when what is fitted is the head alone (--cache-features)."""

    def __init__(self, full_model, images: np.ndarray | None, average: Callable[[tf.Variable], tf.Tensor] | None):
        super().__init__()
        self.full_model = full_model
        self.images = images
        self.average = average

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:

        if self.images is not None and len(self.images):
            recalibrate_batchnorm(self.full_model, self.images)
        if self.average is not None:
            for var in self.full_model.non_trainable_variables:
                if "moving_mean" in var.name or "moving_variance" in var.name:
                    var.assign(self.average(var))


class LambdaEpochEnd(keras.callbacks.Callback):
    """`fn()` at every epoch end, in the callback list's order (Keras's LambdaCallback takes (epoch, logs))."""

    def __init__(self, fn: Callable[[], None]):
        super().__init__()
        self.fn = fn

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.fn()


class ExactValidation(keras.callbacks.Callback):
    """Validation metrics over the WHOLE validation split, identical on every rank.

    Each rank predicts its own share of the records; the scores are gathered with Horovod and every rank
    computes loss, accuracy and ROC-AUC on all of them. (Averaging per-rank AUCs, as a metric-averaging
    callback would, is not the AUC of the split.) Writes val_loss, val_accuracy and val_auc into the logs; a
    multi-label head's val_auc is the macro ROC-AUC of its labels, its loss and accuracy over the known ones.
    """

    def __init__(self, dataset: tf.data.Dataset, labels: np.ndarray, allgather_object, head: Head, *,
                 model=None):
        super().__init__()
        self.images = dataset.map(lambda x, y: x)
        self.labels = labels
        self.allgather_object = allgather_object
        self.head = head
        self.validated = model  # None: the model being fitted; under tf.distribute its plain copy
        self._forward = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.validated is None:
            outputs = self.model.predict(self.images, verbose=0)
        else:  # not predict(): inside fit's strategy scope it would shard and gather the data across workers
            if self._forward is None:
                self._forward = tf.function(lambda x: self.validated(x, training=False))
            outputs = np.concatenate([self._forward(x).numpy() for x in self.images])
        gathered = self.allgather_object((np.asarray(outputs, np.float32), self.labels))
        probs = self.head.probabilities(np.concatenate([g[0] for g in gathered]))
        labels = np.concatenate([g[1] for g in gathered])
        if logs is not None:
            logs.update(multilabel_validation_metrics(labels, probs) if self.head.multilabel
                        else validation_metrics(labels.astype(int).ravel(), probs))


class Checkpointer(keras.callbacks.Callback):
    """Rank 0: after every epoch, an atomic checkpoint of weights, optimizer state, epoch and seeds in
    checkpoints/epoch-NNNN/ (written to a temporary folder, then renamed), `latest.json` pointing at it,
    and the best weights so far by val_auc in checkpoints/best/. Keeps the last `keep` epoch checkpoints.

    `scratch`: a tf.distribute worker other than the chief. Writing the distributed model reads its
    on-read variables, which all-reduces them, so every worker must write when the chief does (TensorFlow's
    multi-worker saving); such a worker writes the same into a folder of its own and deletes it."""

    def __init__(self, run_dir: Path, checkpoint: tf.train.Checkpoint, full_model, seed: int,
                 monitor: str = "val_auc", keep: int = 2, best_value: float = -math.inf, scratch: bool = False):
        super().__init__()
        self.full_model = full_model  # what is fitted may be the head alone (--cache-features)
        self.scratch = scratch
        self.dir = run_dir / "checkpoints"
        self.checkpoint = checkpoint
        self.seed = seed
        self.monitor = monitor
        self.keep = keep
        self.best = best_value

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.scratch:
            self._write(epoch, logs or {}, self.dir)
            return
        with tempfile.TemporaryDirectory(prefix="cxr-worker-checkpoint-") as folder:  # taking part only
            self._write(epoch, logs or {}, Path(folder))

    def _write(self, epoch: int, logs: dict, folder: Path) -> None:
        done = epoch + 1
        value = float(logs.get(self.monitor, float("nan")))
        improved = not math.isnan(value) and value > self.best
        if improved:
            self.best = value
            self._write_dir(folder / "best", lambda tmp: self.full_model.save_weights(str(tmp / "weights")),
                            {"epoch": done, self.monitor: value})
        state = {"epoch": done, "seed": self.seed, "best": self.best, "monitor": self.monitor,
                 "weights_checksum": weight_checksum(self.full_model),
                 "learning_rate": float(keras.backend.get_value(self.model.optimizer.learning_rate)),
                 "metrics": {k: float(v) for k, v in logs.items() if np.isscalar(v)}}
        name = f"epoch-{done:04d}"
        self._write_dir(folder / name, lambda tmp: self.checkpoint.write(str(tmp / "ckpt")), state)
        write_json_atomic(folder / "latest.json", {"checkpoint": name, **state})
        for old in sorted(folder.glob("epoch-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _write_dir(target: Path, write, state: dict) -> None:
        with atomic_dir(target) as tmp:
            write(tmp)
            write_json_atomic(tmp / "state.json", state)


def weight_checksum(model) -> str:
    """Short digest of all of a model's weights: equal on ranks that are in sync."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def read_latest(run_dir: Path) -> dict | None:
    """The state of the last complete checkpoint of a run, or None."""
    path = run_dir / "checkpoints" / "latest.json"
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if not (run_dir / "checkpoints" / state["checkpoint"]).is_dir():
        return None
    return state


class HistoryWriter(keras.callbacks.Callback):
    """Rank 0: history.csv rewritten atomically after every epoch: epoch, lr, metrics, seconds (the whole
    epoch, with validation), images_per_second (training steps only, all workers) and workers (how many
    finished the epoch). Put it before the Checkpointer: a resumed run rewrites the rows of the epochs it
    redoes. An epoch resumed mid-way after an elastic reset counts the steps it ran since."""

    def __init__(self, path: Path, images_per_step: int, workers: int, previous: list[dict[str, Any]] | None = None):
        super().__init__()
        self.path = path
        self.images_per_step = images_per_step
        self.workers = workers
        self.rows = [{**r, **{k: int(r[k]) for k in ("epoch", "workers") if k in r}}  # read back as floats
                     for r in previous or []]
        self.started = self.last_step = time.perf_counter()
        self.steps = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = self.last_step = time.perf_counter()
        self.steps = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.last_step = time.perf_counter()
        self.steps += 1

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        row = {"epoch": epoch + 1,
               "lr": float(keras.backend.get_value(self.model.optimizer.learning_rate)),
               **{k: float(v) for k, v in (logs or {}).items() if np.isscalar(v) and k != "lr"},
               "seconds": now - self.started, "train_seconds": self.last_step - self.started,
               "images_per_second": self.steps * self.images_per_step / max(self.last_step - self.started, 1e-9),
               "workers": self.workers}
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch + 1] + [row]
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())



class EpochTracker(keras.callbacks.Callback):
    """Rank 0, after the HistoryWriter: the epoch's history row (metrics, lr, seconds, images/s, workers) to
    MLflow at step = epoch (cxrscale.tracking; a no-op once tracking is off or has failed)."""

    def __init__(self, history: HistoryWriter, tracker):
        super().__init__()
        self.history, self.tracker = history, tracker

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = self.history.rows[-1]
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
