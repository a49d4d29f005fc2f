"""Joining a Ray cluster a user started: `ray start --head` on 127.0.0.1, then `--address auto` for the
preprocessing stage and for the hyper-parameter search, as a cluster user runs them."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.injection import free_port, ray_node
from tests.conftest import PYTHON, REPO
from tests.training_fixtures import quiet, sample_images  # noqa: F401 (fixture)

RAY = str(Path(PYTHON).parent / "ray")


@pytest.fixture
def running_cluster(tmp_path):
    """A head node started as users start one (`ray start --head`, state in Ray's default folder), its
    address where `auto` must find it. Only this node is stopped afterwards: `ray stop` would stop every Ray
    on the machine, a test's in another pytest-xdist worker among them."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    with ray_node(RAY, ["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"], env,
                  address=address, nodes=1, log=tmp_path / "ray-head.log", what="the Ray head node", timeout=180):
        yield address, env


@pytest.mark.slow
def test_preprocessing_and_tune_join_a_running_cluster_with_address_auto(running_cluster, sample_images, tmp_path):
    address, env = running_cluster
    prepared = tmp_path / "prepared"
    prep = subprocess.run([PYTHON, "-m", "preprocessing", "--input", str(sample_images), "--output", str(prepared),
                           "--size", "32", "--shards", "2", "--address", "auto"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, quiet(prep.stderr)
    # the head's GCS port (Ray reports the machine's address for the node, whatever --node-ip-address said)
    port = address.rsplit(":", 1)[1]
    assert f":{port} (--address auto): 1 nodes, 2 CPUs" in prep.stderr, prep.stderr[-2000:]
    counts = json.loads((prepared / "manifest.json").read_text())["counts"]
    assert counts["written"] == counts["inputs"] == 128
    # without --address the stage starts its own Ray, even with this cluster on the machine (a bare ray.init()
    # would join it, and refuse the CPU count it is given)
    private = subprocess.run([PYTHON, "-m", "preprocessing", "--input", str(sample_images), "--output",
                              str(tmp_path / "private"), "--size", "32", "--shards", "2", "--workers", "2"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert private.returncode == 0 and "joined the Ray cluster" not in private.stderr, quiet(private.stderr)
    space = tmp_path / "space.json"  # one trial: joining the cluster is what is tested, not the search
    space.write_text(json.dumps({"lr": {"grid": [1e-3]}, "augment": False}))
    tune = subprocess.run([PYTHON, "-m", "optimize.tune", "--data", str(prepared), "--model", "cnn", "--search", "grid",
                           "--space", str(space), "--max-epochs", "1", "--output", str(tmp_path / "tune"),
                           "--address", "auto", "-q"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert tune.returncode == 0, quiet(tune.stderr)
    summary = json.loads((tmp_path / "tune" / "summary.json").read_text())
    assert summary["ray_address"].endswith(f":{port}") and summary["errors"] == 0
