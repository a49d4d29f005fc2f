"""The two ways `distributed.train` runs on several workers: Horovod (the default) and TensorFlow's own
`tf.distribute` (`--backend tf`). Both run one worker process per device (GPU, or a share of the CPU cores),
with the same per-worker batch, learning-rate scaling and warm-up; the trainer (`distributed.training.
trainer`) talks to either through the small interface below and cannot tell them apart otherwise.

- `HorovodBackend`: `hvd.init()`, gradients averaged by `hvd.DistributedOptimizer`, rank 0's initial weights
  broadcast and the train metrics averaged by Horovod's callbacks; ranks exchange Python objects with
  `hvd.allgather_object`. Elastic training is Horovod's alone (`distributed.training.elastic`).
- `TFBackend`: `tf.distribute.MultiWorkerMirroredStrategy`, one replica per worker process, its cluster from
  `TF_CONFIG` (written by `launch.local --backend tf`, Ray Train's `TensorflowTrainer`, or the Kubernetes
  training operator) or from Slurm (`SlurmClusterResolver`, one task per GPU). The model and optimizer are
  built in the strategy's scope: the strategy gives every worker the chief's initial weights, all-reduces
  the gradients (ring collectives on CPU, NCCL on GPUs) and aggregates the train metrics. Objects travel
  through the strategy's all-gather.

Two things differ underneath, and the trainer handles both through this interface:
- A BatchNormalization statistic under tf.distribute is an on-read variable: reading it all-reduces it
  across workers. So the chief alone must never read the distributed model (its checkpoint, export and
  calibration would wait forever for the others): every worker writes the checkpoint (the others into a
  scratch folder, as TensorFlow's multi-worker saving does), and validation and the export read a plain
  copy of the model that every worker refreshes together (`plain_copy`).
- `class_weight` cannot be given to `fit` with a distributed dataset; under tf the weights ride in the
  dataset as per-example weights instead (`data.with_class_weights`), which is what Keras does with them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import socket
from typing import Any, Callable

import numpy as np

from cxrscale.errors import CxrError
from distributed.training.config import BACKENDS

log = logging.getLogger("cxrscale.train")



class HorovodBackend:
    """Horovod, as `distributed.train` has always run (see the module docstring)."""

    name = "horovod"
    collective_writes = False  # rank 0 alone writes; nothing it reads is all-reduced

    def __init__(self) -> None:
        from distributed.model.kerasenv import hvd_keras
        from distributed.training import hvd_utils

        self.hvd = hvd_keras()
        self.hvd.init()  # Horovod: one process per device, ranks 0..size-1
        self._utils = hvd_utils
        self.gpus = hvd_utils.configure_devices(self.hvd.local_rank(), self.hvd.local_size())  # one GPU each

    def rank(self) -> int:
        return self.hvd.rank()

    def size(self) -> int:
        return self.hvd.size()

    def controller(self) -> str:
        return self._utils.controller()

    def scope(self):
        return contextlib.nullcontext()

    def gather(self, obj: Any, name: str | None = None) -> list:
        return self._utils.gather(self.hvd, obj, name=name)

    def agree(self, fn: Callable[[], Any]) -> Any:
        return self._utils.agree(self.hvd, fn)

    def rank_average(self):
        return self._utils.rank_average(self.hvd)

    def broadcast_from_rank0(self, variables) -> None:
        self._utils.broadcast_from_rank0(self.hvd, variables)

    def wrap_optimizer(self, optimizer, elastic: bool):
        if self.size() > 1 or elastic:  # Horovod: average the gradients (one fixed worker has nothing to average)
            return self.hvd.DistributedOptimizer(optimizer)
        return optimizer

    def sync_callbacks(self, broadcast: bool) -> list:
        """Rank 0's initial weights to every rank (unless an elastic state does it) and the train metrics
        averaged over the ranks."""
        return ([self.hvd.callbacks.BroadcastGlobalVariablesCallback(0)] if broadcast else []) + \
            [self.hvd.callbacks.MetricAverageCallback()]

    def distribute(self, dataset):
        return dataset


class TFBackend:
    """tf.distribute's MultiWorkerMirroredStrategy, one replica per worker (see the module docstring)."""

    name = "tf"
    collective_writes = True  # every worker takes part in a checkpoint; see the module docstring

    def __init__(self) -> None:
        import tensorflow as tf

        from distributed.training import hvd_utils

        self.tf = tf
        resolver, self._rank, self._size, local_rank, local_size = _cluster()
        # before the strategy exists: it starts TensorFlow's runtime with the devices and threads it sees
        self.gpus = hvd_utils.configure_devices(local_rank, local_size)
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if self.gpus
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                                  communication_options=options)
        if self.strategy.num_replicas_in_sync != self._size:
            raise CxrError(f"--backend tf runs one replica per worker process; this worker sees "
                           f"{self.strategy.num_replicas_in_sync} replicas for {self._size} workers (one GPU per "
                           "process: launch one worker per GPU, as with horovodrun)")
        self._implementation = "nccl" if self.gpus else "ring"

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def controller(self) -> str:
        return f"tf.distribute ({self._implementation})"

    def scope(self):
        return self.strategy.scope()

    def gather(self, obj: Any, name: str | None = None) -> list:
        """Every worker's `obj`, in worker order: pickled, all-gathered as int32 words (the collective's
        smallest integer type), with each worker's length gathered first."""
        if self._size == 1:
            return [obj]
        raw = pickle.dumps(obj)
        raw += b"\0" * (-len(raw) % 4)
        words = np.frombuffer(raw, np.int32)
        lengths = self._all_gather(np.array([len(words)], np.int64))
        blob = self._all_gather(words)
        out, start = [], 0
        for n in lengths:
            out.append(pickle.loads(blob[start:start + int(n)].tobytes()))
            start += int(n)
        return out

    def _all_gather(self, values: np.ndarray) -> np.ndarray:
        tf = self.tf
        tensor = tf.constant(values)
        per_replica = self.strategy.experimental_distribute_values_from_function(lambda _: tensor)
        return self.strategy.gather(per_replica, axis=0).numpy()

    def agree(self, fn: Callable[[], Any]) -> Any:
        """`fn` on the chief, its result (or its CxrError) on every worker."""
        result: Any = None
        if self._rank == 0:
            try:
                result = ("ok", fn())
            except CxrError as err:
                result = ("error", str(err))
        result = self.gather(result)[0]
        if result[0] == "error":
            raise CxrError(result[1])
        return result[1]

    def rank_average(self):
        """None: a BatchNormalization statistic read under the strategy is already the workers' mean."""
        return None

    def broadcast_from_rank0(self, variables) -> None:
        """Nothing to send: every worker restored the same checkpoint from the shared run folder (a worker that
        cannot read it stops, `TrainingRun._resume`)."""

    def wrap_optimizer(self, optimizer, elastic: bool):
        return optimizer  # the strategy all-reduces the gradients in apply_gradients

    def sync_callbacks(self, broadcast: bool) -> list:
        return []  # initial weights: the strategy's; train metrics: aggregated across replicas by Keras

    def distribute(self, dataset):
        """This worker's own pipeline (its shards, per-worker batches), given to the strategy as it is: no
        auto-sharding on top of the data plan's."""
        tf = self.tf
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options)
        return self.strategy.distribute_datasets_from_function(lambda _: dataset)


def open_backend(name: str):
    """The backend `name` (horovod or tf), initialised: Horovod's init, or the tf.distribute cluster."""
    if name == "horovod":
        return HorovodBackend()
    if name == "tf":
        return TFBackend()
    raise CxrError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")


def _cluster():
    """(resolver, rank, size, local rank, local size) of this worker: TF_CONFIG when set, else Slurm's
    environment under srun with more than one task, else one worker alone."""
    import tensorflow as tf

    text = os.environ.get("TF_CONFIG")
    if text:
        try:
            spec = json.loads(text)
            workers = list(spec["cluster"]["worker"])
            task = spec["task"]
            index = int(task["index"])
        except (ValueError, KeyError, TypeError) as err:
            raise CxrError(f"TF_CONFIG is not a tf.distribute cluster spec ({err}): it needs "
                           '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}') \
                from None
        if task.get("type") not in ("worker", "chief") or "chief" in spec["cluster"] or not 0 <= index < len(workers):
            raise CxrError(f"TF_CONFIG: --backend tf runs workers only (worker 0 is the chief); got task {task} in "
                           f"a cluster of {', '.join(spec['cluster'])}")
        host = workers[index].rsplit(":", 1)[0]
        same_host = [k for k, address in enumerate(workers) if address.rsplit(":", 1)[0] == host]
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return resolver, index, len(workers), same_host.index(index), len(same_host)
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        gpus = len(tf.config.list_physical_devices("GPU"))
        # one task per GPU, pinned by its local rank (configure_devices) as under Horovod, not by the resolver:
        # TensorFlow has seen the devices already, so CUDA_VISIBLE_DEVICES set now would change nothing
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=int(os.environ.get("CXR_TF_PORT", "8888")), gpus_per_node=gpus, gpus_per_task=1 if gpus else 0,
            auto_set_gpu=False)
        per_node = re.match(r"\d+", os.environ.get("SLURM_TASKS_PER_NODE", "1"))
        return (resolver, int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                int(os.environ.get("SLURM_LOCALID", "0")), int(per_node.group()) if per_node else 1)
    return None, 0, 1, 0, 1


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n TCP ports free on `host` right now (for a local TF_CONFIG)."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def tf_config(addresses: list[str], index: int) -> str:
    """The TF_CONFIG of worker `index` of a cluster of `addresses` (host:port each; worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}})
