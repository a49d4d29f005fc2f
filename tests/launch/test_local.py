"""launch.local: every problem is listed before anything starts. Its real horovodrun -np 2 over Gloo runs in
tests/cxrscale/test_tracking.py (a tracked run) and tests/distributed/test_faults.py (lost workers)."""
from __future__ import annotations

import json

import pytest

from launch.common import ERROR, EntryPoint, INFO, OK, WARNING, data_checks, data_target, parse_entry_point
from launch.local import build_checks, gpu_checks, horovod_build, main, visible_gpus
from cxrscale.errors import CxrError
from tests.launch.cli import run_main, run_module


def test_too_many_workers_for_the_shards_stops_before_horovodrun(prepared64, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_main(main, ["--np", "5", "--", "distributed.train", "--data", str(prepared64),
                                     "--batch-size", "8", "--output", str(run)], capsys)
    assert code == 2
    assert (f"{prepared64} has 4 train shard files for 5 workers; each worker reads its own files: re-run "
            "python -m preprocessing with --shards 5 or more, or use --np 4") in err
    assert err.strip().splitlines()[-1] == "error: 1 problem listed above: nothing was started"
    assert "starting:" not in err and not out and not run.exists()


def test_every_problem_is_listed(prepared64, capsys):
    code, _, err = run_main(main, ["--np", "8", "-H", "localhost:4", "--", "distributed.train",
                                   "--data", str(prepared64), "--bogus"], capsys)
    assert code == 2
    assert "--np 8 needs 8 slots but the hosts offer 4" in err
    assert "unrecognized arguments: --bogus" in err
    assert "4 train shard files for 8 workers" in err  # the data is checked despite the bad flag
    assert "global batch (32 per worker x 8 workers = 256)" in err
    assert "error: 4 problems listed above" in err


def test_dry_run_prints_the_horovodrun_command(prepared64, tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    code, out, err = run_main(main, ["--np", "2", "--hostfile", str(hostfile), "--dry-run", "--", "python", "-m",
                                     "distributed.train", "--data", str(prepared64), "--output", "runs/my run"],
                              capsys)
    assert code == 0, err
    command = out.strip()
    assert "horovodrun -np 2 --gloo -H localhost:2 " in command
    assert command.endswith(f"-m distributed.train --data {prepared64} --output 'runs/my run'")
    assert f"ok      {prepared64}: 4 train shard files for 2 workers" in err
    assert not (tmp_path / "runs").exists()


def test_horovod_here_is_built_with_tensorflow_and_gloo():
    build = horovod_build()
    assert build["tensorflow"] and build["gloo"], build
    (level, message), = build_checks(build, gpus=0)
    assert level == OK and "built with TensorFlow" in message and "Gloo" in message


def test_the_build_answer_is_kept_on_disk_and_launch_horovodrun_starts_jobs_with_it(tmp_path, monkeypatch):
    """launch.horovodrun is horovodrun with its build probe answered from launch.local's kept answer: a kept
    answer without Gloo makes it refuse --gloo as horovodrun refuses an install without Gloo, the real answer
    starts two ranks, and a failed rank is reported and fails the launch as horovodrun reports it."""
    import os
    import subprocess

    from launch import local
    from tests.conftest import PYTHON, REPO

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local.build_cache_file.cache_clear()
    try:
        kept = local.build_cache_file()
        assert kept is not None and kept.parent == tmp_path / "cache" / "cxrscale" and not kept.exists()
        real = horovod_build()
        assert json.loads(kept.read_text())["build"] == real  # asked once, kept
    finally:
        local.build_cache_file.cache_clear()  # later tests look where their own environment says

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "launch.horovodrun", "-np", "2", "--gloo", *command], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ))

    kept.write_text(json.dumps({"build": {**real, "gloo": False}}))
    refused = run(PYTHON, "-c", "pass")
    assert refused.returncode != 0 and "Gloo support has not been built" in refused.stderr
    kept.write_text(json.dumps({"build": real}))
    ranks = run(PYTHON, "-c", "import os; print('rank', os.environ['HOROVOD_RANK'], 'of', os.environ['HOROVOD_SIZE'])")
    assert ranks.returncode == 0, ranks.stderr
    assert {"[0]<stdout>:rank 0 of 2", "[1]<stdout>:rank 1 of 2"} <= set(ranks.stdout.splitlines())
    failed = run(PYTHON, "-c", "import os, sys; sys.exit(3 if os.environ['HOROVOD_RANK'] == '1' else 0)")
    assert failed.returncode == 1 and "Process name: 1\nExit code: 3" in failed.stderr
    for bad, named in ((["--no-such-flag"], "-np/--num-proc"), (["-np", "2", "--bogus", "x"], "--bogus")):
        wrong = subprocess.run([PYTHON, "-m", "launch.horovodrun", *bad], cwd=REPO, capture_output=True, text=True,
                               timeout=120)  # horovodrun's parser, its usage text held back: one line
        assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1, wrong.stderr
        assert wrong.stderr.startswith("error: ") and named in wrong.stderr


def test_the_kept_build_answer_is_asked_again_after_a_reinstall(tmp_path):
    import os

    from launch.local import install_key

    library = tmp_path / "mpi_lib.so"
    library.write_bytes(b"x" * 10)
    key = install_key("python", [library])
    assert install_key("python", [library]) == key
    os.utime(library, ns=(1, 2))
    assert install_key("python", [library]) != key  # a reinstalled file: a new modification time
    library.write_bytes(b"y" * 11)
    assert len({key, install_key("python", [library]), install_key("/other/python", [library])}) == 3


def test_build_check_verdicts():
    assert build_checks({"import_error": "ModuleNotFoundError"}, 0)[0][0] == ERROR
    assert build_checks({"version": "0.28.1", "tensorflow_error": "not built"}, 0)[0][0] == ERROR
    assert build_checks({"version": "0.28.1", "tensorflow": True, "gloo": False, "mpi": False}, 0)[0][0] == ERROR
    on_gpus = build_checks({"version": "0.28.1", "tensorflow": True, "gloo": True, "mpi": False, "nccl": 0}, 4)
    assert [level for level, _ in on_gpus] == [OK, WARNING] and "NCCL" in on_gpus[1][1]


def test_gpu_checks(tmp_path):
    assert gpu_checks(2, 0, "nvidia-smi not found", None)[0][0] == INFO
    assert gpu_checks(8, 4, "nvidia-smi -L", None)[0][0] == WARNING
    assert gpu_checks(4, 4, "nvidia-smi -L", None)[0][0] == OK
    smi = tmp_path / "nvidia-smi"  # stands in for the driver's tool: lists two GPUs
    smi.write_text("#!/bin/sh\nprintf 'GPU 0: A100 (UUID: GPU-a)\\nGPU 1: A100 (UUID: GPU-b)\\n'\n")
    smi.chmod(0o755)
    assert visible_gpus({"PATH": str(tmp_path)})[0] == 2
    assert visible_gpus({"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "1"})[0] == 1
    assert visible_gpus({"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})[0] == 0
    assert visible_gpus({"PATH": str(tmp_path / "none")})[0] == 0


def test_entry_points():
    assert parse_entry_point(["distributed.train", "--data", "x"], "L") == EntryPoint("distributed.train",
                                                                                      ("--data", "x"))
    assert parse_entry_point(["/opt/venv/bin/python3", "-m", "optimize.prune_quantize", "--run", "r"], "L").module \
        == "optimize.prune_quantize"
    for bad in (["os.system", "ls"], ["python", "distributed/evaluate.py"], ["python"], []):
        with pytest.raises(CxrError):
            parse_entry_point(bad, "L")


def test_wrong_module_exits_2(tmp_path):
    result = run_module("launch.local", "--np", "2", "--", "os.system", "echo hi", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: 'os.system' after -- is not an entry point that runs under horovodrun")


def test_prune_quantize_reads_the_data_of_its_run(prepared64, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"data": str(prepared64), "model": "cnn"}}))
    target = data_target(parse_entry_point(["optimize.prune_quantize", "--run", str(run), "--batch-size", "4"], "L"))
    assert (target.path, target.batch_size) == (prepared64, 4)
    (level, message), = data_checks(target, 5, "use --np {n}")
    assert level == ERROR and "4 train shard files for 5 workers" in message and "use --np 4" in message


def test_train_data_and_batch_come_from_its_config_file(prepared64, tmp_path):
    config = tmp_path / "best.json"
    config.write_text(json.dumps({"data": str(prepared64), "batch_size": 8, "model": "cnn"}))
    target = data_target(parse_entry_point(["distributed.train", "--config", str(config)], "L"))
    assert (target.path, target.batch_size, target.source) == (prepared64, 8, "--config")
    target = data_target(parse_entry_point(["distributed.train", "--config", str(config), "--batch-size", "4"], "L"))
    assert target.batch_size == 4  # flags override the file, as in distributed.train


def test_elastic_dry_run_shows_the_discovery_script_and_the_elastic_command(prepared64, tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:1\n127.0.0.1:1\n")
    code, out, err = run_main(main, ["--np", "2", "--min-np", "1", "--max-np", "2", "--hostfile", str(hostfile),
                                     "--dry-run", "--", "distributed.train", "--data", str(prepared64)], capsys)
    assert code == 0, err
    script_lines = [line[4:] for line in out.splitlines() if line.startswith("#   ")]
    assert script_lines[0] == "#!/bin/sh" and str(hostfile) in "\n".join(script_lines)
    command = out.strip().splitlines()[-1]
    assert "--min-np 1 --max-np 2 --host-discovery-script " in command
    assert "--blacklist-cooldown-range 10 120 --network-interface lo" in command
    assert command.endswith(f"-m distributed.train --data {prepared64} --elastic")
    code, _, err = run_main(main, ["--np", "2", "--min-np", "3", "--dry-run", "--", "distributed.train", "--data",
                                   str(prepared64)], capsys)
    assert code == 2 and "--min-np <= --np <= --max-np" in err
