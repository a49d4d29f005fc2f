"""python -m benchmarks.faults: inject a fault into every stage, on the real Kermany radiographs, and measure
what it costs.

    python -m benchmarks.faults                 # about 15 minutes on 2 cores
    python -m benchmarks.faults --images 800 --out /tmp/bench

Each fault runs against real processes (Ray, horovodrun, Ray Tune), as on a cluster; the pseudo-hosts
`localhost` and `127.0.0.1` stand for two machines:

  preprocess  Ray worker killed     a worker process SIGKILLed in the middle of a task
  preprocess  Ray node stopped      the second node of a two-node Ray cluster killed mid-run
  preprocess  disk full             a 200 KB filesystem under --output, then room again
  train       worker lost, elastic  horovodrun --min-np 1 --max-np 2: a worker SIGKILLed mid-epoch, its host
                                    gone, then back (the job shrinks to 1 worker and grows back to 2)
  train       worker lost           the same kill in a fixed 2-worker job, then --resume
  train       damaged shard         one flipped byte in a train shard
  train       disk full             a 300 KB filesystem under --output, then room again
  tune        trial training killed the training process of a trial SIGKILLed mid-trial

Per fault:
- survived: yes (the run finished without a person), restart (it stopped cleanly with one error line and a
  re-run finished), refused (stopped before training, naming the damage), or no;
- seconds of work lost: training done since the last commit (elastic) or epoch checkpoint (fixed size,
  tuning) when the fault came; for preprocessing, the wall time the fault added to an undisturbed run of the
  same set-up;
- records lost: records of the final shards missing or different from an undisturbed run's, or epochs
  missing or repeated in the history; must be 0;
- time to recover, from the fault: elastic, until training runs again on the survivors; fixed size, until
  the resumed run has written a new epoch (the lost epoch redone); tuning, until the retried trial resumes
  its checkpoint; a Ray worker, until as many tasks run as before; a Ray node, until Ray has declared it
  dead and moved its tasks; a full disk, the re-run's wall time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import DEFAULT_RESULTS, DEFAULT_SHARED_DATA, REPO, check, checks_table, markdown_table, report
from benchmarks.injection import flip_byte, history_rows, kill_workers, processes, ray_nodes, two_node_ray, wait_for
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging

PY = sys.executable
RAY = str(Path(PY).parent / "ray")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", TF_USE_LEGACY_KERAS="1",
           RAY_USAGE_STATS_ENABLED="0")
SALT = b"benchmarks.faults salt, fixed so runs compare"


def popen(cmd: Sequence[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(list(cmd), cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 3600) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return -9, err
    return proc.returncode, err


def prep_cmd(listing: Path, out: Path, salt: Path, *extra: str) -> list[str]:
    return [PY, "-m", "preprocessing", "--input", str(listing), "--output", str(out), "--size", "64", "--shards", "4",
            "--salt-file", str(salt), "-q", *extra]


def shard_records(folder: Path) -> dict[str, tuple[int, str]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {s["file"]: (s["records"], s["sha256"]) for s in manifest["shards"]}


def records_lost(reference: dict, folder: Path) -> int:
    """Records of the reference's shards that `folder` lacks or holds differently (whole shards compared)."""
    if not (folder / "manifest.json").exists():
        return sum(n for n, _ in reference.values())
    got = shard_records(folder)
    return sum(n for name, (n, digest) in reference.items() if got.get(name, (0, ""))[1] != digest)


def chunks_done(out: Path) -> int:
    return len(list((out / ".cxrscale-staging" / "chunks").glob("*.json")))


def row(fault: str, stage: str, survived: str, lost_s: float | None, records: int, recover_s: float | None,
        **extra: Any) -> dict[str, Any]:
    return {"fault": fault, "stage": stage, "survived": survived, "seconds_lost": lost_s, "records_lost": records,
            "recover_seconds": recover_s, **extra}


# --- preprocessing --------------------------------------------------------------------------------------

def preprocess_worker_killed(listing: Path, salt: Path, work: Path, reference: dict, ref_seconds: float) -> dict:
    """Seconds lost: the wall time the fault added to an undisturbed run's; recovered: once as many tasks run
    again as before the kill (Ray has retried the lost one, or moved on)."""
    out, token = work / "p-killed", uuid.uuid4().hex
    shutil.rmtree(out, ignore_errors=True)
    marker = {"CXR_FAULT_TEST": token}
    started = time.time()
    proc = popen(prep_cmd(listing, out, salt, "--workers", "2"), env=dict(ENV, **marker))
    _wait_during(proc, lambda: chunks_done(out) >= 2 and len(processes("ray::process_chunk", marker)) >= 2,
                 "two staged chunks and two running tasks", started)
    running = len(processes("ray::process_chunk", marker))
    killed_at = time.time()
    kill_workers("ray::process_chunk", marker)
    recovered = _when(lambda: len(processes("ray::process_chunk", marker)) >= running, proc, poll=0.005)
    code, err = finish(proc)
    seconds = time.time() - started
    return row("Ray worker killed mid-task", "preprocess", "yes" if code == 0 else "no", seconds - ref_seconds,
               records_lost(reference, out), (recovered - killed_at) if recovered else None, exit=code,
               error=_last(err))


def preprocess_node_stopped(listing: Path, salt: Path, work: Path, reference: dict) -> dict:
    """On a two-node cluster: seconds lost against an undisturbed run on the same cluster; recovered: once
    Ray has declared the node dead, when its tasks are scheduled again on the head."""
    out, token = work / "p-node", uuid.uuid4().hex
    marker = {"CXR_FAULT_TEST": token}
    env = dict(ENV, RAY_AUTH_MODE="disabled")
    with two_node_ray(RAY, ENV, marker) as (address, second):
        undisturbed = time.time()
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(prep_cmd(listing, out, salt, "--address", address, "--workers", "2"), cwd=REPO, env=env,
                       check=True, capture_output=True)
        undisturbed = time.time() - undisturbed
        shutil.rmtree(out, ignore_errors=True)
        started = time.time()
        proc = popen(prep_cmd(listing, out, salt, "--address", address, "--workers", "2"), env)
        _wait_during(proc, lambda: chunks_done(out) >= 2 and bool(processes("ray::process_chunk", marker)),
                     "a task on the second node", started)
        killed_at = time.time()
        os.killpg(second.pid, signal.SIGKILL)
        kill_workers("ray::", marker)  # its workers go down with it
        recovered = _when(lambda: ray_nodes(RAY, address, env) == 1, proc, poll=0.2)
        code, err = finish(proc)
        seconds = time.time() - started
    return row("Ray node stopped mid-run", "preprocess", "yes" if code == 0 else "no", seconds - undisturbed,
               records_lost(reference, out), (recovered - killed_at) if recovered else None, exit=code,
               undisturbed_seconds=undisturbed, error=_last(err))


def disk_full(stage: str, first: str, second: str, size: str, check_out: str, reference: dict | None,
              work: Path) -> dict:
    """Run `first` with $FS a tmpfs of `size` (a private mount namespace), then `second` with room again."""
    fs = work / f"fs-{stage}"
    shutil.rmtree(fs, ignore_errors=True)
    fs.mkdir(parents=True)
    script = (f'set -u\nmount -t tmpfs -o size={size} tmpfs "$FS"\n'
              f'{first} 2> "$FS/../{stage}-first.err"; echo "first=$?"\n'
              f'mount -o remount,size=200m "$FS"\necho "t0=$(date +%s.%N)"\n'
              f'{second} > /dev/null 2> "$FS/../{stage}-second.err"; echo "second=$?"\n'
              f'echo "t1=$(date +%s.%N)"\n{check_out}\n')
    flags = "-m" if os.geteuid() == 0 else "-rm"
    proc = subprocess.run(["unshare", flags, "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          env=dict(ENV, FS=str(fs), PY=PY), timeout=3600)
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    message = _last((work / f"{stage}-first.err").read_text()) if (work / f"{stage}-first.err").exists() else ""
    clean = values.get("first") == "2" and message.startswith("error: no space left on the device")
    finished = values.get("second") == "0"
    lost = int(values.get("records_lost", "0")) if reference is not None else int(values.get("epochs_bad", "0"))
    return row("disk full", stage, "restart" if clean and finished else "no", None, lost,
               float(values["t1"]) - float(values["t0"]) if finished else None, message=message)


# --- training -------------------------------------------------------------------------------------------

def train_args(data: Path, run: Path, epochs: int) -> list[str]:
    return ["distributed.train", "--data", str(data), "--output", str(run), "--epochs", str(epochs),
            "--batch-size", "32", "--commit-every", "5", "--early-stopping-patience", "50"]


def contiguous(run: Path, epochs: int) -> int:
    """Epochs missing or repeated in the history."""
    got = [int(r["epoch"]) for r in history_rows(run)]
    return abs(len(got) - epochs) + sum(1 for a, b in zip(got, range(1, epochs + 1)) if a != b)


def train_elastic(data: Path, work: Path, epochs: int) -> dict:
    run, hosts = work / "t-elastic", work / "t-elastic-hosts"
    shutil.rmtree(run, ignore_errors=True)
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    proc = popen([PY, "-m", "launch.local", "--np", "2", "--min-np", "1", "--max-np", "2", "--hostfile", str(hosts),
                  "--cooldown", "1", "2", "--", *train_args(data, run, epochs)])
    alive = lambda: proc.poll() is None  # noqa: E731
    wait_for(lambda: len(history_rows(run)) >= 1, 1800, "the first epoch", alive=alive)
    time.sleep(max(1.0, history_rows(run)[0]["train_seconds"] / 2))  # halfway into epoch 2
    hosts.write_text("localhost:1\n")
    killed_at = time.time()
    kill_workers("distributed.train", {"HOROVOD_HOSTNAME": "127.0.0.1"})
    wait_for(lambda: any(int(r.get("workers", 2)) == 1 for r in history_rows(run)), 1800, "an epoch on one worker",
             alive=alive)
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    back_at = time.time()
    code, err = finish(proc)
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").exists() else {}
    resets = (summary.get("elastic") or {}).get("reset_times", [])
    shrink = resets[0] if resets else {}
    grow = next((r for r in resets[1:] if r.get("workers") == 2), {})
    ok = code == 0 and summary.get("ranks_in_sync") and (run / "model" / "saved_model.pb").exists()
    return row("worker SIGKILLed mid-epoch, elastic 1-2", "train", "yes" if ok else "no",
               killed_at - shrink["last_commit_at"] if shrink else None, contiguous(run, epochs),
               shrink["resumed_at"] - killed_at if shrink.get("resumed_at") else None,
               grow_seconds=grow["resumed_at"] - back_at if grow.get("resumed_at") else None,
               workers_per_session=(summary.get("elastic") or {}).get("workers_per_session"), exit=code,
               error="" if ok else _last(err))


def train_fixed(data: Path, work: Path, epochs: int) -> dict:
    run = work / "t-fixed"
    shutil.rmtree(run, ignore_errors=True)
    args = train_args(data, run, epochs)
    proc = popen([PY, "-m", "launch.local", "--np", "2", "--", *args])
    alive = lambda: proc.poll() is None  # noqa: E731
    wait_for(lambda: len(history_rows(run)) >= 1, 1800, "the first epoch", alive=alive)
    time.sleep(max(1.0, history_rows(run)[0]["train_seconds"] / 2))
    killed_at = time.time()
    kill_workers("distributed.train", {"HOROVOD_RANK": "1"})
    code, err = finish(proc)
    ended = time.time()
    checkpoint_at = (run / "checkpoints" / "latest.json").stat().st_mtime
    done = len(history_rows(run))
    resumed = popen([PY, "-m", "launch.local", "--np", "2", "--", *args, "--resume"])
    recovered = _when(lambda: len(history_rows(run)) > done, resumed)
    rcode, rerr = finish(resumed)
    ok = code != 0 and rcode == 0 and (run / "model" / "saved_model.pb").exists()
    return row("worker SIGKILLed mid-epoch, fixed 2 workers + --resume", "train", "restart" if ok else "no",
               killed_at - checkpoint_at, contiguous(run, epochs), (recovered - killed_at) if recovered else None,
               job_ended_after=ended - killed_at, message=_last(err), error="" if ok else _last(rerr))


def train_damaged(data: Path, work: Path) -> dict:
    copy = work / "t-damaged-data"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(data, copy)
    flip_byte(sorted(copy.glob("train-*.tfrecord"))[1])
    started = time.time()
    proc = subprocess.run([PY, "-m", "distributed.train", "--data", str(copy), "--output", str(work / "t-damaged"),
                           "--epochs", "1"], cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    message = _last(proc.stderr)
    refused = proc.returncode == 2 and "does not match its sha256" in message
    shutil.rmtree(work / "t-damaged", ignore_errors=True)
    return row("one flipped byte in a train shard", "train", "refused" if refused else "no", 0.0, 0,
               None, detected_after=time.time() - started, message=message)


# --- tuning ---------------------------------------------------------------------------------------------

def tune_trial_killed(data: Path, work: Path, epochs: int) -> dict:
    out, space = work / "tune-killed", work / "tune-space.json"
    shutil.rmtree(out, ignore_errors=True)
    space.write_text(json.dumps({"lr": {"grid": [1e-3]}, "batch_size": 32, "early_stopping_patience": 50}))
    proc = popen([PY, "-m", "optimize.tune", "--data", str(data), "--search", "grid", "--space", str(space),
                  "--max-epochs", str(epochs), "--output", str(out), "-q"])
    alive = lambda: proc.poll() is None  # noqa: E731
    trial = lambda: next(iter(out.glob("trials/*")), None)  # noqa: E731
    wait_for(lambda: trial() is not None and len(history_rows(trial())) >= 1, 1800, "the trial's first epoch",
             alive=alive)
    time.sleep(max(1.0, history_rows(trial())[0]["train_seconds"] / 2))
    killed_at = time.time()
    kill_workers(str(out / "trials"), {})
    checkpoint_at = (trial() / "checkpoints" / "latest.json").stat().st_mtime
    log = trial() / "train.log"
    recovered = _when(lambda: "resuming after epoch" in log.read_text(errors="replace"), proc)
    code, err = finish(proc)
    results = list(csv.DictReader(open(out / "results.csv"))) if (out / "results.csv").exists() else []
    ok = code == 0 and len(results) == 1 and results[0].get("status") == "completed"
    return row("trial's training SIGKILLed", "tune", "yes" if ok else "no", killed_at - checkpoint_at,
               contiguous(trial(), epochs), (recovered - killed_at) if recovered else None,
               results_rows=len(results), error="" if ok else _last(err))


# --- the suite ------------------------------------------------------------------------------------------

def _wait_during(proc: subprocess.Popen, condition, what: str, started: float, timeout: float = 600) -> float:
    """wait_for `condition` while `proc` runs; if `proc` ends first, the error says how and when it ended."""
    try:
        return wait_for(condition, timeout, what, poll=0.005, alive=lambda: proc.poll() is None)
    except AssertionError as err:
        code, out = finish(proc, timeout=60)
        raise AssertionError(f"{err}: it exited with {code} after {time.time() - started:.1f} s"
                             + (f" ({_last(out)})" if _last(out) else "")) from None


def _when(condition, proc: subprocess.Popen, timeout: float = 1800, poll: float = 0.02) -> float | None:
    """The time.time() at which `condition` first held while `proc` ran, or None."""
    try:
        return wait_for(condition, timeout, "progress", poll=poll, alive=lambda: proc.poll() is None)
    except AssertionError:
        return None


def _last(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def measure(work: Path, images: int, epochs: int) -> dict:
    from preprocessing.sources import patient_subset_csv

    train_dir = DEFAULT_SHARED_DATA / "kermany224" / "train"
    if not train_dir.is_dir():
        raise CxrError(f"the shared Kermany radiographs are not at {train_dir} (set CXR_SHARED_DATA)")
    work.mkdir(parents=True, exist_ok=True)
    listing, salt = work / "subset.csv", work / "salt.bin"
    patient_subset_csv(train_dir, listing, images, seed=14)
    salt.write_bytes(SALT)
    data = work / "prepared"
    shutil.rmtree(data, ignore_errors=True)
    started = time.time()
    subprocess.run(prep_cmd(listing, data, salt, "--workers", "2"), cwd=REPO, env=ENV, check=True, capture_output=True)
    ref_seconds = time.time() - started
    reference = shard_records(data)
    prepare = (f'"$PY" -m preprocessing --input {listing} --output "$FS/p" --size 64 --shards 4 '
               f"--salt-file {salt} -q")
    rows = [preprocess_worker_killed(listing, salt, work, reference, ref_seconds),
            preprocess_node_stopped(listing, salt, work, reference),
            disk_full("preprocess", prepare, prepare, "200k",
                      f'"$PY" -m benchmarks.faults --records-lost "$FS/p" {data}', reference, work),
            train_elastic(data, work, epochs), train_fixed(data, work, epochs), train_damaged(data, work),
            disk_full("train", f'"$PY" -m distributed.train --data {data} --output "$FS/run" --epochs 2',
                      f'"$PY" -m distributed.train --data {data} --output "$FS/run" --epochs 2',
                      "300k", '"$PY" -m benchmarks.faults --epochs-bad "$FS/run" 2', None, work),
            tune_trial_killed(data, work, max(3, epochs - 2))]
    return {"images": images, "epochs": epochs, "reference_preprocess_seconds": ref_seconds,
            "train_records": sum(n for name, (n, _) in reference.items() if name.startswith("train")), "faults": rows}


def summarise(results: dict) -> tuple[list[dict], str]:
    rows = results["faults"]
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    header = ["fault", "stage", "survived", "seconds of work lost", "records lost", "time to recover (s)"]
    table = markdown_table(header, [[r["fault"], r["stage"], r["survived"], fmt(r["seconds_lost"]), r["records_lost"],
                             fmt(r["recover_seconds"])] for r in rows])
    checks = [check("records lost, all faults", float(sum(r["records_lost"] for r in rows)), "<=", 0),
              check("faults survived, restarted or refused", float(sum(r["survived"] != "no" for r in rows)), ">=",
                    float(len(rows)))]
    elastic = next((r for r in rows if "elastic" in r["fault"]), None)
    notes = ""
    if elastic and elastic.get("recover_seconds") is not None:
        notes = (f"\n\nElastic 2-worker run: back to training {elastic['recover_seconds']:.1f} s after the kill on one "
                 f"worker (sessions {elastic.get('workers_per_session')}), grown back to two "
                 f"{fmt(elastic.get('grow_seconds'))} s after the host returned.")
    return checks, (f"{results['images']} real radiographs (Kermany train split, whole patients), 64 px, "
                    f"{results['epochs']} epochs of the CNN.\n\n" + table + notes + "\n\n" + checks_table(checks))


def run_suite(quick: bool, work: Path) -> dict:
    return measure(work / "faults", 800 if quick else 2400, 4 if quick else 6)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="examples:\n  python -m benchmarks.faults\n"
                             "  python -m benchmarks.faults --images 800 --epochs 4 --out /tmp/bench")
    p.add_argument("--images", type=int, default=1200, help="real radiographs to use, whole patients (default 1200)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each training run (default 5)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "faults", help="scratch folder")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results folder")
    p.add_argument("--records-lost", nargs=2, metavar=("FOLDER", "REFERENCE"), help=argparse.SUPPRESS)
    p.add_argument("--epochs-bad", nargs=2, metavar=("RUN", "EPOCHS"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.records_lost:  # helpers run inside the small filesystem's namespace
        print(f"records_lost={records_lost(shard_records(Path(args.records_lost[1])), Path(args.records_lost[0]))}")
        return 0
    if args.epochs_bad:
        print(f"epochs_bad={contiguous(Path(args.epochs_bad[0]), int(args.epochs_bad[1]))}")
        return 0
    if args.images < 200 or args.epochs < 3:
        raise CxrError("--images must be at least 200 and --epochs at least 3")
    setup_logging()
    results = measure(args.work, args.images, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    report(args.out, "faults", results, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
