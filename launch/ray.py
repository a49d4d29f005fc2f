"""python -m launch.ray: train on a Ray cluster with Ray Train, as tf.distribute workers.

    python -m launch.ray --np 4 --address auto -- distributed.train --data /shared/prepared/kermany --model resnet50
    python -m launch.ray --np 2 -- distributed.train --data prepared/sample --model cnn   # a private local Ray

A lab that already runs Ray for preprocessing and tuning scales training on the same cluster: Ray Train's
`TensorflowTrainer` starts --np workers where the cluster has room (--cpus-per-worker, --gpus-per-worker),
gives each its TF_CONFIG, and each runs `distributed.train ARGS --backend tf` (MultiWorkerMirroredStrategy).
The run folder is the same as under horovodrun; worker 0 writes it, so --output must be a path every node
sees (a shared file system), as the prepared --data must. A lost worker stops the job (Ray Train's retries
are off: the run keeps its last epoch checkpoint, and the same command with --resume continues it).

Horovod's launch by Ray (Ray's HorovodTrainer) was removed from Ray along with Horovod's support for recent
TensorFlow; tf.distribute is what Ray Train runs TensorFlow with.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from cxrscale.cli import OneLineParser, run_cli
from cxrscale.errors import CxrError
from launch.common import (ERROR, OK, Check, data_checks, data_target, parse_entry_point, print_checks, split_tail,
                           stop_if_fatal, tail_usage, with_tf_backend)

PROG = "python -m launch.ray"
REPO = Path(__file__).resolve().parents[1]


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: distributed.train with --backend tf (Ray Train has set TF_CONFIG)."""
    if loop_config["repo"] not in sys.path:
        sys.path.insert(0, loop_config["repo"])
    from distributed.train import main

    code = main(loop_config["argv"])
    if code:
        raise RuntimeError(f"distributed.train exited with status {code}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, usage=tail_usage(f"{PROG} --np N"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run distributed.train on a Ray cluster through Ray Train's TensorflowTrainer (tf.distribute "
                    "workers, --backend tf).",
        epilog="examples:\n"
               "  python -m launch.ray --np 2 -- distributed.train --data prepared/sample --model cnn --epochs 3\n"
               "  python -m launch.ray --np 8 --address auto --gpus-per-worker 1 -- distributed.train "
               "--data /shared/prepared/kermany --model resnet50 --output /shared/runs/kermany\n"
               "\n"
               "Exit status: 0 when the run finished; 1 when a worker failed (the run folder is resumable with "
               "--resume); 2 when a check fails.")
    parser.add_argument("--np", type=int, required=True, help="number of training workers (one per GPU)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to use ('auto' for the running one, or ray://HOST:10001); default: a "
                             "private local Ray")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="CPUs Ray reserves for each worker (default 1; each worker's TensorFlow uses that many "
                             "threads)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per worker (default 0; 1 on a GPU cluster)")
    parser.add_argument("--dry-run", action="store_true", help="print the checks and what would run; start nothing")
    return parser


def preflight(np: int, entry, local: bool) -> list[Check]:
    checks: list[Check] = [(OK, f"Ray Train TensorflowTrainer: {np} tf.distribute workers")]
    try:
        target = data_target(entry)
    except CxrError as err:
        return checks + [(ERROR, str(err))]
    # on a remote cluster the dataset may exist only there
    return checks + data_checks(target, max(np, 1), "use --np {n}", local=local)


def main(argv: Sequence[str] | None = None) -> int:
    own, tail = split_tail(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    entry = parse_entry_point(tail, f"{PROG} --np {args.np}")
    if entry.module != "distributed.train":
        raise CxrError(f"launch.ray runs distributed.train; {entry.module} runs under Horovod (python -m "
                       "launch.local)")
    if args.np < 1 or args.cpus_per_worker <= 0 or args.gpus_per_worker < 0:
        raise CxrError(f"--np must be at least 1 and --cpus-per-worker positive, got --np {args.np} "
                       f"--cpus-per-worker {args.cpus_per_worker} --gpus-per-worker {args.gpus_per_worker}")
    argv_worker = list(with_tf_backend(entry, PROG).args)
    checks = preflight(args.np, entry, local=args.address is None)
    print_checks(checks, f"checks before starting {args.np} Ray Train workers of {entry.module}:")
    stop_if_fatal(checks, "nothing was started")
    if args.dry_run:
        print(f"TensorflowTrainer(num_workers={args.np}, resources_per_worker={{'CPU': {args.cpus_per_worker}"
              f"{', GPU: ' + str(args.gpus_per_worker) if args.gpus_per_worker else ''}}}) running "
              f"distributed.train {' '.join(argv_worker)}")
        return 0
    return run(args, argv_worker)


def run(args, argv_worker: list[str]) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    storage = Path(tempfile.mkdtemp(prefix="cxrscale-ray-train-"))  # Ray Train's own records; the run folder
    # is distributed.train's --output
    started_here = not ray.is_initialized()
    try:
        if started_here:
            # no --address: "local", the private Ray the help promises (with none, ray.init() joins a cluster
            # that `ray start` left on this machine)
            ray.init(address=args.address or "local", include_dashboard=False, logging_level="ERROR",
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                         filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "TF_USE_LEGACY_KERAS": "1"}})
        resources = {"CPU": args.cpus_per_worker, **({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {})}
        trainer = TensorflowTrainer(
            train_worker, train_loop_config={"argv": argv_worker, "repo": str(REPO)},
            scaling_config=ScalingConfig(num_workers=args.np, use_gpu=bool(args.gpus_per_worker),
                                         resources_per_worker=resources),
            run_config=RunConfig(name="cxrscale-train", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=0)))
        try:
            trainer.fit()
        except Exception as err:  # Ray Train wraps the worker's error (TrainingFailedError and others)
            reason = str(err).strip().splitlines()
            print(f"error: a Ray Train worker failed ({reason[-1] if reason else type(err).__name__}) and the job "
                  "stopped; the run keeps its last epoch checkpoint: re-run the same command with --resume to "
                  "continue", file=sys.stderr)
            return 1
        return 0
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
