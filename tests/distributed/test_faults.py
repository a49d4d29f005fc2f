"""Training under injected faults, with real processes: Horovod elastic over two pseudo-hosts (`localhost`
and `127.0.0.1`, as Horovod's own test/integration/elastic_common.py does) whose hosts file the test edits
while the job runs, a non-elastic job losing a worker, a damaged shard, and a full disk."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO
from benchmarks.injection import flip_byte, history_rows, kill_workers, wait_for
from tests.training_fixtures import quiet, run_train

BOTH = "localhost:1\n127.0.0.1:1\n"
ONE = "localhost:1\n"


def workers_of(run: Path) -> str:
    """What only this job's training processes hold in their command line (their --output): a job of a test
    running beside it in another pytest-xdist worker is never the one killed."""
    return str(run)


def launch(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen([PYTHON, "-m", "launch.local", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the job hung:\n{quiet(err)[-3000:]}")
    return proc.returncode, out, err


def train_args(data: Path, run: Path, epochs: int) -> list[str]:
    return ["distributed.train", "--data", str(data), "--output", str(run), "--epochs", str(epochs),
            "--batch-size", "8", "--commit-every", "2", "--early-stopping-patience", "50", "--reduce-lr-patience", "50",
            "--seed", "4"]


def epochs_done(run: Path) -> int:
    return len(history_rows(run))


def checkpointed(run: Path) -> int:
    """The epoch of the run's last complete checkpoint (0: none yet)."""
    try:
        return int(json.loads((run / "checkpoints" / "latest.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_elastic_job_survives_a_killed_worker_and_grows_back_when_its_host_returns(findings32, tmp_path):
    # on the multi-label sample: its masked loss, label weights and macro AUC go through the elastic resets too
    hosts, run = tmp_path / "hosts", tmp_path / "run"
    hosts.write_text(BOTH)
    # the survivor's epochs take about 0.3 s, and the host's return reaches it after Horovod's next look at the
    # hosts file, the host's cooldown and a commit; 20 epochs leave it seconds for that, where 10 left a race
    # that a busy machine lost (the job ended on one worker)
    epochs = 20
    proc = launch(["--np", "2", "--min-np", "1", "--max-np", "2", "--hostfile", str(hosts), "--cooldown", "1", "2",
                   "--", *train_args(findings32, run, epochs)])
    alive = lambda: proc.poll() is None  # noqa: E731
    wait_for(lambda: epochs_done(run) >= 2, 300, "two epochs on two workers", alive=alive)
    time.sleep(0.4)  # into epoch 3
    hosts.write_text(ONE)  # the node is gone ...
    # ... and its worker
    assert kill_workers(workers_of(run), {"HOROVOD_HOSTNAME": "127.0.0.1"}), "no worker on 127.0.0.1"
    wait_for(lambda: any(r["workers"] == 1 for r in history_rows(run)), 120, "an epoch finished by the survivor",
             alive=alive)
    hosts.write_text(BOTH)  # the node is back
    code, out, err = finish(proc)
    assert code == 0, quiet(err)[-4000:]

    rows = history_rows(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1)), "an epoch was repeated or skipped"
    workers = [int(r["workers"]) for r in rows]
    assert workers[:2] == [2, 2] and 1 in workers and workers[-1] == 2, workers
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["ranks_in_sync"] and len(summary["weight_checksums_by_rank"]) == 2
    assert summary["elastic"]["workers_per_session"][:3] == [2, 1, 2], summary["elastic"]
    assert (run / "model" / "saved_model.pb").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["head"]["kind"] == "multilabel" and all(0 <= float(r["val_auc"]) <= 1 for r in rows)
    # the survivor went on from its last commit (in the epoch the kill fell in, 3 or later on these short
    # epochs, or the one before if the kill beat its end-of-epoch commit), at the learning rate of one worker
    # (1e-3), and at two workers' (2e-3) again once the host was back
    assert re.search(r"elastic reset: 1 worker\(s\) now; training goes on in epoch \d+ after \d+ of its images", err)
    assert {(int(r["workers"]), round(r["lr"], 6)) for r in rows} == {(2, 2e-3), (1, 1e-3)}
    first = summary["elastic"]["reset_times"][0]
    assert first["workers"] == 1 and first["last_commit_at"] <= first["reset_at"] <= first["resumed_at"]


@pytest.mark.slow
def test_elastic_job_below_min_np_past_its_timeout_stops_with_one_line_and_resumes(prepared64, tmp_path):
    hosts, run = tmp_path / "hosts", tmp_path / "run"
    hosts.write_text(BOTH)
    proc = launch(["--np", "2", "--min-np", "2", "--max-np", "2", "--hostfile", str(hosts), "--elastic-timeout", "5",
                   "--", *train_args(prepared64, run, 6)])
    wait_for(lambda: checkpointed(run) >= 1, 300, "the first epoch's checkpoint", alive=lambda: proc.poll() is None)
    hosts.write_text(ONE)
    killed_at = time.time()
    assert kill_workers(workers_of(run), {"HOROVOD_HOSTNAME": "127.0.0.1"})
    code, out, err = finish(proc, timeout=120)
    assert code != 0 and time.time() - killed_at < 60, "the job neither failed nor stopped in time"
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the elastic job stayed below --min-np 2") and "--resume" in last, err[-2000:]
    assert "Traceback" not in err, "horovodrun's traceback reached the user"
    state = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert state["epoch"] >= 1 and not (run / "model").exists()

    resumed = run_train("--data", str(prepared64), "--output", str(run), "--epochs", "6", "--batch-size", "8",
                        "--resume")
    assert resumed.returncode == 0, quiet(resumed.stderr)[-3000:]
    assert [int(r["epoch"]) for r in history_rows(run)] == list(range(1, 7))


@pytest.mark.slow
def test_a_non_elastic_job_losing_a_worker_ends_at_once_naming_it_and_resumes(prepared64, tmp_path):
    run = tmp_path / "run"
    proc = launch(["--np", "2", "--", *train_args(prepared64, run, 4)])
    wait_for(lambda: checkpointed(run) >= 1, 300, "the first epoch's checkpoint", alive=lambda: proc.poll() is None)
    killed_at = time.time()
    assert kill_workers(workers_of(run), {"HOROVOD_RANK": "1"})
    code, out, err = finish(proc, timeout=120)
    assert code != 0 and time.time() - killed_at < 15
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: worker rank 1 was lost (killed by SIGKILL)") and "--resume" in last, err[-2000:]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["epoch"] >= 1

    resumed = run_train(*train_args(prepared64, run, 4)[1:], "--resume")  # on the one worker left
    assert resumed.returncode == 0, quiet(resumed.stderr)[-3000:]
    assert [int(r["epoch"]) for r in history_rows(run)] == [1, 2, 3, 4]
    assert json.loads((run / "train_summary.json").read_text())["ranks_in_sync"]


def test_a_damaged_shard_is_named_before_training_starts(prepared64, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared64, data)
    shard = data / "train-00002-of-00004.tfrecord"
    flip_byte(shard)
    result = run_train("--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {shard} does not match its sha256 in {data / 'manifest.json'}: the shard is damaged (a changed "
        "byte); prepare the dataset again")
    assert not (tmp_path / "run" / "checkpoints").exists(), "training started on a damaged dataset"


def small_filesystem_runner(tmp_path: Path, size: str, script: str) -> subprocess.CompletedProcess:
    """Run the shell `script` with $FS a fresh tmpfs of `size`, in a private mount namespace (root: unshare
    -m; otherwise a user namespace, unshare -rm), so the test needs no cleanup and touches no real mount."""
    fs = tmp_path / "fs"
    fs.mkdir()
    unshare = shutil.which("unshare")
    assert unshare, "util-linux's unshare is needed to make a small filesystem"
    flags = "-m" if os.geteuid() == 0 else "-rm"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", FS=str(fs), PY=PYTHON)
    full = f"set -u\nmount -t tmpfs -o size={size} tmpfs \"$FS\"\n{script}"
    return subprocess.run([unshare, flags, "sh", "-c", full], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow
def test_a_full_disk_while_training_and_exporting_is_one_line_and_a_rerun_continues(prepared64, tmp_path):
    # 300 KB holds the run's record but not a checkpoint (about 5 MB); then 40 MB holds everything; then
    # the export alone fails on a nearly full disk and succeeds with room
    script = f"""
"$PY" -m distributed.train --data {prepared64} --output "$FS/run" --epochs 2 --batch-size 16 2> "$FS/../first.err"
echo "first=$?"
find "$FS/run" -name '*.tmp' -o -name '.*' | sed 's/^/left: /'
[ -e "$FS/run/checkpoints/latest.json" ] && echo "latest exists"
mount -o remount,size=40m "$FS"
"$PY" -m distributed.train --data {prepared64} --output "$FS/run" --epochs 2 --batch-size 16 2> "$FS/../second.err"
echo "second=$?"
[ -f "$FS/run/model/saved_model.pb" ] && echo "exported"
# the export alone: a run killed after its last epoch, resumed on a disk with about 200 KB left
rm -rf "$FS/run/model" "$FS/run/train_summary.json"
dd if=/dev/zero of="$FS/filler" bs=1k count=$(( $(df -k --output=avail "$FS" | tail -1) - 200 )) 2>/dev/null
"$PY" -m distributed.train --data {prepared64} --output "$FS/run" --epochs 2 --batch-size 16 --resume \
    2> "$FS/../third.err"
echo "third=$?"
[ -e "$FS/run/model" ] && echo "model exists"
find "$FS/run" -name '.*' | sed 's/^/left3: /'
rm "$FS/filler"
"$PY" -m distributed.train --data {prepared64} --output "$FS/run" --epochs 2 --batch-size 16 --resume \
    2> "$FS/../fourth.err"
echo "fourth=$?"
[ -f "$FS/run/model/saved_model.pb" ] && echo "exported again"
"""
    result = small_filesystem_runner(tmp_path, "300k", script)
    first_err = (tmp_path / "first.err").read_text()
    assert "first=2" in result.stdout, result.stdout + quiet(first_err)[-3000:]
    assert first_err.strip().splitlines()[-1].startswith(
        f"error: no space left on the device writing {tmp_path / 'fs' / 'run' / 'checkpoints'}")
    assert "left:" not in result.stdout, "a half-written file or temporary folder was left behind"
    assert "latest exists" not in result.stdout, "a checkpoint that was never completed is pointed at"
    assert "second=0" in result.stdout and "exported" in result.stdout, \
        result.stdout + quiet((tmp_path / "second.err").read_text())[-3000:]
    third_err = (tmp_path / "third.err").read_text()
    assert "third=2" in result.stdout, result.stdout + quiet(third_err)[-3000:]
    assert third_err.strip().splitlines()[-1].startswith(
        f"error: no space left on the device writing {tmp_path / 'fs' / 'run'}")
    assert "model exists" not in result.stdout and "left3:" not in result.stdout, result.stdout
    assert "fourth=0" in result.stdout and "exported again" in result.stdout, \
        result.stdout + quiet((tmp_path / "fourth.err").read_text())[-3000:]


@pytest.mark.slow
def test_a_full_disk_while_writing_shards_is_one_line_and_a_rerun_finishes(sample_images, tmp_path):
    prepare = f'"$PY" -m preprocessing --input {sample_images} --output "$FS/p" --size 64 --shards 4 --workers 2 -q'
    script = f"""
{prepare} 2> "$FS/../first.err"
echo "first=$?"
[ -e "$FS/p/manifest.json" ] && echo "manifest exists"
find "$FS/p" -maxdepth 1 -name '*.tfrecord' | sed 's/^/shard: /'
mount -o remount,size=40m "$FS"
{prepare} > /dev/null 2> "$FS/../second.err"
echo "second=$?"
"$PY" -c "from preprocessing import schema; print('verified', schema.verify_shards('$FS/p', schema.SPLITS))"
"""
    result = small_filesystem_runner(tmp_path, "100k", script)
    first_err = (tmp_path / "first.err").read_text()
    assert "first=2" in result.stdout, result.stdout + first_err[-3000:]
    assert first_err.strip().splitlines()[-1].startswith(
        f"error: no space left on the device writing {tmp_path / 'fs' / 'p'}")
    assert "manifest exists" not in result.stdout, "a manifest was written for shards that are not all there"
    assert "second=0" in result.stdout and "verified 12" in result.stdout, \
        result.stdout + (tmp_path / "second.err").read_text()[-3000:]
