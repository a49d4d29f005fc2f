"""Preprocessing under injected faults, with real Ray: a worker process killed in the middle of a task, and
the second node of a two-node Ray cluster (both on 127.0.0.1, joined with `ray start --address` as users
run one) stopped in the middle of a run. Either way the run finishes with shards byte-identical to an
undisturbed run's."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from preprocessing import schema
from preprocessing.sample import generate_sample
from tests.conftest import PYTHON, REPO
from benchmarks.injection import kill_workers, processes, wait_for

SALT = b"fault-injection-salt-0123456789ab"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    generate_sample(root / "sample", n_normal=100, n_pneumonia=220, size=384)
    (root / "salt.bin").write_bytes(SALT)
    return root / "sample", root / "salt.bin"


def command(inputs: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    sample, salt = inputs
    return [PYTHON, "-m", "preprocessing", "--input", str(sample), "--output", str(output), "--size", "128",
            "--salt-file", str(salt), "-q", *extra]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "prepared"
    result = subprocess.run(command(inputs, out, "--workers", "2"), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return shards(out)


def shards(folder: Path) -> dict[str, bytes]:
    schema.verify_shards(folder, schema.SPLITS)  # as the manifest says, too
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tfrecord"))}


def chunks_done(out: Path) -> int:
    return len(list((out / ".cxrscale-staging" / "chunks").glob("*.json")))


@pytest.mark.slow
def test_a_ray_worker_killed_mid_task_is_retried_and_the_shards_are_identical(inputs, reference, tmp_path):
    out, token = tmp_path / "prepared", uuid.uuid4().hex
    env = dict(os.environ, CXR_FAULT_TEST=token)  # Ray's workers inherit it: ours are told apart
    proc = subprocess.Popen(command(inputs, out, "--workers", "2"), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: bool(kill_workers("ray::process_chunk", {"CXR_FAULT_TEST": token})), 180,
                 "a Ray worker in the middle of a task", poll=0.005, alive=lambda: proc.poll() is None)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert shards(out) == reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node(args: list[str], temp_dir: Path, env: dict) -> subprocess.Popen:
    """`ray start ... --block` in its own process group: killing the group is that node failing."""
    ray = str(Path(PYTHON).parent / "ray")
    return subprocess.Popen([ray, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                             "--disable-usage-stats", *args], env=env, cwd=temp_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_ray_node_stopped_mid_run_leaves_the_run_to_the_head_node(inputs, reference, tmp_path):
    temp = Path(f"/tmp/cxr-ray-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths must fit 107 bytes
    temp.mkdir()
    port, token = free_port(), uuid.uuid4().hex
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3")
    head = ray_node(["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp)],
                    temp, env)
    second = None
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: _nodes(address, env) == 1, 120, "the head node", poll=0.5, alive=lambda: head.poll() is None)
        second = ray_node(["--address", address], temp, dict(env, CXR_FAULT_TEST=token))
        wait_for(lambda: _nodes(address, env) == 2, 120, "the second node to join", poll=0.5)

        out = tmp_path / "prepared"
        proc = subprocess.Popen(command(inputs, out, "--address", address, "--workers", "2"), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            # stop the second node while one of its workers runs a task and some chunks are done
            wait_for(lambda: chunks_done(out) >= 2 and bool(processes("ray::process_chunk", {"CXR_FAULT_TEST": token})),
                     300, "a task on the second node", poll=0.005, alive=lambda: proc.poll() is None)
            os.killpg(second.pid, signal.SIGKILL)
            kill_workers("ray::", {"CXR_FAULT_TEST": token})  # its workers go down with it
            _, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, err[-3000:]
        assert shards(out) == reference
    finally:
        for node in (second, head):
            if node is not None and node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _nodes(address: str, env: dict) -> int:
    status = subprocess.run([str(Path(PYTHON).parent / "ray"), "status", "--address", address], capture_output=True,
                            text=True, env=env).stdout
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)
