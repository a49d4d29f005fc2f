"""python -m launch.local: check the machine and the data, then start a toolkit entry point under horovodrun
(or, with --backend tf, N tf.distribute workers of distributed.train on this machine).

    python -m launch.local --np 2 -- distributed.train --data prepared/sample --model cnn
    python -m launch.local --backend tf --np 2 -- distributed.train --data prepared/sample --model cnn

Before anything starts it checks, and lists every problem it finds (not only the first): that Horovod is
built with TensorFlow and a controller (Gloo or MPI), which GPUs are visible, that horovodrun is installed,
and that the prepared dataset has a train shard file for every worker. Then it runs
`horovodrun -np N [-H hosts] PYTHON -m MODULE ARGS`, streams its output and returns its exit status.

With --backend tf it starts N processes of `PYTHON -m distributed.train ARGS --backend tf` here, each with its
TF_CONFIG (worker i of N on a free localhost port; worker 0 is the chief), instead of horovodrun; if one
fails, the others are stopped and the exit status is the failed worker's. Several machines under tf.distribute
are started by a scheduler, which gives each worker its TF_CONFIG: launch.slurm, launch.kubernetes, launch.ray.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from launch.common import (Check, ERROR, EntryPoint, INFO, OK, WARNING, data_checks, data_target, elastic_range,
                           loose_data_target, parse_entry_point, print_checks, split_tail, stop_if_fatal, tail_usage,
                           with_tf_backend)
from launch.hostfile import (Host, discovery_script, horovod_hosts_arg, parse_nodes, read_hostfile, total_slots,
                             write_discovery_script)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import run_quietly

PROG = "python -m launch.local"
INSTALL_FIX = "bash launch/install_horovod.sh (or make install)"

# Runs in a child process: importing horovod.tensorflow loads TensorFlow and Horovod's compiled ops, which is
# exactly what each worker will do. The *_built() functions are Horovod's documented build queries (the same
# ones `horovodrun --check-build` prints), asked here in one process instead of one per query.
_PROBE = r"""
import json, sys
info = {}
try:
    import horovod
    info["version"] = horovod.__version__
except Exception as err:
    info["import_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
else:
    try:
        import horovod.tensorflow as hvd
    except Exception as err:
        info["tensorflow_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
    else:
        info.update(tensorflow=True, gloo=bool(hvd.gloo_built()), mpi=bool(hvd.mpi_built()),
                    nccl=int(hvd.nccl_built() or 0), cuda=bool(hvd.cuda_built()), rocm=bool(hvd.rocm_built()))
print("CXR-PROBE " + json.dumps(info))
"""


def horovod_build(python: str | None = None) -> dict:
    """What the Horovod installed for `python` (default: this one) was built with: {"version", "tensorflow",
    "gloo", "mpi", "nccl" (version or 0), "cuda", "rocm"}, or {"import_error"} / {"version", "tensorflow_error"}.

    Asking costs a TensorFlow import, so the answer is asked once per process and, for this interpreter, kept
    on disk (`build_cache_file`) under a key made of the installed Horovod and TensorFlow files: a reinstall
    of either asks again. A failed probe is never kept, so a repaired install is seen at once."""
    python = python or sys.executable
    cache = build_cache_file() if python == sys.executable else None
    if cache is not None:
        try:
            return dict(json.loads(cache.read_text())["build"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: ask Horovod
    build = dict(_probe_horovod(python))
    if cache is not None and build.get("tensorflow"):
        try:
            from cxrscale.files import write_json_atomic

            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache, {"python": python, "build": build})
        except OSError:
            pass  # a read-only cache folder costs the next launch a probe, nothing more
    return build


@lru_cache(maxsize=None)
def build_cache_file() -> Path | None:
    """Where this interpreter's Horovod build answer is kept: $XDG_CACHE_HOME/cxrscale (else ~/.cache/cxrscale)
    /horovod-build-KEY.json, KEY a hash of the interpreter and of the name, size and modification time of
    Horovod's compiled TensorFlow extension and of TensorFlow's own library. None when they cannot be found
    (then every process asks Horovod)."""
    import importlib.util

    files: list[Path] = []
    try:
        for package, patterns in (("horovod", ("tensorflow/mpi_lib*.so", "common/*.so", "__init__.py")),
                                  ("tensorflow", ("libtensorflow_framework.so*", "__init__.py"))):
            spec = importlib.util.find_spec(package)  # finds the package without importing it
            if spec is None or not spec.submodule_search_locations:
                return None
            root = Path(list(spec.submodule_search_locations)[0])
            found = sorted(f for pattern in patterns for f in root.glob(pattern))
            if not found:
                return None
            files += found
        # Path.home() fails for a user without a home (some containers run an arbitrary uid)
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "cxrscale" / f"horovod-build-{install_key(sys.executable, files)}.json"
    except (OSError, ValueError, ImportError, RuntimeError, KeyError):
        return None


def install_key(python: str, files: Sequence[Path]) -> str:
    """A short hash of an interpreter and of the name, size and modification time of each file."""
    import hashlib

    parts = [os.path.realpath(python)] + [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def _probe_horovod(python: str) -> dict:
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        result = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        return {"import_error": f"{python} could not be run: {err}"}
    for line in result.stdout.splitlines():
        if line.startswith("CXR-PROBE "):
            return json.loads(line[len("CXR-PROBE "):])
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    return {"import_error": f"the check crashed ({last})"}


def build_checks(build: Mapping, gpus: int) -> list[Check]:
    """Is this Horovod usable by the toolkit on this machine? gpus: GPUs visible here."""
    if "import_error" in build:
        return [(ERROR, f"Horovod cannot be imported ({build['import_error']}): install it with {INSTALL_FIX}")]
    version = build.get("version", "?")
    if not build.get("tensorflow"):
        return [(ERROR, f"Horovod {version} is not built with TensorFlow ({build.get('tensorflow_error', '')}): "
                        f"rebuild it against this TensorFlow with {INSTALL_FIX}")]
    controllers = [name for name, key in (("Gloo", "gloo"), ("MPI", "mpi")) if build.get(key)]
    if not controllers:
        return [(ERROR, f"Horovod {version} has neither Gloo nor MPI, so its workers cannot find each other: "
                        f"rebuild with HOROVOD_WITH_GLOO=1 {INSTALL_FIX}")]
    nccl = f"NCCL {build['nccl']}" if build.get("nccl") else "no NCCL"
    checks: list[Check] = [(OK, f"Horovod {version} built with TensorFlow; controllers: {', '.join(controllers)}; "
                                f"{nccl}")]
    if gpus and not build.get("nccl"):
        # Not fatal: without NCCL Horovod still allreduces, through Gloo/MPI on host memory - only slower.
        checks.append((WARNING, f"{gpus} GPUs are visible but Horovod has no NCCL: gradients are averaged "
                                f"through host memory (slower); for GPU allreduce rebuild with "
                                f"HOROVOD_GPU_OPERATIONS=NCCL {INSTALL_FIX}"))
    return checks


def visible_gpus(env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(number of GPUs this machine's processes will see, how that was found), without importing
    TensorFlow: `nvidia-smi -L`, limited by CUDA_VISIBLE_DEVICES as CUDA limits it."""
    env = os.environ if env is None else env
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    physical, how = 0, "nvidia-smi not found"
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            physical = sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0
            how = "nvidia-smi -L" if out.returncode == 0 else f"nvidia-smi -L failed ({out.stderr.strip()[:80]})"
        except (OSError, subprocess.SubprocessError) as err:
            how = f"nvidia-smi -L failed ({err})"
    cuda = env.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None:
        listed = [d for d in cuda.split(",") if d.strip()]
        if not listed or listed[0].strip() == "-1":
            return 0, f"CUDA_VISIBLE_DEVICES={cuda!r} hides all GPUs"
        return min(len(listed), physical), f"{how}, CUDA_VISIBLE_DEVICES={cuda}"
    return physical, how


def gpu_checks(np: int, gpus: int, how: str, hosts: Sequence[Host] | None) -> list[Check]:
    if hosts and not _all_local(hosts):
        return [(INFO, f"{gpus} GPUs visible on this machine ({how}); the other hosts are not checked")]
    if not gpus:
        return [(INFO, f"no GPU visible ({how}): the {np} workers run on CPU")]
    if np > gpus:
        return [(WARNING, f"{np} workers on {gpus} GPUs: workers would share a GPU (memory and speed); use "
                          f"--np {gpus}")]
    return [(OK, f"{gpus} GPUs visible ({how}): one per worker")]


def horovodrun_path(python: str = sys.executable) -> str | None:
    """horovodrun next to the interpreter (the venv's own), else on PATH."""
    beside = Path(python).parent / "horovodrun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("horovodrun")


def preflight(np: int, hosts: Sequence[Host] | None, entry: EntryPoint, python: str = sys.executable,
              backend: str = "horovod") -> list[Check]:
    """Every check before a launch, as (level, message); ERROR entries stop it. Under --backend tf there is
    no Horovod to check: the tf.distribute workers need only TensorFlow, which every entry point has."""
    if backend == "tf":
        checks = [] if np >= 1 else [(ERROR, f"--np must be at least 1, got {np}")]
        gpus, how = visible_gpus()
        checks += gpu_checks(np, gpus, how, hosts)
        try:
            target = data_target(entry)
        except CxrError as err:
            checks.append((ERROR, str(err)))
            target = loose_data_target(entry)
        if target is not None:
            checks += data_checks(target, max(np, 1), "use --np {n}")
        return [(OK, "tf.distribute: MultiWorkerMirroredStrategy, one worker process per device, TF_CONFIG "
                     "on localhost ports")] + checks
    with ThreadPoolExecutor(1) as pool:  # the Horovod probe loads TensorFlow: run it while the rest is checked
        build = pool.submit(horovod_build, python)
        checks: list[Check] = []
        if np < 1:
            checks.append((ERROR, f"--np must be at least 1, got {np}"))
        if hosts and np > total_slots(hosts):
            checks.append((ERROR, f"--np {np} needs {np} slots but the hosts offer {total_slots(hosts)} "
                                  f"({horovod_hosts_arg(hosts)}): use --np {total_slots(hosts)} or add hosts"))
        gpus, how = visible_gpus()
        checks += gpu_checks(np, gpus, how, hosts)
        runner = horovodrun_path(python)
        checks.append((OK, f"horovodrun: {runner}") if runner else
                      (ERROR, f"horovodrun not found next to {python} nor on PATH: install Horovod with "
                              f"{INSTALL_FIX}"))
        try:
            target = data_target(entry)
        except CxrError as err:
            checks.append((ERROR, str(err)))
            target = loose_data_target(entry)  # still check the data, to list every problem at once
        if target is not None:
            checks += data_checks(target, max(np, 1), "use --np {n}")
            if hosts and not _all_local(hosts):
                checks.append((INFO, f"{target.path} was checked on this machine; every host must see it at the "
                                     "same path"))
        return build_checks(build.result(), gpus) + checks


@dataclass(frozen=True)
class Elastic:
    """horovodrun's elastic options: the worker range, the discovery script, how long to wait below min_np
    and how long a failed host is left out before it may rejoin (a cooldown range in seconds)."""

    min_np: int
    max_np: int
    discovery: str
    timeout: int = 600
    cooldown: tuple[int, int] | None = (10, 120)
    local: bool = False  # every host is this machine: no network-interface probe between hosts

    def args(self) -> list[str]:
        args = ["--min-np", str(self.min_np), "--max-np", str(self.max_np), "--host-discovery-script",
                self.discovery, "--elastic-timeout", str(self.timeout)]
        if self.cooldown:
            args += ["--blacklist-cooldown-range", str(self.cooldown[0]), str(self.cooldown[1])]
        if self.local:
            args += ["--network-interface", "lo"]
        return args


def horovodrun_command(np: int, hosts: Sequence[Host] | None, entry: EntryPoint, *, python: str = sys.executable,
                       gloo: bool = False, elastic: Elastic | None = None) -> list[str]:
    """PYTHON -m launch.horovodrun -np N [--gloo] [-H a:4,b:4 | elastic options] PYTHON -m MODULE ARGS [--elastic]:
    horovodrun as the toolkit starts it, Horovod's own launcher without its per-launch build probe
    (launch/horovodrun.py). The host list is passed with -H even when it came from a file: horovodrun's own
    host-file reader cannot take comments or blank lines. Elastic jobs find their hosts through the discovery
    script instead."""
    cmd = [python, "-m", "launch.horovodrun", "-np", str(np)]
    if gloo:
        cmd.append("--gloo")
    if elastic:
        cmd += elastic.args()
    elif hosts:
        cmd += ["-H", horovod_hosts_arg(hosts)]
    argv = entry.argv(python)
    if elastic and "--elastic" not in argv:
        argv.append("--elastic")
    return cmd + argv


def tf_worker_commands(np: int, entry: EntryPoint, python: str = sys.executable,
                       ports: Sequence[int] | None = None) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, extra environment) of each of np tf.distribute workers of `entry` on this machine: the same
    command with --backend tf, and TF_CONFIG naming every worker's localhost port and this one's index."""
    from distributed.training.backends import free_ports, tf_config  # no TensorFlow at import

    argv = with_tf_backend(entry, f"{PROG} --backend tf").argv(python)
    ports = list(ports or free_ports(np))
    addresses = [f"localhost:{port}" for port in ports]
    return [(argv, {"TF_CONFIG": tf_config(addresses, index)}) for index in range(np)]


def run_tf_workers(commands: list[tuple[list[str], dict[str, str]]], env: Mapping[str, str]) -> int:
    """Start every worker, pass on their stderr without TensorFlow's start-up noise (each line of a worker
    other than the chief marked [i]), and wait; when one fails, stop the others (they would wait for it
    forever in their next collective) and return its status."""
    import threading
    import time

    from cxrscale.console import is_start_up_noise, verbose

    # in the launcher's process group, and told to stop when the launcher dies: a launcher killed with the
    # job (kill -9, a scheduler's kill) leaves no worker behind to finish the run on its own
    procs = [subprocess.Popen(argv, env={**env, **extra}, stderr=subprocess.PIPE, text=True, errors="replace",
                              bufsize=1, preexec_fn=_stop_with_parent) for argv, extra in commands]

    def relay(index: int, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            if verbose() or not is_start_up_noise(line):
                sys.stderr.write(line if index == 0 else f"[{index}] {line}")
                sys.stderr.flush()

    threads = [threading.Thread(target=relay, args=(k, p), daemon=True) for k, p in enumerate(procs)]
    for thread in threads:
        thread.start()
    failed: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            failed = failed or next(((k, p.returncode) for k, p in enumerate(procs)
                                     if p.returncode not in (None, 0)), None)
            if failed:
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if failed is None else signal.SIGKILL)
        for proc in procs:
            proc.wait()
        for thread in threads:
            thread.join(timeout=5)
    failed = failed or next(((k, p.returncode) for k, p in enumerate(procs) if p.returncode != 0), None)
    if failed:
        index, code = failed
        print(f"error: tf.distribute worker {index} was lost ({_exit_text(code)}) and the job stopped; the run "
              "keeps its last epoch checkpoint: re-run the same command with --resume to continue",
              file=sys.stderr)
        return 128 - code if code < 0 else code
    return 0


def _stop_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the process group still carries a kill of the job
        pass


_LOST = re.compile(r"^Process (?P<rank>\d+) exit with status code (?P<code>-?\d+)\.")
_ELASTIC_LOST = re.compile(r"^Process name: (?P<name>\S+)")
_EXIT_CODE = re.compile(r"^Exit code: (?P<code>-?\d+)")
_TIMED_OUT = "minimum number of slots to become available"


class OutcomeWatcher:
    """Reads horovodrun's stderr to say in one line why a job ended badly: which worker was lost (its rank
    and signal) or that an elastic job stayed below --min-np past its timeout. Horovod's own tracebacks
    from the launcher process are held back (CXR_VERBOSE=1 shows everything)."""

    def __init__(self, elastic: Elastic | None):
        self.elastic = elastic
        self.lost: list[tuple[str, int]] = []
        self.timed_out = False
        self.in_traceback = False

    def keep(self, line: str) -> bool:
        """Whether to pass the line on."""
        text = line.rstrip("\n")
        lost = _LOST.match(text)
        if lost:
            self.lost.append((f"rank {lost['rank']}", int(lost["code"])))
        named = _ELASTIC_LOST.match(text)  # horovodrun's closing error: a rank, or HOST[SLOT] when elastic
        if named:
            name = named["name"]
            self.lost.append((f"rank {name}" if name.isdigit() else name, 0))
        code = _EXIT_CODE.match(text)
        if code and self.lost:
            self.lost[-1] = (self.lost[-1][0], int(code["code"]))
        if _TIMED_OUT in text:
            self.timed_out = True
        if text.startswith("[") and "]<" in text[:12]:  # a worker's own line
            self.in_traceback = False
            return True
        if text.startswith("Traceback (most recent call last)") or text.startswith("Exception occurred during"):
            self.in_traceback = True
        if self.in_traceback:
            if text and not text.startswith((" ", "Traceback", "Exception occurred", "During handling", "-----")) \
                    and re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", text):
                self.in_traceback = False  # the exception's own line ends it (also held back)
            return False
        return not text.startswith(("Process name:", "Exit code:"))

    def summary(self, code: int) -> str | None:
        if code == 0:
            return None
        if self.timed_out and self.elastic:
            return (f"the elastic job stayed below --min-np {self.elastic.min_np} workers for longer than its "
                    f"--elastic-timeout of {self.elastic.timeout} s and stopped; its run folder keeps the last "
                    "epoch checkpoint: start it again with --resume when enough hosts are back")
        if self.lost:
            who, signal_code = self.lost[0]
            how = _exit_text(signal_code)
            return (f"worker {who} was lost ({how}) and the job stopped; the run keeps its last epoch checkpoint: "
                    "re-run the same command with --resume to continue (or use --min-np/--max-np for a job "
                    "that survives a lost worker)")
        return None


def _exit_text(code: int) -> str:
    if code > 128:  # a shell's 128 + signal
        code = -(code - 128)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}" if code else "it exited"


def _all_local(hosts: Sequence[Host]) -> bool:
    local = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    return all(host in local for host, _ in hosts)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, usage=tail_usage(f"{PROG} --np N"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check Horovod, GPUs and the prepared dataset, listing every problem, then run a toolkit "
                    "entry point (distributed.train or optimize.prune_quantize) under horovodrun.",
        epilog="examples:\n"
               "  python -m launch.local --np 2 -- distributed.train --data prepared/sample --model cnn --epochs 3\n"
               "  python -m launch.local --np 4 --dry-run -- python -m distributed.train --data prepared/kermany "
               "--model resnet50\n"
               "  python -m launch.local --np 8 -H node1:4,node2:4 -- distributed.train --data /shared/prepared/"
               "kermany\n"
               "  python -m launch.local --np 8 --hostfile hostfile -- distributed.train --config best.json "
               "--data prepared/kermany\n"
               "  python -m launch.local --np 2 -- optimize.prune_quantize --run runs/sample --fine-tune-epochs 1\n"
               "  python -m launch.local --backend tf --np 2 -- distributed.train --data prepared/sample --model cnn\n"
               "  python -m launch.local --np 8 --min-np 4 --max-np 8 --hostfile hostfile -- distributed.train "
               "--data /shared/prepared/kermany   # elastic: edit hostfile to add or remove hosts\n"
               "\n"
               "Exit status: horovodrun's; 2 when a check fails (nothing is started then).")
    parser.add_argument("--np", type=int, required=True, help="number of worker processes (one per GPU)")
    parser.add_argument("--backend", choices=("horovod", "tf"), default="horovod",
                        help="horovod: horovodrun (default); tf: distributed.train's tf.distribute workers, started "
                             "here with their TF_CONFIG (this machine only; docs/launching.md)")
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("-H", "--hosts", help="hosts and slots, e.g. node1:4,node2:4 (default: this machine)")
    hosts.add_argument("--hostfile", help="host file, one 'HOST slots=N' line per host (python -m launch.hostfile)")
    parser.add_argument("--dry-run", action="store_true", help="print the checks and the command; start nothing")
    elastic = parser.add_argument_group("elastic training (distributed.train survives lost workers and grows when "
                                        "hosts join; docs/launching.md)")
    elastic.add_argument("--min-np", type=int, help="fewest workers the job may run on (makes the job elastic)")
    elastic.add_argument("--max-np", type=int, help="most workers it may grow to (default --np)")
    elastic.add_argument("--host-discovery-script", metavar="PATH",
                         help="your own discovery script (default: one made from -H or --hostfile, which is read "
                              "again every second: edit it to add or remove hosts)")
    elastic.add_argument("--elastic-timeout", type=int, default=600,
                         help="seconds to wait for --min-np workers before the job stops (default 600)")
    elastic.add_argument("--cooldown", type=int, nargs=2, metavar=("MIN", "MAX"), default=[10, 120],
                         help="seconds a host whose worker failed is left out before it may rejoin (default 10 120)")
    return parser


def elastic_from_args(args, hosts: Sequence[Host] | None, folder: Path,
                      module: str) -> tuple[Elastic | None, str | None]:
    """The elastic options and the discovery script's text (None when the user brought their own)."""
    if args.min_np is None and args.max_np is None and not args.host_discovery_script:
        return None, None
    min_np, max_np = elastic_range(1 if args.min_np is None else args.min_np, args.max_np, args.np, "horovodrun",
                                   module, workers_name="--np")
    if args.elastic_timeout < 1:
        raise CxrError(f"--elastic-timeout must be at least 1 second, got {args.elastic_timeout}")
    if not 0 <= args.cooldown[0] <= args.cooldown[1]:
        raise CxrError(f"--cooldown MIN MAX must be 0 <= MIN <= MAX, got {args.cooldown[0]} {args.cooldown[1]}")
    text = None
    if args.host_discovery_script:
        script = Path(args.host_discovery_script)
        if not (script.is_file() and os.access(script, os.X_OK)):
            raise CxrError(f"--host-discovery-script {script} is not an executable file")
        discovery = str(script.resolve())
    else:
        text = discovery_script(hostfile=args.hostfile) if args.hostfile else \
            discovery_script(hosts=hosts or [("localhost", max_np)])
        discovery = str(folder / "discover_hosts.sh")
    local = not args.host_discovery_script and _all_local(hosts or [("localhost", 1)])
    return Elastic(min_np, max_np, discovery, args.elastic_timeout, tuple(args.cooldown), local=local), text


def main(argv: Sequence[str] | None = None) -> int:
    own, tail = split_tail(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    entry = parse_entry_point(tail, f"{PROG} --np {args.np}")
    hosts = None
    if args.hosts:
        hosts = parse_nodes(args.hosts, source="-H")
    elif args.hostfile:
        hosts = read_hostfile(args.hostfile)

    if args.backend == "tf":
        return main_tf(args, hosts, entry)
    folder = Path(tempfile.mkdtemp(prefix="cxrscale-launch-"))  # the discovery script lives as long as the job
    try:
        elastic, script = elastic_from_args(args, hosts, folder, entry.module)
        python = sys.executable
        checks = preflight(max(args.np, elastic.max_np if elastic else 0), hosts, entry, python)
        print_checks(checks, f"checks before starting {args.np} workers of {entry.module}"
                             f"{f' (elastic, {elastic.min_np} to {elastic.max_np})' if elastic else ''}:")
        build = horovod_build(python)
        # Gloo whenever it is built, also beside MPI (horovodrun would pick MPI): the controller elastic runs need
        # and the one the toolkit is tested on here; MPI is the route of mpirun (MPIJob) and srun.
        gloo = bool(build.get("gloo"))
        command = horovodrun_command(args.np, hosts, entry, python=python, gloo=gloo, elastic=elastic)
        if args.dry_run:
            if script is not None:
                print(f"# {elastic.discovery} (host discovery, asked every second):")
                print("\n".join(f"#   {line}" for line in script.splitlines()))
            print(shlex.join(command))
        stop_if_fatal(checks, "nothing was started")
        if args.dry_run:
            return 0
        if script is not None:
            write_discovery_script(elastic.discovery, script)
        print(f"starting: {shlex.join(command)}", file=sys.stderr, flush=True)
        env = dict(os.environ)
        env.setdefault("TF_USE_LEGACY_KERAS", "1")
        watcher = OutcomeWatcher(elastic)
        code = run_quietly(command, env, keep=watcher.keep)
        summary = watcher.summary(code)
        if summary:
            print(f"error: {summary}", file=sys.stderr)
        return code
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main_tf(args, hosts: Sequence[Host] | None, entry: EntryPoint) -> int:
    """launch.local --backend tf: check, then start and watch the tf.distribute workers (`run_tf_workers`)."""
    refused = [name for name, given in (("-H/--hostfile", hosts and not _all_local(hosts)),
                                        ("--min-np/--max-np/--host-discovery-script",
                                         args.min_np is not None or args.max_np is not None
                                         or args.host_discovery_script)) if given]
    if refused:
        raise CxrError(f"--backend tf: {' and '.join(refused)} are Horovod's (other machines through ssh, elastic "
                       "jobs); tf.distribute workers on several machines are started by a scheduler: "
                       "python -m launch.slurm / launch.kubernetes / launch.ray --backend tf")
    if entry.module != "distributed.train":
        raise CxrError(f"--backend tf runs distributed.train; {entry.module} runs under Horovod (leave --backend out)")
    python = sys.executable
    checks = preflight(args.np, hosts, entry, python, backend="tf")
    print_checks(checks, f"checks before starting {args.np} tf.distribute workers of {entry.module}:")
    commands = tf_worker_commands(args.np, entry, python)
    if args.dry_run:
        for argv, extra in commands:
            print(f"TF_CONFIG={shlex.quote(extra['TF_CONFIG'])} {shlex.join(argv)}")
    stop_if_fatal(checks, "nothing was started")
    if args.dry_run:
        return 0
    print(f"starting {args.np} tf.distribute workers: {shlex.join(commands[0][0])}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    return run_tf_workers(commands, env)


if __name__ == "__main__":
    run_cli(main)
