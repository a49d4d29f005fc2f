"""python -m distributed.train: data-parallel training of a chest X-ray classifier with Horovod (or
tf.distribute: --backend tf).

    horovodrun -np 4 python -m distributed.train --data prepared/kermany --model resnet50
    python -m launch.local --backend tf --np 4 -- distributed.train --data prepared/kermany --model resnet50

Without horovodrun it trains on one worker. `train()` reads as Horovod's Keras example does: init, pin a
device, scale the learning rate (with a warm-up), wrap the optimizer (all in `open_run`), then plan each
worker's data, broadcast from rank 0, average metrics, and let rank 0 alone write checkpoints, history and
the exported model. The pieces live in `distributed.training`: the config, the run (`trainer`), the two
backends (`backends`: Horovod, tf.distribute), the input pipelines, the callbacks, the Horovod helpers
(hvd_utils), what a run leaves on disk (run_record) and the elastic loop (Horovod's), which uses the same run.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from cxrscale import tracking
from cxrscale.cli import run_cli
from distributed.training.config import TrainConfig, parse_config


def train(config: TrainConfig) -> dict[str, Any]:
    """Train on this process's Horovod rank; returns the run summary (rank 0; {} on the others)."""
    # TensorFlow and Horovod load here, after the command line is read: --help, --version and a mistake in
    # the options answer at once instead of after TensorFlow's few seconds of start-up
    from distributed.training.trainer import open_run  # first: chooses tf_keras before TensorFlow loads
    from distributed.training import callbacks as cb, elastic

    run = open_run(config)  # Horovod or tf.distribute: init, pin, precision, model, scaled rate, optimizer
    if config.elastic:
        return elastic.run(run)
    backend = run.backend
    rank, size = backend.rank(), backend.size()
    plan = run.plan(rank, size)
    start = run.start(plan)  # checks, resume, run record
    data = run.datasets(plan, seed=config.seed + 1000 * start.epoch + rank, rank=rank, size=size)
    run.compile(data.fit_model)
    callbacks = run.callbacks(plan, data.val, epoch=start.epoch, best=start.best, val_model=data.val_model)
    started, epochs_run = time.perf_counter(), 0
    if not start.finishing:
        epochs_run = run.fit(data.fit_model, data.train, plan, callbacks, start.epoch)
    seconds = time.perf_counter() - started

    run.sync_plain()  # tf.distribute: every worker, before the chief alone reads the model
    checksums = backend.gather(cb.weight_checksum(run.served), name="weight_checksums")
    if rank != 0:
        return {}
    return run.finish(plan, epochs_run=epochs_run, seconds=seconds, checksums=checksums)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        train(parse_config(argv))
    except BaseException:
        tracking.end_open("FAILED")  # a resumed run sets its MLflow run running again
        raise
    return 0


if __name__ == "__main__":
    run_cli(main)
