"""Training options no other test trains with, each in a real run: mixed_float16 under Horovod (its
LossScaleOptimizer around the DistributedOptimizer, checkpoint, resume, float32 export), --class-weights,
the learning-rate warm-up and more than two classes end to end, and --cache-features on two workers."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.launch.cli import run_in_process
from tests.training_fixtures import (prepare, prepared32_fullbatch, prepared64, quiet, run_train,  # noqa: F401
                                     sample_images)


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def serve(run: Path, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    out = tf.saved_model.load(str(run / "model")).signatures["serving_default"](image=tf.constant(images))
    value = next(iter(out.values()))
    assert value.dtype == tf.float32  # the export is float32 whatever the training policy
    return value.numpy()


@pytest.mark.slow
def test_mixed_float16_on_two_workers_checkpoints_resumes_and_exports_float32(prepared64, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(prepared64), "--model", "cnn", "--batch-size", "16", "--precision", "mixed_float16",
              "--output", str(run)]
    first = run_train(*common, "--epochs", "1", np_=2)
    assert first.returncode == 0, quiet(first.stderr)
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["precision"] == "mixed_float16"
    import tensorflow as tf

    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    names = [name for name, _ in tf.train.list_variables(str(run / "checkpoints" / latest["checkpoint"] / "ckpt"))]
    # the loss scale is part of the optimizer's checkpointed state (LossScaleOptimizer outermost)
    assert any("loss_scale" in n for n in names), names[:20]
    # the loss scale restored on one worker, under tf.distribute: the LossScaleOptimizer built in the
    # strategy's scope takes Horovod's checkpoint as it is
    resumed = run_train(*common, "--epochs", "2", "--resume", "--backend", "tf")
    assert resumed.returncode == 0, quiet(resumed.stderr)
    assert json.loads((run / "train_summary.json").read_text())["backend"] == "tf"
    rows = history(run)
    assert "resuming after epoch 1" in resumed.stderr
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    probs = serve(run, np.random.default_rng(0).integers(0, 256, (4, 64, 64, 1), dtype=np.uint8))
    assert np.all(np.isfinite(probs)) and np.all((probs >= 0) & (probs <= 1))


@pytest.fixture(scope="module")
def three_classes(sample_images, tmp_path_factory) -> Path:
    """The sample's radiographs as three classes: NORMAL, and PNEUMONIA split into BACTERIA and VIRUS by
    the dataset's own file names (Kermany's three-class task)."""
    root = tmp_path_factory.mktemp("three") / "images"
    for path in sorted((sample_images / "train").rglob("*.jpeg")):
        cls = path.parent.name if path.parent.name == "NORMAL" else ("VIRUS" if "virus" in path.name else "BACTERIA")
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / cls / path.name)
    assert {p.name for p in root.iterdir()} == {"NORMAL", "BACTERIA", "VIRUS"}
    return prepare(root, root.parent / "prepared", "--size", "64", "--shards", "4", "--test-fraction", "0.2")


@pytest.mark.slow
def test_three_classes_with_class_weights_and_warm_up_train_and_evaluate(three_classes, tmp_path):
    run = tmp_path / "run"
    result = run_train("--data", str(three_classes), "--model", "cnn", "--epochs", "3", "--batch-size", "8",
                       "--class-weights", "auto", "--warmup-epochs", "2", "--lr", "0.001",
                       "--reduce-lr-patience", "100", "--output", str(run), np_=2)
    assert result.returncode == 0, quiet(result.stderr)
    manifest = json.loads((three_classes / "manifest.json").read_text())
    counts = manifest["counts"]["per_split"]["train"]
    config = json.loads((run / "config.json").read_text())
    weights = {int(k): v for k, v in config["resolved"]["class_weights"].items()}
    total = sum(counts[c] for c in manifest["classes"])
    for i, cls in enumerate(manifest["classes"]):  # scikit-learn's "balanced": n / (K n_c)
        assert weights[i] == pytest.approx(total / (3 * counts[cls]))
    lrs = [r["lr"] for r in history(run)]
    # warm-up on 2 workers: from the single-worker rate to 2 x 0.001 over two epochs, then held
    assert lrs[0] < lrs[1] <= lrs[2] and lrs[2] == pytest.approx(0.002)
    assert serve(run, np.zeros((2, 64, 64, 1), np.uint8)).shape == (2, 3)
    evaluated = run_in_process("distributed.evaluate", "--run", str(run), "--bootstrap", "50")
    assert evaluated.returncode == 0, quiet(evaluated.stderr)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["classes"] == manifest["classes"]
    assert metrics["n"] == manifest["counts"]["per_split"]["test"]["total"]


def test_mixup_on_a_softmax_head_is_refused_before_the_run_folder_is_made(three_classes, tmp_path):
    run = tmp_path / "run"
    result = run_train("--data", str(three_classes), "--model", "cnn", "--epochs", "1", "--augment",
                       "--mixup", "0.2", "--output", str(run))
    assert result.returncode == 2, quiet(result.stderr)
    assert "--mixup mixes labels as probabilities" in result.stderr and "Traceback" not in result.stderr
    assert not run.exists()
