"""Fixtures for training, evaluation and optimize tests (a pytest plugin, see tests/conftest.py): small prepared
datasets, trained runs, and runners for the real CLI and horovodrun."""
from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

from preprocessing.sample import generate_sample
from preprocessing.sources import patient_subset_csv
from tests.conftest import PYTHON, REPO

HOROVODRUN = str(Path(PYTHON).parent / "horovodrun")
NOISE = ("cudart_stub", "port.cc", "All log messages before", "cuInit", "cpu_feature_guard", "rebuild TensorFlow",
         "Sharding callback")


def quiet(text: str) -> str:
    """TensorFlow's start-up chatter removed, for readable assertion messages."""
    return "\n".join(line for line in text.splitlines() if not any(n in line for n in NOISE))


# Several workers start as the toolkit's launchers start them (launch.horovodrun: horovodrun without its
# per-launch build probe); the README's plain `horovodrun` is run by the tests that pass runner=(HOROVODRUN,).
LAUNCHER = (PYTHON, "-m", "launch.horovodrun")


def train_cmd(*args: str, np_: int = 1, runner: tuple[str, ...] = LAUNCHER) -> list[str]:
    base = [PYTHON, "-m", "distributed.train", *args]
    return [*runner, "-np", str(np_), "--gloo", *base] if np_ > 1 else base


def run_train(*args: str, np_: int = 1, timeout: float = 900,
              runner: tuple[str, ...] = LAUNCHER) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.run(train_cmd(*args, np_=np_, runner=runner), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def prepare(input_path: Path, output: Path, *args: str) -> Path:
    """`python -m preprocessing` with --workers 1: in its own process without Ray, the same files Ray writes
    (tests/preprocessing/test_prepare.py checks this) without Ray's start-up."""
    result = subprocess.run([PYTHON, "-m", "preprocessing", "--input", str(input_path), "--output", str(output),
                             "--workers", "1", "-q", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, n_normal=40, n_pneumonia=88, size=96)
    return root


@pytest.fixture(scope="session")
def prepared64(sample_images, tmp_path_factory) -> Path:
    """128 synthetic images at 64 px, 4 train shards (enough for 2 workers)."""
    return prepare(sample_images, tmp_path_factory.mktemp("p") / "prepared64", "--size", "64", "--shards", "4")


@pytest.fixture(scope="session")
def findings32(tmp_path_factory) -> Path:
    """The multi-label sample (four rendered findings), 160 images at 32 px, two train shards and a test
    split, some labels made unknown (-1) to exercise the mask. The rendered images and labels.csv are in
    ../sample."""
    from preprocessing.sample import generate_findings_sample

    root = tmp_path_factory.mktemp("findings")
    generate_findings_sample(root / "sample", 160, 96, seed=1)
    table = (root / "sample" / "labels.csv").read_text().splitlines()
    rows = [table[0]] + [line if k % 9 else line.rsplit(",", 1)[0] + ",-1" for k, line in enumerate(table[1:])]
    (root / "sample" / "masked.csv").write_text("\n".join(rows) + "\n")
    return prepare(root / "sample" / "masked.csv", root / "p32", "--size", "32", "--shards", "2",
                   "--val-fraction", "0.25", "--test-fraction", "0.2")


@pytest.fixture(scope="session")
def prepared32_fullbatch(sample_images, tmp_path_factory) -> Path:
    """64 train images in exactly two shards of 32 and 16 validation images, at 32 px: a full-batch step
    then sees the same data on one worker (batch 64) as on two (batch 32 each)."""
    images = sorted(sample_images.rglob("*.jpeg"))
    normal = [p for p in images if p.parent.name == "NORMAL"]
    pneumonia = [p for p in images if p.parent.name == "PNEUMONIA"]
    rows = [(p, "train") for p in normal[:20] + pneumonia[:44]] + [(p, "val") for p in normal[20:25] + pneumonia[44:55]]
    folder = tmp_path_factory.mktemp("p")
    with open(folder / "list.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows([(str(p), p.parent.name, split) for p, split in rows])
    return prepare(folder / "list.csv", folder / "prepared32", "--size", "32", "--shards", "2",
                   "--test-fraction", "0")


def real_subset_csv(shared_data: Path, out: Path, n_images: int = 1300, seed: int = 0) -> Path:
    """A CSV of whole patients drawn at random from the real Kermany train split, about n_images images."""
    return patient_subset_csv(shared_data / "kermany224" / "train", out, n_images, seed)


@pytest.fixture(scope="session")
def sample_run(prepared64, tmp_path_factory) -> Path:
    """The CNN trained for 2 epochs on the synthetic sample at 64 px (one worker): a complete run folder."""
    run = tmp_path_factory.mktemp("runs") / "sample-cnn"
    result = run_train("--data", str(prepared64), "--model", "cnn", "--epochs", "2", "--batch-size", "16",
                       "--output", str(run))
    assert result.returncode == 0, quiet(result.stderr)
    return run


@pytest.fixture(scope="session")
def real_run(shared_data, tmp_path_factory) -> dict:
    """About 600 real radiographs at 64 px, split by patient into train/val/test with a fixed salt (so record
    ids can be recomputed from file paths), and the CNN trained on them for 4 epochs."""
    folder = tmp_path_factory.mktemp("real")
    salt = folder / "salt"
    salt.write_bytes(b"cxrscale-test-salt")
    csv_path = real_subset_csv(shared_data, folder / "subset.csv", n_images=600, seed=1)
    data = prepare(csv_path, folder / "prepared", "--size", "64", "--val-fraction", "0.25", "--test-fraction",
                   "0.25", "--salt-file", str(salt))
    run = folder / "run"
    result = run_train("--data", str(data), "--model", "cnn", "--epochs", "4", "--batch-size", "32",
                       "--output", str(run))
    assert result.returncode == 0, quiet(result.stderr)
    return {"data": data, "run": run, "csv": csv_path, "salt": salt.read_bytes()}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifact root), for the session: its URI."""
    import socket
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    log_file = open(folder / "server.log", "w")
    server = subprocess.Popen([str(Path(PYTHON).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--default-artifact-root", (folder / "artifacts").as_uri()],
                              stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                              # no server-side job runner: its ~8 huey consumers hold 2 GB and are not needed
                              env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log_file.close()


def closed_port_uri() -> str:
    """An http:// URI on 127.0.0.1 where nothing listens (a tracking server that is down)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
