"""Horovod helpers shared by training and quantization-aware fine-tuning (as NVIDIA's DeepLearningExamples
keep theirs in `utils/hvd_utils.py`): device pinning, the precision policy, and the small collectives that
keep ranks in step. Every function works on one process too (size 1: no collective is called)."""
from __future__ import annotations

import os
from typing import Any, Callable

import tensorflow as tf

from cxrscale.errors import CxrError


def cpu_threads_per_worker(local_size: int) -> int:
    """OMP_NUM_THREADS when the launcher set it (Ray does, for the CPUs it gave a task; optimize.tune does,
    for each trial's workers), else this machine's cores shared between the local workers."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, (os.cpu_count() or 1) // max(1, local_size))


def controller() -> str:
    """The Horovod controller this process runs on, after hvd.init(): "mpi" (mpirun, srun, or one process
    of an MPI build), "gloo" (horovodrun --gloo, elastic runs), else "none"."""
    import horovod.tensorflow as hvd

    if hvd.mpi_enabled():
        return "mpi"
    return "gloo" if hvd.gloo_enabled() else "none"


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


def gather(hvd, obj: Any, name: str | None = None) -> list:
    """Every rank's `obj`, in rank order (a one-element list on one worker)."""
    if hvd.size() == 1:
        return [obj]
    import horovod.tensorflow as hvd_tf

    return hvd_tf.allgather_object(obj, name=name)


def rank_average(hvd) -> Callable[[tf.Variable], tf.Tensor] | None:
    """A function averaging a variable over the ranks (None on one worker: nothing to average)."""
    if hvd.size() == 1:
        return None
    import horovod.tensorflow as hvd_tf

    return lambda var: hvd_tf.allreduce(var, op=hvd_tf.Average, name=var.name.replace(":", "_"))


def broadcast_from_rank0(hvd, variables) -> None:
    """Give every rank rank 0's values (e.g. after a restore that only some ranks could read)."""
    if hvd.size() > 1:
        import horovod.tensorflow as hvd_tf

        hvd_tf.broadcast_variables(variables, root_rank=0)
