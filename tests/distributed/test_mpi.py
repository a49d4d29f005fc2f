"""The MPI route that the MPI operator's MPIJob (launch.kubernetes) and `launch.slurm --launcher srun` rely on:
real OpenMPI `mpirun`, Horovod built with MPI as well as Gloo, and distributed.train started exactly as the
generated MPIJob's launcher container starts it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from launch.common import parse_entry_point
from launch.kubernetes import launcher_command
from tests.conftest import PYTHON, REPO
from tests.training_fixtures import quiet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mpi() -> str:
    """mpirun, with a Horovod that has MPI. make install provides both where it can (as root on Debian:
    launch/install_mpi.sh); skips otherwise, fails instead when CXR_REQUIRE_MPI=1 (as CI sets it)."""
    mpirun = shutil.which("mpirun")
    check = subprocess.run([PYTHON, "-c", "import horovod.tensorflow as h; print(h.mpi_built())"],
                           capture_output=True, text=True)
    problem = ("mpirun is not on PATH" if not mpirun else
               "Horovod is not built with MPI" if check.stdout.strip() != "True" else None)
    if problem:
        message = f"{problem}: install OpenMPI (bash launch/install_mpi.sh) and run make install again"
        if os.environ.get("CXR_REQUIRE_MPI") == "1":
            pytest.fail(message + " [CXR_REQUIRE_MPI=1]")
        pytest.skip(message)
    return mpirun


def test_mpirun_trains_as_the_mpijob_launcher_runs_it(mpi, prepared64, tmp_path):
    run = tmp_path / "run"
    entry = parse_entry_point(["distributed.train", "--data", str(prepared64), "--model", "cnn", "--epochs", "1",
                               "--batch-size", "8", "--output", str(run)], "test")
    command = launcher_command(workers=1, slots=2, entry=entry)  # one worker pod with 2 slots: mpirun -np 2
    assert command[:4] == ["mpirun", "--allow-run-as-root", "-np", "2"] and command[-len(entry.args) - 3:][:3] == \
        ["python", "-m", "distributed.train"]
    env = dict(os.environ, PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, quiet(result.stderr + result.stdout)[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["workers"] == 2 and config["resolved"]["controller"] == "mpi"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["ranks_in_sync"] and len(summary["weight_checksums_by_rank"]) == 2
    assert (run / "model" / "saved_model.pb").is_file()
