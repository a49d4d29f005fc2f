"""Fault injection on real processes, shared by the fault tests and `python -m benchmarks.faults`: find a
running worker by what its launcher told it (Horovod's or Ray's environment), kill it, flip a byte in a
file, wait for a file to say something."""
from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path
from typing import Callable


def processes(cmdline_part: str, env: dict[str, str]) -> list[int]:
    """PIDs of this machine's processes whose command line holds `cmdline_part` and whose environment has
    every `env` entry (e.g. {"HOROVOD_HOSTNAME": "127.0.0.1"}: the workers horovodrun placed on that host)."""
    wanted = [f"{k}={v}".encode() for k, v in env.items()]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline_part.encode() in cmdline and all(w in environ for w in wanted) and b"horovodrun" not in cmdline:
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
