"""python -m launch.slurm: write (and optionally submit) an sbatch script that runs a toolkit entry point on
Slurm nodes, one worker per GPU.

    python -m launch.slurm --nodes 2 --gpus-per-node 4 --time 08:00:00 -- distributed.train --data prepared/x

The script allocates --nodes x --gpus-per-node tasks, activates the virtualenv, sets the NCCL environment,
builds Horovod's host list from the job's nodes (`scontrol show hostnames`) and runs
`horovodrun -np N -H node1:4,node2:4 python -m MODULE ARGS` - or `srun --mpi=pmix python -m MODULE ARGS`
with --launcher srun, which needs Horovod built with MPI (HOROVOD_WITH_MPI=1).

With --backend tf the workers are tf.distribute's (`distributed.train --backend tf`): `srun python -m
distributed.train ARGS --backend tf`, one Slurm task per GPU, each finding the others through TensorFlow's
SlurmClusterResolver (no Horovod, no MPI).

With --container IMAGE (an Apptainer .sif, or docker://..., docs/containers.md) no virtualenv is used: every
worker runs in the image through `apptainer exec --nv IMAGE`. Across nodes that is `srun --mpi=pmix apptainer
exec ...` (Apptainer's hybrid MPI model; the image's Horovod is built with MPI); horovodrun, which would start
other nodes' workers over ssh outside the image, runs inside it on one node only.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from launch.common import (ELASTIC_COOLDOWN, EntryPoint, WARNING, data_checks, data_target, elastic_range,
                           parse_entry_point, print_checks, processes_per_node, split_tail, stop_if_fatal, tail_usage,
                           with_tf_backend, write_generated)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli

PROG = "python -m launch.slurm"
LAUNCHERS = ("horovodrun", "srun")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    time: str
    cpus_per_task: int
    job_name: str
    venv: str
    launcher: str = "horovodrun"
    partition: str | None = None
    account: str | None = None
    mem: str | None = None
    nccl_socket_ifname: str | None = None
    elastic: tuple[int, int] | None = None  # (min, max) workers: a Horovod elastic job
    container: str | None = None  # an Apptainer image: every worker runs in it
    backend: str = "horovod"  # or "tf": srun starts distributed.train's tf.distribute workers

    @property
    def workers(self) -> int:
        return self.nodes * self.tasks_per_node


def check_time(text: str) -> str:
    """Slurm's --time, e.g. 08:00:00, 2-00:00:00 or 90 (minutes); minutes and seconds below 60."""
    match = _TIME.match(text)
    ok = bool(match)
    if match and match["days"] is not None:
        ok = int(match["dh"]) < 24 and all(v is None or int(v) < 60 for v in (match["dm"], match["ds"]))
    elif match and match["c"] is not None:  # H:M:S
        ok = int(match["b"]) < 60 and int(match["c"]) < 60
    elif match and match["b"] is not None:  # M:S
        ok = int(match["b"]) < 60
    if not ok:
        raise CxrError(f"--time {text!r} is not a Slurm time limit: use HH:MM:SS (e.g. 08:00:00), "
                       f"D-HH:MM:SS (e.g. 2-00:00:00) or minutes (e.g. 90)")
    return text


def sbatch_script(job: SlurmJob, entry: EntryPoint) -> str:
    """The sbatch script text; every user-given value in the body is shell-quoted."""
    q = shlex.quote
    head = ["#!/bin/bash",
            f"#SBATCH --job-name={job.job_name}",
            f"#SBATCH --nodes={job.nodes}",
            f"#SBATCH --ntasks-per-node={job.tasks_per_node}",
            f"#SBATCH --cpus-per-task={job.cpus_per_task}"]
    if job.gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    head.append(f"#SBATCH --time={job.time}")
    for option, value in (("partition", job.partition), ("account", job.account), ("mem", job.mem)):
        if value:
            head.append(f"#SBATCH --{option}={value}")
    head.append("#SBATCH --output=%x-%j.out")
    run = '"${RUN[@]}" ' if job.container else ""  # in the image: apptainer exec [--nv] IMAGE
    module_cmd = " ".join(q(word) for word in entry.argv("python"))
    body = [
        "",
        f"# Written by {PROG}: {job.nodes} nodes x {job.tasks_per_node} workers = {job.workers} workers of "
        f"{entry.module}.",
        "# Submit with: sbatch THIS_FILE (from the folder the paths below are relative to).",
        "set -euo pipefail",
        'cd "$SLURM_SUBMIT_DIR"',
        *(container_lines(job) if job.container else venv_lines(job)),
        "",
        "export TF_USE_LEGACY_KERAS=1  # tf_keras: what Horovod and tfmot need",
        "export TF_CPP_MIN_LOG_LEVEL=2",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
    ]
    if job.nccl_socket_ifname:
        body.append(f"export NCCL_SOCKET_IFNAME={q(job.nccl_socket_ifname)}")
    body.append("")
    if job.launcher == "horovodrun":
        body += [
            f"# Horovod's host list, one slot per worker: node1:{job.tasks_per_node},node2:{job.tasks_per_node},...",
            f'HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed \'s/$/:{job.tasks_per_node}/\' '
            "| paste -sd, -)",
            '[[ -n $HOSTS ]] || { echo "error: scontrol listed no hosts for $SLURM_JOB_NODELIST" >&2; exit 1; }',
            f"NP=$((SLURM_NNODES * {job.tasks_per_node}))",
            'echo "$(date +%T) starting $NP workers on $HOSTS"',
        ]
        if job.elastic:
            low, high = job.elastic
            body += [
                "# Elastic: Horovod asks this script every second for the job's nodes that respond now, so a",
                "# node that fails is dropped and the survivors go on; one that recovers rejoins.",
                'DISCOVER="${TMPDIR:-/tmp}/cxrscale-discover-$SLURM_JOB_ID.sh"',
                f'python -m launch.hostfile --from-slurm --slots {job.tasks_per_node} --discovery-script "$DISCOVER" '
                ">/dev/null",
                f'horovodrun -np "$NP" --min-np {low} --max-np {high} --host-discovery-script "$DISCOVER" '
                f"--blacklist-cooldown-range {' '.join(ELASTIC_COOLDOWN)} {module_cmd}"
                + ("" if "--elastic" in entry.args else " --elastic"),
            ]
        else:
            body.append(f'{run}horovodrun -np "$NP" -H "$HOSTS" {module_cmd}')
    elif job.backend == "tf":
        tf_cmd = " ".join(q(word) for word in with_tf_backend(entry, f"{PROG} --backend tf").argv("python"))
        body += ["# tf.distribute: one Slurm task per worker (GPU); each finds the others through TensorFlow's",
                 "# SlurmClusterResolver, on ports from CXR_TF_PORT (default 8888) up.",
                 f"srun {run}{tf_cmd}"]
    else:
        body += ["# One Slurm task per worker; Horovod (built with MPI) takes its ranks from PMIx.",
                 f"srun --mpi=pmix {run}{module_cmd}"]
    return "\n".join(head + body) + "\n"


def venv_lines(job: SlurmJob) -> list[str]:
    return [f"VENV={shlex.quote(job.venv)}",
            '[[ -f $VENV/bin/activate ]] || { echo "error: no virtualenv at $VENV in $PWD (make install, or pass '
            '--venv to launch.slurm)" >&2; exit 2; }',
            'source "$VENV/bin/activate"']


def container_lines(job: SlurmJob) -> list[str]:
    """The image check and RUN=(apptainer exec ...): the host's environment passes into the image (Apptainer's
    default), the submit folder is bound at the same path, --nv gives the image the node's GPUs and driver."""
    nv = " --nv" if job.gpus_per_node else ""
    return [f"IMAGE={shlex.quote(job.container)}",
            'command -v apptainer >/dev/null || { echo "error: apptainer is not on PATH on $(hostname) (module load '
            'apptainer?)" >&2; exit 2; }',
            '[[ $IMAGE == *://* || -f $IMAGE ]] || { echo "error: no container image $IMAGE in $PWD (build it: '
            'docs/containers.md)" >&2; exit 2; }',
            f'RUN=(apptainer exec{nv} --bind "$PWD" --pwd "$PWD" "$IMAGE")']


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, usage=tail_usage(f"{PROG} --nodes N --gpus-per-node G"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write an sbatch script that runs distributed.train or optimize.prune_quantize on Slurm "
                    "nodes with one worker per GPU, and optionally submit it.",
        epilog="examples:\n"
               "  python -m launch.slurm --nodes 2 --gpus-per-node 4 --time 08:00:00 --partition gpu "
               "-- distributed.train --data prepared/kermany --model resnet50\n"
               "  python -m launch.slurm --nodes 4 --gpus-per-node 8 --account proj42 --submit "
               "-- distributed.train --data prepared/kermany --config best.json\n"
               "  python -m launch.slurm --nodes 2 --gpus-per-node 4 --launcher srun --output jobs/train.sbatch "
               "-- distributed.train --data prepared/kermany\n"
               "  python -m launch.slurm --nodes 2 --gpus-per-node 0 --tasks-per-node 16 "
               "-- distributed.train --data prepared/sample   # CPU nodes\n"
               "  python -m launch.slurm --nodes 1 --gpus-per-node 2 -- optimize.prune_quantize --run runs/kermany\n"
               "  python -m launch.slurm --nodes 4 --gpus-per-node 4 --launcher srun --container cxrscale.sif "
               "-- distributed.train --data prepared/kermany   # Apptainer\n"
               "\n"
               "--launcher horovodrun (default) starts the workers from the first node (Gloo, or MPI when Horovod "
               "has it; ssh between the job's nodes must work). --launcher srun lets Slurm start them; it needs "
               "Horovod built with MPI (HOROVOD_WITH_MPI=1 bash launch/install_horovod.sh) and Slurm with PMIx.")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="GPUs per node, one worker each (0: CPU nodes, give --tasks-per-node)")
    parser.add_argument("--tasks-per-node", type=int, help="workers per node (default: --gpus-per-node)")
    parser.add_argument("--time", default="04:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default 04:00:00)")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account to charge")
    parser.add_argument("--cpus-per-gpu", type=int, default=4,
                        help="CPU cores per worker for its input pipeline (sbatch --cpus-per-task; default 4)")
    parser.add_argument("--mem", help="memory per node, e.g. 128G")
    parser.add_argument("--job-name", default="cxrscale", help="job name, also the log name %%x-%%j.out")
    parser.add_argument("--venv", default=".venv", help="virtualenv to activate, relative to the submit folder "
                                                       "(default .venv)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="horovodrun (default) or srun (Horovod built with MPI); --backend tf always uses srun")
    parser.add_argument("--backend", choices=("horovod", "tf"), default="horovod",
                        help="horovod (default) or tf: distributed.train's tf.distribute workers, one srun task each")
    parser.add_argument("--container", metavar="IMAGE",
                        help="run every worker in this Apptainer image (a .sif file or docker://...; apptainer exec "
                             "--nv) instead of --venv; across nodes it needs --launcher srun")
    parser.add_argument("--nccl-socket-ifname", help="network interface for NCCL, e.g. ib0 or eth0")
    parser.add_argument("--min-np", type=int, help="elastic (horovodrun): fewest workers the job goes on with when "
                                                   "nodes fail")
    parser.add_argument("--max-np", type=int, help="elastic: most workers (default: all of the allocation's)")
    parser.add_argument("--output", help="script to write (default JOB_NAME.sbatch)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, different --output")
    parser.add_argument("--submit", action="store_true", help="run sbatch on the script after writing it")
    return parser


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    if args.nodes < 1:
        raise CxrError(f"--nodes must be at least 1, got {args.nodes}")
    tasks = processes_per_node(args.gpus_per_node, args.tasks_per_node, "--gpus-per-node", "--tasks-per-node")
    if args.cpus_per_gpu < 1:
        raise CxrError(f"--cpus-per-gpu must be at least 1, got {args.cpus_per_gpu}")
    for option, value in (("--job-name", args.job_name), ("--partition", args.partition),
                          ("--account", args.account)):
        if value is not None and not _NAME.match(value):
            raise CxrError(f"{option} {value!r} may hold only letters, digits, '.', '_' and '-'")
    if args.mem is not None and not re.match(r"^\d+[KMGT]?$", args.mem):
        raise CxrError(f"--mem {args.mem!r} is not a Slurm memory size: use e.g. 64G or 128000M")
    if args.nccl_socket_ifname is not None and not re.match(r"^\^?=?[A-Za-z0-9_.,:-]+$", args.nccl_socket_ifname):
        raise CxrError(f"--nccl-socket-ifname {args.nccl_socket_ifname!r} is not an interface name such as ib0")
    if args.backend == "tf" and args.launcher == "horovodrun":
        raise CxrError("--backend tf starts its workers with srun (TensorFlow's SlurmClusterResolver); leave out "
                       "--launcher horovodrun")
    launcher = "srun" if args.backend == "tf" else args.launcher or "horovodrun"
    if args.container is not None:
        if not args.container.strip() or re.search(r"\s", args.container):
            raise CxrError(f"--container {args.container!r} is not an image: give a .sif file or docker://REF")
        if launcher == "horovodrun" and args.nodes > 1:
            raise CxrError(f"--container with --launcher horovodrun runs on one node only (horovodrun would start "
                           f"the other nodes' workers over ssh, outside the image); use --launcher srun for "
                           f"{args.nodes} nodes (the image's Horovod is built with MPI), or --nodes 1")
    return SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=tasks,
                    time=check_time(args.time), cpus_per_task=args.cpus_per_gpu, job_name=args.job_name,
                    venv=args.venv, launcher=launcher, partition=args.partition, account=args.account,
                    mem=args.mem, nccl_socket_ifname=args.nccl_socket_ifname, container=args.container,
                    backend=args.backend)


def with_elastic(job: SlurmJob, args: argparse.Namespace, module: str) -> SlurmJob:
    if job.backend == "tf" and (args.min_np is not None or args.max_np is not None):
        raise CxrError("--min-np/--max-np make a Horovod elastic job; tf.distribute has no elastic mode (a job "
                       "restarts from its last checkpoint with --resume): use --backend horovod")
    if job.backend == "tf" and module != "distributed.train":
        raise CxrError(f"--backend tf runs distributed.train; {module} runs under Horovod (leave --backend out)")
    rng = elastic_range(args.min_np, args.max_np, job.workers, job.launcher, module)
    if rng and job.container:
        raise CxrError("--min-np/--max-np with --container: an elastic job's horovodrun must reach every node and "
                       "ask Slurm which respond, from outside the image; run it from a virtualenv (--venv)")
    return dataclasses.replace(job, elastic=rng) if rng else job


def main(argv: Sequence[str] | None = None) -> int:
    own, tail = split_tail(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    job = job_from_args(args)
    entry = parse_entry_point(tail, f"{PROG} --nodes {args.nodes} --gpus-per-node {args.gpus_per_node}")
    job = with_elastic(job, args, entry.module)
    # The data usually sits on a shared file system seen from here too; if not, it is only a warning.
    target = data_target(entry)
    per_node = "--gpus-per-node" if job.gpus_per_node else "--tasks-per-node"
    checks = data_checks(target, job.workers, f"use fewer --nodes or {per_node} (at most {{n}} workers)",
                         local=False)
    if job.container:
        if "://" not in job.container and not Path(job.container).is_file():
            checks.append((WARNING, f"no image {job.container} here: the job looks for it relative to the folder "
                                      "you submit from"))
    elif not (Path(job.venv) / "bin" / "activate").is_file():
        checks.append((WARNING, f"no virtualenv at {job.venv} here: the job activates {job.venv} relative to the "
                                  "folder you submit from"))
    print_checks(checks, f"checks for {job.workers} workers of {entry.module}:")
    stop_if_fatal(checks, "no script was written")

    output = Path(args.output or f"{job.job_name}.sbatch")
    written = write_generated(output, sbatch_script(job, entry), overwrite=args.overwrite)
    print(f"{'wrote' if written else 'unchanged:'} {output} ({job.nodes} nodes x {job.tasks_per_node} workers, "
          f"{job.launcher}{', tf.distribute' if job.backend == 'tf' else ''}"
          f"{f' in {job.container}' if job.container else ''})")
    if not args.submit:
        print(f"submit it with: sbatch {shlex.quote(str(output))}")
        return 0
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise CxrError(f"--submit: sbatch not found on PATH (not a Slurm login node?); the script was written to "
                       f"{output}: copy it to the cluster and run sbatch {output}")
    result = subprocess.run([sbatch, str(output)])
    return result.returncode


if __name__ == "__main__":
    run_cli(main)
