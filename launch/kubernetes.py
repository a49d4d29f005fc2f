"""python -m launch.kubernetes: write a Kubeflow MPI-operator MPIJob (kubeflow.org/v2beta1) that runs a toolkit
entry point on Kubernetes, one worker pod per node and one process per GPU.

    python -m launch.kubernetes --image registry.example.com/cxrscale:1.0 --workers 2 --gpus-per-worker 4 \\
        --pvc data-claim --mount /workspace -- distributed.train --data /workspace/prepared/kermany

The launcher pod runs `mpirun -np W*G -bind-to none -map-by slot -x ... python -m MODULE ARGS`, as in the
MPI operator's and Horovod's Kubernetes examples; the worker pods run sshd and are reached by mpirun over the
ssh keys the operator mounts. The image must hold OpenMPI, openssh-server, the toolkit and a Horovod built
with MPI: the repository's Dockerfile builds exactly that (docker build -t cxrscale:0.2.0 .; docs/containers.md).
With --launcher horovodrun the launcher runs `horovodrun --hostfile /etc/mpi/hostfile` instead, which also
works with a Gloo-only build.

With --backend tf it writes the Kubeflow training operator's TFJob (kubeflow.org/v1) instead: --workers pods
of one process each (one GPU each, or CPU), each running `python -m distributed.train ARGS --backend tf`
with the TF_CONFIG the operator gives it (tf.distribute's MultiWorkerMirroredStrategy); no MPI, ssh or
Horovod in the image is needed for it.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from launch.common import (ELASTIC_COOLDOWN, EntryPoint, WARNING, data_checks, data_target, elastic_range,
                           parse_entry_point, print_checks, processes_per_node, split_tail, stop_if_fatal, tail_usage,
                           with_tf_backend, write_generated)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli

PROG = "python -m launch.kubernetes"
API_VERSION = "kubeflow.org/v2beta1"
HOSTFILE = "/etc/mpi/hostfile"  # where the MPI operator mounts the worker list (host slots=N lines)
ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "NCCL_DEBUG": "WARN"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?([EPTGMK]i|[EPTGMkm])?$")


DISCOVERY = "/tmp/discover_hosts.sh"  # written in the launcher pod from HOSTFILE (elastic)


def launcher_command(workers: int, slots: int, entry: EntryPoint, launcher: str = "mpirun",
                     elastic: tuple[int, int] | None = None) -> list[str]:
    """The launcher container's command: every worker process started from the launcher pod. Elastic
    (horovodrun): a discovery script re-reading the operator's hostfile, which it rewrites as worker pods come
    and go, and horovodrun --min-np/--max-np over it."""
    np = str(workers * slots)
    if launcher == "horovodrun" and elastic:
        argv = entry.argv("python") + ([] if "--elastic" in entry.args else ["--elastic"])
        script = (f"python -m launch.hostfile --nodes-file {HOSTFILE} --discovery-script {DISCOVERY} >/dev/null && "
                  f"exec horovodrun -np {np} --min-np {elastic[0]} --max-np {elastic[1]} --host-discovery-script "
                  f"{DISCOVERY} --blacklist-cooldown-range {' '.join(ELASTIC_COOLDOWN)} {shlex.join(argv)}")
        return ["sh", "-c", script]
    if launcher == "horovodrun":
        return ["horovodrun", "-np", np, "--hostfile", HOSTFILE, *entry.argv("python")]
    exports = [word for var in ("NCCL_DEBUG", "LD_LIBRARY_PATH", "PATH", "TF_USE_LEGACY_KERAS",
                                "TF_CPP_MIN_LOG_LEVEL") for word in ("-x", var)]
    # --allow-run-as-root: the operator's default ssh setup (sshAuthMountPath /root/.ssh) runs as root;
    # -mca pml ob1 -mca btl ^openib: TCP between pods, as in Horovod's Docker/MPI docs.
    return ["mpirun", "--allow-run-as-root", "-np", np, "-bind-to", "none", "-map-by", "slot", *exports,
            "-mca", "pml", "ob1", "-mca", "btl", "^openib", *entry.argv("python")]


def mpijob(*, name: str, image: str, workers: int, gpus_per_worker: int, slots_per_worker: int,
           entry: EntryPoint, namespace: str | None = None, pvc: str | None = None, mount: str = "/workspace",
           cpu: str | None = None, memory: str | None = None, launcher: str = "mpirun",
           elastic: tuple[int, int] | None = None) -> dict[str, Any]:
    """The MPIJob manifest as a plain dict (yaml.safe_dump it)."""
    def env() -> list[dict[str, str]]:  # a fresh list per container, so the YAML has no anchors
        return [{"name": key, "value": value} for key, value in ENV.items()]

    volumes, mounts = [], []
    if pvc:
        volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": pvc}}]
        mounts = [{"name": "data", "mountPath": mount}]

    def pod(container: dict[str, Any], with_data: bool) -> dict[str, Any]:
        if with_data and mounts:
            container["volumeMounts"] = mounts
        spec: dict[str, Any] = {"containers": [container]}
        if with_data and volumes:
            spec["volumes"] = volumes
        return {"spec": spec}

    limits: dict[str, Any] = {}
    if gpus_per_worker:
        limits["nvidia.com/gpu"] = gpus_per_worker
    if cpu:
        limits["cpu"] = cpu
    if memory:
        limits["memory"] = memory
    worker = {"name": "worker", "image": image, "command": ["/usr/sbin/sshd", "-De"], "env": env()}
    if limits:
        worker["resources"] = {"limits": limits}
    launcher_container = {"name": "launcher", "image": image, "command": launcher_command(
        workers, slots_per_worker, entry, launcher, elastic), "env": env()}
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "cxrscale",
                                                         "app.kubernetes.io/component": entry.module}}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "MPIJob",
        "metadata": metadata,
        "spec": {
            "slotsPerWorker": slots_per_worker,
            "runPolicy": {"cleanPodPolicy": "Running"},
            "mpiImplementation": "OpenMPI",
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "template": pod(launcher_container, with_data=False)},
                "Worker": {"replicas": workers, "template": pod(worker, with_data=True)},
            },
        },
    }


TFJOB_API = "kubeflow.org/v1"


def tfjob(*, name: str, image: str, workers: int, gpus_per_worker: int, entry: EntryPoint,
          namespace: str | None = None, pvc: str | None = None, mount: str = "/workspace", cpu: str | None = None,
          memory: str | None = None) -> dict[str, Any]:
    """The training operator's TFJob manifest for --backend tf: `workers` pods of one tf.distribute worker each.
    The operator requires the container to be named "tensorflow" and writes each pod's TF_CONFIG; a failed
    pod is not restarted on its own (its peers would wait in a collective): the job fails, and applying it
    again with --resume continues from the run's last checkpoint."""
    argv = with_tf_backend(entry, f"{PROG} --backend tf").argv("python")
    container: dict[str, Any] = {"name": "tensorflow", "image": image, "command": argv,
                                 "env": [{"name": key, "value": value} for key, value in ENV.items()],
                                 "ports": [{"name": "tfjob-port", "containerPort": 2222}]}
    limits: dict[str, Any] = {"nvidia.com/gpu": gpus_per_worker} if gpus_per_worker else {}
    if cpu:
        limits["cpu"] = cpu
    if memory:
        limits["memory"] = memory
    if limits:
        container["resources"] = {"limits": limits}
    spec: dict[str, Any] = {"containers": [container]}
    if pvc:
        container["volumeMounts"] = [{"name": "data", "mountPath": mount}]
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": pvc}}]
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "cxrscale",
                                                         "app.kubernetes.io/component": entry.module}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": TFJOB_API, "kind": "TFJob", "metadata": metadata,
            "spec": {"runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0},
                     "tfReplicaSpecs": {"Worker": {"replicas": workers, "restartPolicy": "Never",
                                                   "template": {"spec": spec}}}}}


def check_name(value: str, option: str, max_length: int = 63) -> str:
    if not _DNS_LABEL.match(value) or len(value) > max_length:
        raise CxrError(f"{option} {value!r} is not a Kubernetes name: use at most {max_length} lower-case letters, "
                       f"digits and '-', starting and ending with a letter or digit, e.g. cxr-train")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, usage=tail_usage(f"{PROG} --image IMAGE --workers N --gpus-per-worker G"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Kubeflow MPI-operator MPIJob (kubeflow.org/v2beta1) that runs distributed.train or "
                    "optimize.prune_quantize with one process per GPU; apply it with kubectl apply -f.",
        epilog="examples:\n"
               "  python -m launch.kubernetes --image registry.example.com/cxrscale:1.0 --workers 2 "
               "--gpus-per-worker 4 --pvc data-claim --mount /workspace -- distributed.train "
               "--data /workspace/prepared/kermany --output /workspace/runs/kermany\n"
               "  python -m launch.kubernetes --image registry.example.com/cxrscale:1.0 --workers 4 "
               "--gpus-per-worker 8 --name resnet50-run --namespace ml --cpu 32 --memory 200Gi "
               "-- distributed.train --data /workspace/prepared/kermany --model resnet50\n"
               "  python -m launch.kubernetes --image cxrscale:cpu --workers 2 --gpus-per-worker 0 "
               "--slots-per-worker 4 --launcher horovodrun -- distributed.train --data /workspace/prepared/sample\n"
               "  kubectl apply -f mpijob.yaml && kubectl logs -f job/cxr-train-launcher\n"
               "\n"
               "The image needs OpenMPI, openssh-server, this toolkit and Horovod built with MPI (for the default "
               "--launcher mpirun): the repository's Dockerfile builds it, see docs/containers.md. "
               "Paths after -- are paths inside the pods (e.g. under --mount).")
    parser.add_argument("--image", required=True, help="container image, e.g. registry.example.com/cxrscale:1.0")
    parser.add_argument("--workers", type=int, required=True, help="worker pods (one per node)")
    parser.add_argument("--gpus-per-worker", type=int, required=True,
                        help="GPUs per worker pod, one process each (0: CPU pods, give --slots-per-worker)")
    parser.add_argument("--slots-per-worker", type=int, help="processes per worker pod (default --gpus-per-worker)")
    parser.add_argument("--name", default="cxr-train", help="MPIJob name (default cxr-train)")
    parser.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's current one)")
    parser.add_argument("--pvc", help="PersistentVolumeClaim (ReadWriteMany) holding prepared/ and runs/")
    parser.add_argument("--mount", default="/workspace", help="where --pvc is mounted in the workers "
                                                              "(default /workspace)")
    parser.add_argument("--cpu", help="CPU limit per worker pod, e.g. 16")
    parser.add_argument("--memory", help="memory limit per worker pod, e.g. 64Gi")
    parser.add_argument("--launcher", choices=("mpirun", "horovodrun"), default="mpirun",
                        help="mpirun (Horovod built with MPI) or horovodrun over the operator's hostfile "
                             "(default mpirun)")
    parser.add_argument("--min-np", type=int, help="elastic (--launcher horovodrun): fewest worker processes the job "
                                                   "goes on with when pods are lost")
    parser.add_argument("--max-np", type=int, help="elastic: most worker processes (default: all)")
    parser.add_argument("--backend", choices=("horovod", "tf"), default="horovod",
                        help="horovod: an MPIJob (default); tf: a TFJob of tf.distribute workers, one process per "
                             "pod (--gpus-per-worker 0 or 1)")
    parser.add_argument("--output", default=None, help="manifest to write (default mpijob.yaml, tfjob.yaml with "
                                                       "--backend tf)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, different --output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    own, tail = split_tail(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    if args.workers < 1:
        raise CxrError(f"--workers must be at least 1, got {args.workers}")
    slots = 1 if args.backend == "tf" else processes_per_node(args.gpus_per_worker, args.slots_per_worker,
                                                              "--gpus-per-worker", "--slots-per-worker", where="pod")
    if not args.image.strip() or re.search(r"\s", args.image):
        raise CxrError(f"--image {args.image!r} is not an image reference such as registry.example.com/cxrscale:1.0")
    # pods are named NAME-launcher and NAME-worker-I, which must stay valid names too
    check_name(args.name, "--name", 63 - len(f"-worker-{args.workers - 1}"))
    if args.namespace:
        check_name(args.namespace, "--namespace")
    if args.pvc and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", args.pvc):
        raise CxrError(f"--pvc {args.pvc!r} is not a PersistentVolumeClaim name such as data-claim")
    if not args.mount.startswith("/"):
        raise CxrError(f"--mount {args.mount!r} must be an absolute path in the pod, e.g. /workspace")
    for option, value in (("--cpu", args.cpu), ("--memory", args.memory)):
        if value is not None and not _QUANTITY.match(value):
            raise CxrError(f"{option} {value!r} is not a Kubernetes quantity, e.g. 16, 500m, 64Gi")
    entry = parse_entry_point(tail, f"{PROG} --image IMAGE --workers {args.workers} "
                                    f"--gpus-per-worker {args.gpus_per_worker}")
    workers = args.workers * slots
    args.output = args.output or ("tfjob.yaml" if args.backend == "tf" else "mpijob.yaml")
    if args.backend == "tf":
        return main_tf(args, entry)
    elastic = elastic_range(args.min_np, args.max_np, workers, args.launcher, entry.module)
    target = data_target(entry)
    checks = data_checks(target, workers, "use fewer --workers or --gpus-per-worker (at most {n} processes)",
                         local=False)
    if args.pvc and target.path.is_absolute() and not str(target.path).startswith(args.mount.rstrip("/") + "/"):
        checks.append((WARNING, f"{target.path} is not under --mount {args.mount}, where --pvc {args.pvc} is "
                                  "mounted: the image itself must hold it"))
    print_checks(checks, f"checks for {workers} processes of {entry.module}:")
    stop_if_fatal(checks, "no manifest was written")

    manifest = mpijob(name=args.name, image=args.image, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                      slots_per_worker=slots, entry=entry, namespace=args.namespace, pvc=args.pvc, mount=args.mount,
                      cpu=args.cpu, memory=args.memory, launcher=args.launcher, elastic=elastic)
    text = (f"# Written by {PROG}: {args.workers} worker pods x {slots} processes of {entry.module}.\n"
            f"# Apply with: kubectl apply -f {Path(args.output).name}\n"
            + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False))
    written = write_generated(args.output, text, overwrite=args.overwrite)
    print(f"{'wrote' if written else 'unchanged:'} {args.output} (MPIJob {args.name}: {args.workers} workers x {slots} "
          f"slots, {args.launcher})")
    ns = f" -n {args.namespace}" if args.namespace else ""
    print(f"apply it with: kubectl apply -f {args.output}\nfollow it with: kubectl logs -f{ns} "
          f"job/{args.name}-launcher")
    return 0


def main_tf(args, entry: EntryPoint) -> int:
    """--backend tf: check, then write the TFJob (`tfjob`)."""
    refused = [(given, why) for given, why in (
        (args.gpus_per_worker > 1 or (args.slots_per_worker or 1) > 1,
         f"one tf.distribute worker per pod and one GPU per worker: for {args.workers * max(args.gpus_per_worker, 1)}"
         f" GPUs use --workers {args.workers * max(args.gpus_per_worker, args.slots_per_worker or 1)} "
         "--gpus-per-worker 1"),
        (args.min_np is not None or args.max_np is not None,
         "--min-np/--max-np make a Horovod elastic job; tf.distribute has none (re-apply with --resume)"),
        (entry.module != "distributed.train", f"--backend tf runs distributed.train, not {entry.module}"),
        (args.launcher != "mpirun", "--launcher is the MPIJob's; a TFJob's pods start their worker themselves"))
        if given]
    if refused:
        raise CxrError(f"--backend tf: {refused[0][1]}")
    target = data_target(entry)
    checks = data_checks(target, args.workers, "use fewer --workers (at most {n})", local=False)
    print_checks(checks, f"checks for {args.workers} tf.distribute workers of {entry.module}:")
    stop_if_fatal(checks, "no manifest was written")
    manifest = tfjob(name=args.name, image=args.image, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                     entry=entry, namespace=args.namespace, pvc=args.pvc, mount=args.mount, cpu=args.cpu,
                     memory=args.memory)
    text = (f"# Written by {PROG}: {args.workers} tf.distribute worker pods of {entry.module} (Kubeflow training "
            f"operator).\n# Apply with: kubectl apply -f {Path(args.output).name}\n"
            + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False))
    written = write_generated(args.output, text, overwrite=args.overwrite)
    print(f"{'wrote' if written else 'unchanged:'} {args.output} (TFJob {args.name}: {args.workers} workers)")
    ns = f" -n {args.namespace}" if args.namespace else ""
    print(f"apply it with: kubectl apply -f {args.output}\nfollow it with: kubectl logs -f{ns} {args.name}-worker-0")
    return 0


if __name__ == "__main__":
    run_cli(main)
