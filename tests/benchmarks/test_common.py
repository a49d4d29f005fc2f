"""benchmarks.common: a child's peak memory is its own, whatever the size of the process that started it."""
from __future__ import annotations

import subprocess

from benchmarks.common import peak_rss_mb
from tests.conftest import PYTHON, REPO


def test_a_child_of_a_large_process_reports_its_own_peak_memory():
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: 400 MiB resident here
    assert peak_rss_mb() >= 400
    out = subprocess.run([PYTHON, "-c", "from benchmarks.common import peak_rss_mb; print(peak_rss_mb())"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    # getrusage's ru_maxrss would say about 400 MiB here: Linux keeps it across execve
    assert 5 < float(out) < 150
    del ballast
