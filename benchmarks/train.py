"""python -m benchmarks.train: training throughput of the thesis's models, measured three ways.

For each model (the CNN at 150 px, ResNet50 fully trainable and VGG16 with its base frozen, as in the
thesis, both at 224 px) and each precision (fp32, mixed_bfloat16):
  plain  - a single-process `model.fit` of the same model on the same shards (the thesis's way);
  np1    - `python -m distributed.train` on one Horovod worker: hvd.init, the toolkit's callbacks and input
           pipeline, but no DistributedOptimizer (one worker has nothing to average): the toolkit's overhead;
  np2    - `horovodrun -np 2 python -m distributed.train` (two workers sharing this machine's cores): np2 / np1
           is the two-worker efficiency users pay for (allreduce included);
  tf-np1, tf-np2 - the same under `--backend tf` (tf.distribute's MultiWorkerMirroredStrategy, two workers
           started by `launch.local --backend tf`, ring all-reduce on CPU), with --backends horovod,tf (default):
           each backend's np2 / np1, and tf-np2 / np2 between the backends.
Throughput is images/s of the training steps, from the epochs after the first (which traces the graph).
This machine's speed drifts by up to 10 % between runs of the same command (measured: plain fits of the CNN
read 43-52 images/s), more than the few per cent these ratios judge. So each setup runs its three modes
--repeats times, in an order rotated each time, and a ratio is the median of the ratios of the runs made side
by side; the report shows their range.
Achieved FLOP/s is images/s x training FLOPs per image (forward x 3 where everything trains; forward +
2 x head forward with a frozen base), as a fraction of this machine's measured float32 matmul FLOP/s.
Also: epoch time of the frozen-VGG16 head with and without --cache-features.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import (DEFAULT_RESULTS, DEFAULT_SHARED_DATA, HOROVODRUN, StolenCpu, check, checks_table,
                               comma_list, markdown_table, model_setups, report, require_dir, run_child, run_command)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import read_numeric_csv

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.
log = logging.getLogger("cxrscale.benchmarks")
# {model: (image size, extra train flags)}: every model of the zoo, as its registry entry says
SETUPS = model_setups()


def make_dataset(source: Path, n_images: int, size: int, out: Path) -> Path:
    """Prepare n_images real radiographs (both classes, first files by name) at `size` px, 4 train shards."""
    import csv

    files = []
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files += sorted(class_dir.glob("*.jpeg"))[: n_images // 2]
    with open(out.parent / f"{out.name}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([(str(p.resolve()), p.parent.name) for p in files])
    run_command([sys.executable, "-m", "preprocessing", "--input", str(out.parent / f"{out.name}.csv"),
                 "--output", str(out), "--size", str(size), "--shards", "4", "--val-fraction", "0.1",
                 "--test-fraction", "0", "-q"], timeout=900)
    return out


def steady_rate(rows: list[dict]) -> float:
    """Median training images/s over the epochs after the first."""
    rates = [float(r["images_per_second"]) for r in rows[1:]] or [float(rows[0]["images_per_second"])]
    return statistics.median(rates)


def run_distributed(data: Path, model: str, precision: str, workers: int, batch: int, epochs: int, extra: list[str],
                    out: Path, backend: str = "horovod") -> dict:
    """One `distributed.train` run (under horovodrun, or tf.distribute workers from launch.local --backend tf):
    {history (history.csv's rows), wall_seconds, feature_pass_seconds (with --cache-features, from its log; else
    None)}."""
    args = ["--data", str(data), "--model", model, "--weights", "none", "--precision", precision, "--epochs",
            str(epochs), "--batch-size", str(batch), "--output", str(out), "--early-stopping-patience", "100",
            "--reduce-lr-patience", "100", "--backend", backend, *extra]
    cmd = [sys.executable, "-m", "distributed.train", *args]
    if workers > 1 and backend == "tf":
        cmd = [sys.executable, "-m", "launch.local", "--backend", "tf", "--np", str(workers), "--",
               "distributed.train", *args]
    elif workers > 1:
        cmd = [HOROVODRUN, "-np", str(workers), "--gloo", *cmd]
    started = time.perf_counter()
    proc = run_command(cmd, timeout=3600)
    wall = time.perf_counter() - started
    found = re.search(r"cached backbone features .* in ([0-9.]+) s", proc.stderr + proc.stdout)
    return {"history": read_numeric_csv(out / "history.csv"), "wall_seconds": wall,
            "feature_pass_seconds": float(found.group(1)) if found else None}


# --- child processes ------------------------------------------------------------------------------------

def child_plain(args: argparse.Namespace) -> dict:
    """The thesis's way: one process, model.fit on the prepared shards, default TensorFlow threading."""
    from distributed.model.kerasenv import keras
    import tensorflow as tf

    from distributed.model.zoo import build_model
    from distributed.model.heads import Head
    from preprocessing import schema

    keras.mixed_precision.set_global_policy("float32" if args.precision == "fp32" else args.precision)
    manifest = schema.read_manifest(args.data)
    size = schema.image_shape(manifest)[0]
    model = build_model(args.model, size, len(manifest["classes"]), weights="none", seed=0,
                        freeze_base="--freeze-base" in args.extra)
    head = Head.of_model(model)
    ds = schema.dataset(args.data, "train").map(
        lambda x, y: (x, tf.cast(tf.reshape(y, (1,)), tf.float32) if head.label_form == "binary" else y))
    ds = ds.shuffle(512, seed=0).repeat().batch(args.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=head.loss())
    steps = manifest["counts"]["per_split"]["train"]["total"] // args.batch_size
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(self.last - self.start)

    model.fit(ds, steps_per_epoch=steps, epochs=args.epochs, callbacks=[Timer()], verbose=0)
    rates = [steps * args.batch_size / t for t in times]
    return {"images_per_second": statistics.median(rates[1:] or rates), "epoch_rates": rates}


def child_flops(args: argparse.Namespace) -> dict:
    """Forward FLOPs per image of the model and of its head, and this machine's float32 matmul FLOP/s."""
    from distributed.model.kerasenv import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from distributed.model.zoo import build_model

    def forward_flops(model) -> float:
        spec = tf.TensorSpec((1, *model.input_shape[1:]), model.input.dtype)
        frozen = convert_variables_to_constants_v2(tf.function(lambda x: model(x)).get_concrete_function(spec))
        opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        opts["output"] = "none"
        return float(tf.compat.v1.profiler.profile(graph=frozen.graph, options=opts).total_float_ops)

    model = build_model(args.model, args.size, 2, weights="none")
    head_layers = [l for l in model.layers if l.name.startswith("head_") or l.name in ("logits", "predictions")]
    head_in = keras.Input(head_layers[0].input.shape[1:])
    x = head_in
    for layer in head_layers:
        x = layer(x)
    a = tf.random.normal((2048, 2048))
    b = tf.random.normal((2048, 2048))
    tf.linalg.matmul(a, b).numpy()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        c = tf.linalg.matmul(a, b)
    c.numpy()
    matmul = 2 * 2048 ** 3 * reps / (time.perf_counter() - start)
    return {"forward_flops": forward_flops(model), "head_forward_flops": forward_flops(keras.Model(head_in, x)),
            "matmul_flops_per_second": matmul, "parameters": model.count_params()}


# --- the driver -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m benchmarks.train\n"
                                       "  python -m benchmarks.train --quick --models cnn,vgg16")
    p.add_argument("--data", type=Path, default=DEFAULT_SHARED_DATA / "kermany224" / "train",
                   help="folder of CLASS/*.jpeg radiographs (default: the shared Kermany 224 px train split)")
    p.add_argument("--models", default=",".join(SETUPS))
    p.add_argument("--precisions", default="fp32,mixed_bfloat16")
    p.add_argument("--images", type=int, default=160, help="radiographs per dataset (about 90%% train)")
    p.add_argument("--batch-size", type=int, default=16, help="per worker")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not counted")
    p.add_argument("--repeats", type=int, default=3,
                   help="side-by-side runs of each setup's three modes; ratios are the median over them (default 3)")
    p.add_argument("--backends", default="horovod,tf",
                   help="the distributed.train backends to measure at 1 and 2 workers (default horovod,tf)")
    p.add_argument("--quick", action="store_true", help="fp32 only, 3 epochs, 192 images")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--child", choices=("plain", "flops"), help=argparse.SUPPRESS)
    p.add_argument("--child-data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="", help=argparse.SUPPRESS)
    return p


def measure(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    models = comma_list(args.models, "--models", SETUPS)
    if args.repeats < 1:
        raise CxrError(f"--repeats must be at least 1, got {args.repeats}")
    precisions = ["fp32"] if args.quick else comma_list(args.precisions, "--precisions", ("fp32", "mixed_bfloat16"))
    epochs, images = (3, 192) if args.quick else (args.epochs, args.images)
    rows, flops, cache = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-train-") as tmp:
        tmp = Path(tmp)
        datasets = {size: make_dataset(args.data, images, size, tmp / f"data{size}")
                    for size in sorted({SETUPS[m][0] for m in models})}
        backends = comma_list(args.backends, "--backends", ("horovod", "tf"))
        modes = ("plain", *[f"{prefix}np{n}" for b, prefix in (("horovod", ""), ("tf", "tf-")) if b in backends
                            for n in (1, 2)])
        # each repeat runs every mode side by side, rotated, so a slow spell of the machine falls on each
        jobs = [(m, p, modes[(i + rep) % len(modes)], rep) for m in models for p in precisions
                for rep in range(args.repeats) for i in range(len(modes))]
        rates: dict[tuple, list[float]] = {}
        steal: dict[tuple, list[float]] = {}  # the share of the CPU the hypervisor took during each run
        for model in models:
            size, extra = SETUPS[model]
            flops[model] = run_child("benchmarks.train", ["--child", "flops", "--model", model, "--size", str(size)])
        for model, precision, mode, rep in tqdm(jobs, desc="train benchmark", disable=None):
            size, extra = SETUPS[model]
            data = datasets[size]
            with StolenCpu() as stolen:
                if mode == "plain":
                    result = run_child("benchmarks.train",
                                       ["--child", "plain", "--child-data", str(data), "--model", model,
                                        "--precision", precision, f"--extra={' '.join(extra)}",
                                        "--batch-size", str(args.batch_size), "--epochs", str(epochs)], timeout=3600)
                    rate = result["images_per_second"]
                else:
                    workers = int(mode[-1])
                    run = run_distributed(data, model, precision, workers, args.batch_size, epochs, extra,
                                          tmp / f"run-{model}-{precision}-{mode}-{rep}",
                                          backend="tf" if mode.startswith("tf-") else "horovod")
                    rate = steady_rate(run["history"])
            rates.setdefault((model, precision, mode), []).append(rate)
            steal.setdefault((model, precision, mode), []).append(stolen.share)
            log.info("%s %s %s (repeat %d): %.2f img/s, %.1f %% of the CPU stolen", model, precision, mode, rep + 1,
                     rate, 100 * stolen.share)
        for (model, precision, mode), found in rates.items():
            size, extra = SETUPS[model]
            f = flops[model]
            train_flops = f["forward_flops"] + 2 * f["head_forward_flops"] if extra else 3 * f["forward_flops"]
            rate = statistics.median(found)
            rows.append({"model": model, "image_size": size, "precision": precision, "mode": mode,
                         "images_per_second": rate, "repeat_rates": found,
                         "repeat_cpu_stolen": steal[(model, precision, mode)],
                         "achieved_gflops": rate * train_flops / 1e9,
                         "fraction_of_matmul": rate * train_flops / f["matmul_flops_per_second"]})
        if "vgg16" in models:
            size, extra = SETUPS["vgg16"]
            for cached in (False, True):
                run = run_distributed(datasets[size], "vgg16", "fp32", 1, args.batch_size, epochs,
                                      extra + (["--cache-features"] if cached else []), tmp / f"run-cache-{cached}")
                key = "cached" if cached else "uncached"
                cache[key] = statistics.median(float(r["train_seconds"]) for r in run["history"][1:] or run["history"])
                cache[f"{key}_all_epochs"] = sum(float(r["train_seconds"]) for r in run["history"])
                if cached:
                    cache["feature_pass"] = run["feature_pass_seconds"]
    return {"models": models, "precisions": precisions, "backends": backends, "images": images, "epochs": epochs,
            "cores": os.cpu_count(),
            "repeats": args.repeats,
            "batch_size_per_worker": args.batch_size, "flops": flops, "runs": rows,
            "cache_features_epoch_seconds": cache}


def summarise(results: dict) -> tuple[list[dict], str]:
    rows = results["runs"]
    at = {(r["model"], r["precision"], r["mode"]): r for r in rows}
    table = markdown_table(
        ["model", "px", "precision", "mode", "images/s (median)", "runs", "CPU stolen in each run", "achieved GFLOP/s",
         "of matmul peak"],
        [[r["model"], r["image_size"], r["precision"], r["mode"], round(r["images_per_second"], 2),
          ", ".join(f"{x:.1f}" for x in r.get("repeat_rates", [r["images_per_second"]])),
          ", ".join(f"{100 * x:.1f} %" for x in r.get("repeat_cpu_stolen", [])),
          round(r["achieved_gflops"], 1), f"{100 * r['fraction_of_matmul']:.0f} %"] for r in rows])

    def ratio_check(label: str, model: str, precision: str, top: str, bottom: str, goal: float) -> dict:
        """The median over the repeats of top's rate / bottom's in the same repeat, with their range."""
        a, b = at[(model, precision, top)], at[(model, precision, bottom)]
        pairs = [x / y for x, y in zip(a.get("repeat_rates", [a["images_per_second"]]),
                                       b.get("repeat_rates", [b["images_per_second"]]))]
        spread = f"; {len(pairs)} side-by-side runs, {min(pairs):.3f}-{max(pairs):.3f}" if len(pairs) > 1 else ""
        return check(f"{label}, {model} {precision}{spread}", statistics.median(pairs), ">=", goal)

    # np1 is one Horovod worker: hvd.init, the toolkit's callbacks and input pipeline, but no DistributedOptimizer
    # (one worker has nothing to average), so this is the toolkit's own overhead over a plain fit
    checks = [ratio_check("np1 (toolkit, no allreduce) / plain fit", model, precision, "np1", "plain", 0.97)
              for (model, precision, mode) in at if mode == "np1" and (model, precision, "plain") in at]
    # what users pay for: two workers with DistributedOptimizer and Gloo allreduce against one, on the same cores
    checks += [ratio_check(f"np2 / np1 on the same {results.get('cores', 2)} cores", model, precision, "np2", "np1",
                           0.9)
               for (model, precision, mode) in at if mode == "np2" and (model, precision, "np1") in at]
    # the same under tf.distribute, and the two backends' two-worker runs against each other
    checks += [ratio_check(f"tf.distribute np2 / np1 on the same {results.get('cores', 2)} cores", model, precision,
                           "tf-np2", "tf-np1", 0.9)
               for (model, precision, mode) in at if mode == "tf-np2" and (model, precision, "tf-np1") in at]
    checks += [ratio_check("tf.distribute np2 / Horovod np2", model, precision, "tf-np2", "np2", 0.9)
               for (model, precision, mode) in at if mode == "tf-np2" and (model, precision, "np2") in at]
    cache = results["cache_features_epoch_seconds"]
    if cache:
        # the whole run's train time: the uncached epochs against the one-time feature pass plus the cached epochs
        total = cache["uncached_all_epochs"] / ((cache.get("feature_pass") or 0) + cache["cached_all_epochs"])
        checks.append(check(f"--cache-features, {results['epochs']} epochs incl. the feature pass: speed-up", total,
                            ">=", 2))
    peak = next(iter(results["flops"].values()))["matmul_flops_per_second"] / 1e9 if results["flops"] else 0
    md = (f"Per-worker batch {results['batch_size_per_worker']}, {results['images']} real radiographs, "
          f"{results['epochs']} epochs (the first not counted), each setup's modes run "
          f"{results.get('repeats', 1)} times side by side. Machine float32 matmul: {peak:.0f} GFLOP/s.\n\n"
          + table + "\n\n" + checks_table(checks))
    if cache:
        md += (f"\n\nFrozen-VGG16 epoch (train steps only): {cache['uncached']:.2f} s uncached, "
               f"{cache['cached']:.3f} s on cached features (epoch speed-up "
               f"{cache['uncached'] / cache['cached']:.0f}x, "
               "leaving out the feature pass); the one-time feature pass took "
               + (f"{cache['feature_pass']:.1f} s" if cache.get("feature_pass") is not None else "an unknown time")
               + f"; all {results['epochs']} epochs: {cache['uncached_all_epochs']:.1f} s uncached against "
               f"{(cache.get('feature_pass') or 0) + cache['cached_all_epochs']:.1f} s cached.")
    return checks, md


def run_suite(quick: bool, work: Path) -> dict:
    """For `python -m benchmarks`: quick is the CNN only (fp32, 2 epochs, 96 images); full is every setup."""
    args = build_parser().parse_args(["--quick", "--models", "cnn"] if quick else [])
    require_dir(args.data, "--data", "the shared Kermany radiographs")
    return measure(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child == "plain":
        args.data = args.child_data
        print(json.dumps(child_plain(args)))
        return 0
    if args.child == "flops":
        print(json.dumps(child_flops(args)))
        return 0
    setup_logging()
    require_dir(args.data, "--data", "point it at a folder of CLASS/*.jpeg radiographs")
    report(args.out, "train", measure(args), summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
