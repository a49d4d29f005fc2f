"""benchmarks.common: a child's peak memory is its own, whatever the size of the process that started it; the
CPU time stolen by the hypervisor during a block is read from the kernel's counters."""
from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from benchmarks.common import StolenCpu, peak_rss_mb
from tests.conftest import PYTHON, REPO


def test_a_child_of_a_large_process_reports_its_own_peak_memory():
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: 400 MiB resident here
    assert peak_rss_mb() >= 400
    out = subprocess.run([PYTHON, "-c", "from benchmarks.common import StolenCpu, peak_rss_mb; print(peak_rss_mb())"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    # getrusage's ru_maxrss would say about 400 MiB here: Linux keeps it across execve
    assert 5 < float(out) < 150
    del ballast


def test_stolen_cpu_is_the_share_of_steal_time_in_the_machine_time_of_the_block():
    before = psutil.cpu_times()
    with StolenCpu() as stolen:
        time.sleep(1.0)
    after = psutil.cpu_times()
    # the window just around the block differs from it by microseconds: the counters tick every 10 ms
    expected = (after.steal - before.steal) / (sum(after) - sum(before))
    assert 0.0 <= stolen.share <= 1.0 and abs(stolen.share - expected) < 0.02


def test_every_suite_keeps_the_contract_and_benchmarks_every_model():
    from benchmarks.common import SUITES, load_suite, model_setups
    from distributed.model.zoo import model_names

    for name in SUITES:
        suite = load_suite(name)
        assert callable(suite.run_suite) and callable(suite.summarise), name
    with pytest.raises(TypeError, match="benchmarks.common lacks run_suite, summarise"):
        load_suite("common")
    assert list(model_setups()) == list(model_names())
