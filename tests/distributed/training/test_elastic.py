"""distributed.training.elastic, in one process: an epoch resumed mid-way at a new global batch runs only the
steps left, and the schedule callbacks keep their counters across a new `fit` (as after a reset)."""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from distributed.model.kerasenv import keras  # noqa: E402  (chooses tf_keras first)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from distributed.training.elastic import ElasticProgress, build_optimizer_slots, optimizer_variables  # noqa: E402


class State:
    """The attributes ElasticProgress reads and writes, without Horovod."""

    def __init__(self, **values):
        self.__dict__.update(values)


class Steps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches: list[tuple[int, int]] = []
        self.epoch = -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((self.epoch, batch))


def tiny_model():
    model = keras.Sequential([keras.layers.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def data():
    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(4).repeat()


def test_a_resumed_epoch_runs_only_the_steps_left_at_the_new_global_batch():
    # 2 workers x 4 had trained 24 images of epoch 3 (index 2); now 1 worker x 4: 6 of its 10 steps are done
    state = State(epoch=2, images_done=24, progress_at=0.0, best=0.7, lr_per_worker=1e-3, counters={})
    model, steps = tiny_model(), Steps()
    model.fit(data(), steps_per_epoch=10, epochs=4, initial_epoch=2, verbose=0,
              callbacks=[steps, ElasticProgress(state, global_batch=4, size=1, schedule_callbacks=[])])
    assert steps.batches[:4] == [(2, 6), (2, 7), (2, 8), (2, 9)]
    assert steps.batches[4:] == [(3, b) for b in range(10)]  # the next epoch is whole
    assert state.epoch == 4 and state.images_done == 0
    assert model._training_state is None


def test_schedule_counters_survive_a_new_fit():
    """A reset calls `fit` again, whose on_train_begin zeroes EarlyStopping's counters; the committed ones
    must be back before the first epoch, and the state must hold the new ones after each epoch."""
    state = State(epoch=3, images_done=0, progress_at=0.0, best=-np.inf, lr_per_worker=1e-3,
                  counters={"EarlyStopping": {"wait": 7, "best": 0.123, "best_epoch": 2}})
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=100)
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.update(wait=stop.wait, best=stop.best, best_epoch=stop.best_epoch)

    model = tiny_model()
    model.fit(data(), steps_per_epoch=2, epochs=4, initial_epoch=3, verbose=0,
              callbacks=[stop, ElasticProgress(state, 4, 1, [stop], monitor="loss"), Probe()])
    assert seen == {"wait": 7, "best": 0.123, "best_epoch": 2}
    assert state.counters["EarlyStopping"] == {"wait": stop.wait, "best": stop.best, "best_epoch": stop.best_epoch}
    assert stop.wait == 8 or stop.best < 0.123  # epoch 4 either improved on 0.123 or added to the wait


def test_optimizer_slots_exist_before_the_first_step():
    model = tiny_model()
    before = len(optimizer_variables(model.optimizer))
    build_optimizer_slots(model.optimizer, model.trainable_variables)
    assert len(optimizer_variables(model.optimizer)) == before + 2 * len(model.trainable_variables)
