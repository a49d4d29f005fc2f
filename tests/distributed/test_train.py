"""distributed.train end to end: real TensorFlow, real Horovod processes over Gloo (horovodrun -np 2)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PYTHON, REPO
from tests.training_fixtures import HOROVODRUN, prepare, quiet, run_train


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text())


@pytest.mark.slow
def test_cached_features_train_the_same_head(prepared32_fullbatch, tmp_path):
    """Frozen VGG16: the head trained on cached features on two workers (each caching its own shard) equals
    the head trained through the backbone on one, full-batch steps of the same 64 images."""
    common = ["--data", str(prepared32_fullbatch), "--model", "vgg16", "--weights", "none", "--freeze-base",
              "--dropout", "0", "--epochs", "3", "--seed", "5", "--warmup-epochs", "0"]
    plain = run_train(*common, "--batch-size", "64", "--lr", "1e-3", "--output", str(tmp_path / "plain"))
    assert plain.returncode == 0, quiet(plain.stderr)
    cached = run_train(*common, "--batch-size", "32", "--lr", "5e-4", "--cache-features",
                       "--output", str(tmp_path / "cached"), np_=2)
    assert cached.returncode == 0, quiet(cached.stderr)
    assert "cached backbone features" in cached.stderr
    assert history(tmp_path / "cached")[0]["workers"] == 2
    np.testing.assert_allclose([r["loss"] for r in history(tmp_path / "cached")],
                               [r["loss"] for r in history(tmp_path / "plain")], rtol=1e-3)
    # the same two cached workers under tf.distribute (each caches through the plain copy of the model, the
    # head it fits is the strategy's): Horovod's curve
    on_tf = subprocess.run([PYTHON, "-m", "launch.local", "--backend", "tf", "--np", "2", "--", "distributed.train",
                            *common, "--batch-size", "32", "--lr", "5e-4", "--cache-features", "--output",
                            str(tmp_path / "tf")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert on_tf.returncode == 0, quiet(on_tf.stderr)[-3000:]
    np.testing.assert_allclose([r["loss"] for r in history(tmp_path / "tf")],
                               [r["loss"] for r in history(tmp_path / "cached")], rtol=1e-4)
    import tensorflow as tf

    images = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), dtype=np.uint8))
    outs = [next(iter(tf.saved_model.load(str(tmp_path / name / "model")).signatures["serving_default"](
        image=images).values())).numpy() for name in ("plain", "cached")]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


def corrupt_copy(src: Path, dst: Path, **manifest_changes) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


BAD_INPUT = {  # case: what the one error line says
    "batch": "is larger than the train split",
    "schema": "schema version 99",
    "small": "needs images of at least 32 px",
    "resume": "no complete checkpoint",
    "cache-augment": "cannot be combined with --augment",
    "missing": "not found",
    "unknown-model": "invalid choice",
}


def test_bad_input_exits_2_before_training(prepared64, tmp_path):
    """Each mistake in its own training process (two at a time): exit 2, one line, no checkpoint written."""
    from concurrent.futures import ThreadPoolExecutor

    def args(case: str) -> list[str]:
        data, extra = str(prepared64), []
        if case == "batch":
            extra = ["--batch-size", "100000"]
        elif case == "schema":
            data = str(corrupt_copy(prepared64, tmp_path / "v99", schema_version=99))
        elif case == "small":
            data = str(corrupt_copy(prepared64, tmp_path / "tiny", image_shape=[16, 16, 1]))
            extra = ["--model", "vgg16", "--weights", "none"]
        elif case == "resume":
            extra = ["--resume"]
        elif case == "cache-augment":
            extra = ["--model", "vgg16", "--freeze-base", "--cache-features", "--augment"]
        elif case == "missing":
            data = str(tmp_path / "nowhere")
        elif case == "unknown-model":
            extra = ["--model", "alexnet"]
        return ["--data", data, "--output", str(tmp_path / f"run-{case}"), "--epochs", "1", *extra]

    cases = {case: args(case) for case in BAD_INPUT}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(lambda a: run_train(*a), cases.values())))
    for case, message in BAD_INPUT.items():
        result = results[case]
        assert result.returncode == 2, (case, quiet(result.stderr))
        assert message in result.stderr and "Traceback" not in result.stderr, (case, quiet(result.stderr))
        assert not (tmp_path / f"run-{case}" / "checkpoints").exists(), case


def test_fewer_shards_than_workers_stops_every_worker(sample_images, tmp_path):
    data = prepare(sample_images, tmp_path / "one-shard", "--size", "32", "--shards", "1")
    started = time.time()
    result = run_train("--data", str(data), "--output", str(tmp_path / "run"), np_=2, timeout=300,
                       runner=(HOROVODRUN,))  # the README's own horovodrun
    assert result.returncode != 0
    assert "1 train shard files for 2 workers" in result.stderr + result.stdout
    assert time.time() - started < 240  # no rank is left waiting for the other


def test_help(capsys):
    from distributed.train import main
    from tests.launch.cli import run_main

    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0 and "horovodrun -np 4" in out and "--cache-features" in out


def test_a_run_killed_after_its_last_epoch_finishes_its_export_on_resume(sample_run, tmp_path):
    """Killed between the last epoch's checkpoint and the summary (during calibration or export): --resume
    does not refuse ("already trained"), it calibrates and exports; a finished run still refuses."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sample_run, run)
    shutil.rmtree(run / "model")
    (run / "train_summary.json").unlink()
    (run / "calibration.json").unlink()
    config = json.loads((run / "config.json").read_text())["config"]
    args = ["--data", config["data"], "--model", "cnn", "--epochs", "2", "--batch-size", "16", "--output", str(run),
            "--resume"]
    result = run_train(*args)
    assert result.returncode == 0, quiet(result.stderr)
    assert (run / "model" / "saved_model.pb").is_file() and (run / "calibration.json").is_file()
    assert summary(run)["epochs_completed"] == 2 and summary(run)["epochs_this_session"] == 0
    again = run_train(*args)
    assert again.returncode == 2 and "already trained 2 epochs" in again.stderr


def test_cosine_rate_warms_up_then_decays_to_one_percent():
    from distributed.training.callbacks import CosineLearningRate

    schedule = CosineLearningRate(1e-4, 1e-3, warmup_epochs=1, epochs=5, steps_per_epoch=10)
    rates = [schedule.rate(step) for step in range(50)]
    assert rates[0] == pytest.approx(1e-4 + 9e-4 / 10) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # monotone decay after the warm-up
    assert schedule.rate(50) == pytest.approx(1e-5)


def test_robust_recipe_options_ema_and_bfloat16_train_together(prepared64, tmp_path):
    """--augment, --mixup, --label-smoothing, --schedule cosine, --ema and --precision mixed_bfloat16 in one
    real run: the rate follows the cosine curve (per epoch, as history.csv records it at the epoch end) and the run
    exports a calibrated float32 model, whatever the training policy."""
    run = tmp_path / "run"
    result = run_train("--data", str(prepared64), "--model", "cnn", "--epochs", "3", "--batch-size", "16",
                       "--augment", "--mixup", "0.2", "--label-smoothing", "0.1", "--schedule", "cosine",
                       "--warmup-epochs", "1", "--ema", "0.9", "--precision", "mixed_bfloat16", "--output", str(run))
    assert result.returncode == 0, quiet(result.stderr)
    rows = history(run)
    lrs = [r["lr"] for r in rows]
    assert lrs[0] > lrs[1] > lrs[2] > 0 and all(np.isfinite(r["loss"]) for r in rows)
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["label_smoothing"] == 0.1 and config["config"]["schedule"] == "cosine"
    assert config["config"]["mixup"] == 0.2
    assert config["config"]["ema"] == 0.9 and config["resolved"]["precision"] == "mixed_bfloat16"
    import tensorflow as tf

    exported = tf.saved_model.load(str(run / "model"))
    out = exported.signatures["serving_default"](image=tf.zeros((2, 64, 64, 1), tf.uint8))
    assert next(iter(out.values())).dtype == tf.float32


def test_weight_average_is_the_ema_of_the_steps_and_training_continues_from_the_raw_weights():
    from distributed.training.callbacks import WeightAverage
    from distributed.model.kerasenv import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    steps: list[np.ndarray] = []
    seen_at_epoch_end: list[np.ndarray] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(self.model.get_weights()[0].copy())

        def on_epoch_end(self, epoch, logs=None):
            seen_at_epoch_end.append(self.model.get_weights()[0].copy())

    initial = model.get_weights()[0].copy()
    average = WeightAverage(0.5)
    x, y = np.random.default_rng(0).normal(size=(32, 3)), np.random.default_rng(1).normal(size=(32, 1))
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[Record(), average, Record(), average.restore_callback()])
    steps = steps[0::2]  # each step was recorded twice, once by each Record
    ema = initial
    for t, w in enumerate(steps, start=1):  # the decay warms up: min(decay, (1 + t) / (10 + t))
        d = min(0.5, (1 + t) / (10 + t))
        ema = d * ema + (1 - d) * w
    np.testing.assert_allclose(model.get_weights()[0], ema, rtol=1e-5)  # training ends on the average
    raw_epoch1, averaged_epoch1 = seen_at_epoch_end[0], seen_at_epoch_end[1]
    np.testing.assert_allclose(raw_epoch1, steps[3])  # before the swap: the raw weights
    assert not np.allclose(averaged_epoch1, raw_epoch1)  # after it: the average, which validation sees
    # epoch 2 trained on from the raw weights, not from the average
    sgd_from_raw = steps[4] - raw_epoch1
    assert np.abs(sgd_from_raw).max() < np.abs(steps[4] - averaged_epoch1).max()
