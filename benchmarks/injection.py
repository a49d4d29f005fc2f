"""Fault injection on real processes, shared by the fault tests and `python -m benchmarks.faults`: find a
running worker by what its launcher told it (Horovod's or Ray's environment), kill it, flip a byte in a
file, wait for a file to say something."""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator


def processes(cmdline_part: str, env: dict[str, str]) -> list[int]:
    """PIDs of this machine's processes whose command line holds `cmdline_part` and whose environment has
    every `env` entry (e.g. {"HOROVOD_HOSTNAME": "127.0.0.1"}: the workers horovodrun placed on that host)."""
    wanted = [f"{k}={v}".encode() for k, v in env.items()]
    part = cmdline_part.encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:  # the environment only of the processes whose command line matches: a poll of a few ms counts
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if part not in cmdline or b"horovodrun" in cmdline:
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in environ for w in wanted):
            found.append(int(pid))
    return found


def kill_workers(cmdline_part: str, env: dict[str, str], sig: int = signal.SIGKILL) -> list[int]:
    pids = processes(cmdline_part, env)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.05,
             alive: Callable[[], bool] | None = None) -> float:
    """Wait until `condition()`; returns the time.time() it held. Fails after `timeout` seconds or when
    `alive()` turns False first (the process under test ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return time.time()
        if alive is not None and not alive():
            if condition():
                return time.time()
            raise AssertionError(f"the process ended before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def history_rows(run: Path) -> list[dict[str, float]]:
    path = run / "history.csv"
    if not path.exists():
        return []
    try:
        with open(path) as fh:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    except (OSError, ValueError):
        return []  # being replaced right now


def flip_byte(path: Path, offset: int | None = None) -> int:
    """Flip every bit of one byte of `path` (in the middle by default); returns its offset."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return offset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_nodes(ray: str, address: str, env: dict) -> int:
    """Active nodes of the Ray cluster at `address` (0 when it does not answer), by `ray status`."""
    status = subprocess.run([ray, "status", "--address", address], capture_output=True, text=True, env=env).stdout
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


@contextlib.contextmanager
def ray_node(ray: str, args: list[str], env: dict, *, address: str, nodes: int, log: Path, what: str,
             timeout: float = 120) -> Iterator[subprocess.Popen]:
    """One Ray node started as users start one (`ray start ... --block`, plus `args`), in its own process
    group: killing the group is that node failing, and stops no other Ray on the machine (`ray stop` stops
    them all). Yields the node's process once the cluster at `address` has `nodes` active nodes; a failure
    to get there quotes `ray start`'s output, kept in `log`. On the way out the group is killed: `ray start
    --block` outlived a SIGTERM for more than 30 s."""
    with open(log, "wb") as out:
        node = subprocess.Popen([ray, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                                 *args], env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        try:
            wait_for(lambda: ray_nodes(ray, address, env) == nodes, timeout, what, poll=0.5,
                     alive=lambda: node.poll() is None)
        except AssertionError as err:
            said = log.read_text(errors="replace").strip()[-1500:]
            raise AssertionError(f"{err}; `ray start` said:\n{said}") from None
        yield node
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed the node already
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


@contextlib.contextmanager
def two_node_ray(ray: str, env: dict, marker: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """A Ray cluster of two `ray_node`s on 127.0.0.1, one CPU each, made as users make one (`ray start
    --head`, then `ray start --address`). Yields (address, the second node's process); the second node's
    processes (and so its workers) carry `marker` in their environment. Token auth is off (a private test
    cluster), node failure is noticed within about 1.5 s, and its state lives in a temporary folder, not
    /tmp/ray, so no other Ray on the machine connects to it."""
    temp = Path(tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = dict(env, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_health_check_period_ms="500",
               RAY_health_check_failure_threshold="3")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a cluster of two nodes, whatever the caller ran before
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        with ray_node(ray, ["--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
                            "--temp-dir", str(temp)], env, address=address, nodes=1, log=temp / "node-0.log",
                      what="the Ray head node"), \
             ray_node(ray, ["--address", address, "--num-cpus", "1"], dict(env, **marker), address=address,
                      nodes=2, log=temp / "node-1.log", what="the second Ray node") as second:
            yield address, second
    finally:
        shutil.rmtree(temp, ignore_errors=True)
