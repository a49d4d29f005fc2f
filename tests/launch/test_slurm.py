"""launch.slurm: the sbatch script is valid bash, asks Slurm for one task per GPU and quotes every argument."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cxrscale.errors import CxrError
from launch.slurm import check_time, main
from tests.conftest import PYTHON, REPO
from tests.launch.cli import run_main, run_module


def write_script(tmp_path: Path, prepared: Path, capsys, *options: str) -> tuple[int, str, str, Path]:
    script = tmp_path / "job.sbatch"
    code, out, err = run_main(main, ["--nodes", "2", "--gpus-per-node", "2", "--partition", "gpu",
                                     "--output", str(script), *options, "--", "python", "-m", "distributed.train",
                                     "--data", str(prepared), "--output", "runs/my run", "--batch-size", "8"], capsys)
    return code, out, err, script


def test_horovodrun_script(prepared64, tmp_path, capsys):
    code, out, _, script = write_script(tmp_path, prepared64, capsys, "--time", "1-12:00:00")
    assert code == 0, out
    assert f"sbatch {script}" in out
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --time=1-12:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --output=%x-%j.out", "set -euo pipefail", "export TF_CPP_MIN_LOG_LEVEL=2"):
        assert line in text.splitlines(), line
    assert "export TF_USE_LEGACY_KERAS=1" in text
    assert (f'horovodrun -np "$NP" -H "$HOSTS" python -m distributed.train --data {prepared64} '
            f"--output 'runs/my run' --batch-size 8") in text


def test_script_runs_horovodrun_on_the_job_nodes(prepared64, tmp_path, capsys):
    """Run the script itself with stand-ins for Slurm's scontrol and for horovodrun (which prints its
    arguments one per line): the host list and every argument must arrive intact."""
    venv, fake = tmp_path / "venv", tmp_path / "slurm-bin"
    (venv / "bin").mkdir(parents=True)
    fake.mkdir()
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    (venv / "bin" / "horovodrun").write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"\n")
    (fake / "scontrol").write_text("#!/bin/bash\n[[ \"$*\" == 'show hostnames n[1-2]' ]] && "
                                   "printf 'n1\\nn2\\n'\n")
    for tool in (venv / "bin" / "horovodrun", fake / "scontrol"):
        tool.chmod(0o755)
    code, out, _, script = write_script(tmp_path, prepared64, capsys, "--venv", str(venv))
    assert code == 0, out
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()[1:]  # after the "starting" line
    assert argv == ["-np", "4", "-H", "n1:2,n2:2", "python", "-m", "distributed.train", "--data", str(prepared64),
                    "--output", "runs/my run", "--batch-size", "8"]


def test_srun_script(prepared64, tmp_path, capsys):
    code, out, _, script = write_script(tmp_path, prepared64, capsys, "--launcher", "srun",
                                        "--nccl-socket-ifname", "ib0")
    assert code == 0, out
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert (f"srun --mpi=pmix python -m distributed.train --data {prepared64} --output 'runs/my run' "
            "--batch-size 8") in text
    assert "export NCCL_SOCKET_IFNAME=ib0" in text
    assert "horovodrun" not in text


def test_tf_distribute_script_runs_one_srun_task_per_gpu(prepared64, tmp_path, capsys):
    code, out, _, script = write_script(tmp_path, prepared64, capsys, "--backend", "tf")
    assert code == 0, out
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=2" in text.splitlines()
    assert (f"srun python -m distributed.train --data {prepared64} --output 'runs/my run' --batch-size 8 "
            "--backend tf") in text
    assert "horovodrun" not in text and "--mpi" not in text
    for refused, message in ((["--launcher", "horovodrun"], "leave out --launcher horovodrun"),
                             (["--min-np", "2"], "tf.distribute has no elastic mode")):
        code, out, err, _ = write_script(tmp_path, prepared64, capsys, "--backend", "tf", *refused)
        assert code == 2 and message in err, err


@pytest.mark.parametrize("good", ["08:00:00", "90", "30:00", "2-00:00:00", "1-12", "1-12:30"])
def test_time_limits_slurm_accepts(good):
    assert check_time(good) == good


def test_bad_time_is_named(tmp_path):
    result = run_module("launch.slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "8h",
                        "--output", str(tmp_path / "job.sbatch"), "--", "distributed.train", "--data", "x",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --time '8h' is not a Slurm time limit")
    assert not (tmp_path / "job.sbatch").exists()
    with pytest.raises(CxrError, match="--time"):
        check_time("12:75:00")


def test_submit_without_sbatch_keeps_the_script(prepared64, tmp_path):
    script = tmp_path / "job.sbatch"
    result = run_module("launch.slurm", "--nodes", "1", "--gpus-per-node", "4", "--output", str(script), "--submit",
                        "--", "distributed.train", "--data", str(prepared64), "--batch-size", "8", cwd=tmp_path,
                        env={"PATH": str(tmp_path)})  # no sbatch on this PATH
    assert result.returncode == 2
    assert "sbatch not found" in result.stderr and f"the script was written to {script}" in result.stderr
    assert "#SBATCH --ntasks-per-node=4" in script.read_text()


def test_too_many_workers_for_the_shards_writes_nothing(prepared64, tmp_path, capsys):
    code, _, err, script = write_script(tmp_path, prepared64, capsys, "--gpus-per-node", "4")  # 8 workers
    assert code == 2
    assert f"{prepared64} has 4 train shard files for 8 workers" in err
    assert not script.exists()


def test_existing_different_script_needs_overwrite(prepared64, tmp_path, capsys):
    assert write_script(tmp_path, prepared64, capsys)[0] == 0
    assert "unchanged" in write_script(tmp_path, prepared64, capsys)[1]  # same content: fine
    code, _, err, _ = write_script(tmp_path, prepared64, capsys, "--time", "01:00:00")
    assert code == 2 and "--overwrite" in err
    assert write_script(tmp_path, prepared64, capsys, "--time", "01:00:00", "--overwrite")[0] == 0


def test_cpu_nodes_need_tasks_per_node(prepared64, tmp_path, capsys):
    code, _, err, _ = write_script(tmp_path, prepared64, capsys, "--gpus-per-node", "0")
    assert code == 2 and "--tasks-per-node" in err
    code, _, _, script = write_script(tmp_path, prepared64, capsys, "--gpus-per-node", "0", "--tasks-per-node", "2")
    assert code == 0
    assert "--gpus-per-node" not in script.read_text().split("set -euo")[0]


def test_elastic_script_discovers_the_responding_nodes_and_runs_horovodrun_elastic(prepared64, tmp_path, capsys):
    venv, fake = tmp_path / "venv", tmp_path / "slurm-bin"
    (venv / "bin").mkdir(parents=True)
    fake.mkdir()
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    (venv / "bin" / "horovodrun").write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"\n")
    (fake / "scontrol").write_text("#!/bin/bash\nprintf 'n1\\nn2\\n'\n")
    (fake / "sinfo").write_text("#!/bin/bash\nprintf 'n2\\n'\n")  # n1 does not respond
    for tool in (venv / "bin" / "horovodrun", fake / "scontrol", fake / "sinfo"):
        tool.chmod(0o755)
    code, out, _, script = write_script(tmp_path, prepared64, capsys, "--venv", str(venv), "--min-np", "2")
    assert code == 0, out
    env = dict(os.environ, PATH=f"{fake}:{venv}/bin:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2", SLURM_JOB_ID="77", TMPDIR=str(tmp_path),
               PYTHONPATH=str(REPO))
    (venv / "bin" / "python").symlink_to(PYTHON)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()[1:]
    discover = str(tmp_path / "cxrscale-discover-77.sh")
    assert argv[:10] == ["-np", "4", "--min-np", "2", "--max-np", "4", "--host-discovery-script", discover,
                         "--blacklist-cooldown-range", "10"]
    assert argv[-1] == "--elastic" and "distributed.train" in argv
    found = subprocess.run([discover], capture_output=True, text=True, env=env)
    assert found.stdout == "n2:2\n"


def test_elastic_needs_horovodrun(prepared64, tmp_path, capsys):
    code, out, err, _ = write_script(tmp_path, prepared64, capsys, "--launcher", "srun", "--min-np", "2")
    assert code == 2 and "only horovodrun starts" in err


def stand_in(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_container_script_runs_every_worker_through_apptainer(prepared64, tmp_path, capsys):
    """--container with --launcher srun: the script, run with stand-ins for srun (one task: it runs its
    arguments) and apptainer (prints its arguments), hands the image and every argument over intact, and uses
    no virtualenv."""
    fake = tmp_path / "slurm-bin"
    fake.mkdir()
    stand_in(fake / "srun", 'echo "srun $1"; shift; exec "$@"\n')
    stand_in(fake / "apptainer", "printf '%s\\n' \"$@\"\n")
    (tmp_path / "cxrscale.sif").write_bytes(b"SIF image stand-in")
    code, out, _, script = write_script(tmp_path, prepared64, capsys, "--launcher", "srun", "--container",
                                        "cxrscale.sif")
    assert code == 0, out
    assert "in cxrscale.sif" in out and "no virtualenv" not in out
    text = script.read_text()
    assert "VENV=" not in text and "activate" not in text
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "srun --mpi=pmix"
    assert lines[1:] == ["exec", "--nv", "--bind", str(tmp_path), "--pwd", str(tmp_path), "cxrscale.sif", "python",
                         "-m", "distributed.train", "--data", str(prepared64), "--output", "runs/my run",
                         "--batch-size", "8"]
    (tmp_path / "cxrscale.sif").unlink()  # a missing image, or no apptainer on the node: one clear line, exit 2
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no container image cxrscale.sif")
    bare = dict(env, PATH="/usr/bin:/bin")
    no_tool = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=bare)
    assert no_tool.returncode == 2 and "apptainer is not on PATH" in no_tool.stderr


def test_container_with_horovodrun_runs_it_inside_the_image_on_one_node(prepared64, tmp_path, capsys):
    script = tmp_path / "one.sbatch"
    code, out, err = run_main(main, ["--nodes", "1", "--gpus-per-node", "2", "--container", "docker://reg/cxr:1",
                                     "--output", str(script), "--", "distributed.train", "--data", str(prepared64)],
                              capsys)
    assert code == 0, err
    text = script.read_text()
    assert "IMAGE=docker://reg/cxr:1" in text
    assert f'"${{RUN[@]}}" horovodrun -np "$NP" -H "$HOSTS" python -m distributed.train --data {prepared64}' in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    code, _, err, _ = write_script(tmp_path, prepared64, capsys, "--container", "cxrscale.sif")  # 2 nodes
    assert code == 2 and "--launcher srun" in err and "outside the image" in err
    code, _, err, _ = write_script(tmp_path, prepared64, capsys, "--launcher", "srun", "--container", "a b.sif")
    assert code == 2 and "--container" in err
