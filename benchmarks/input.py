"""python -m benchmarks.input: can the training input pipeline feed a GPU?

Measures cxrscale's own training input pipeline alone (`distributed.training.data.train_dataset`: TFRecord
shards -> parsed uint8 images -> shuffled, batched and, with --augment, augmented batches), with no model:
images/s at 128 and 224 px, with and without augmentation, on 1 and 2 CPU cores. Each measurement runs in a
fresh process pinned to its cores with `taskset` and TensorFlow's thread pools sized to them, so "per core"
means per core. The records are real radiographs (the shared Kermany train split) prepared here in the run.

From the per-core rate at 224 px with augmentation it gives the CPU cores one GPU needs at the published
single-GPU ResNet-50 training throughputs (NVIDIA DeepLearningExamples, the same figures as
benchmarks/scaling.py). Goal: at least 600 images/s per core at 224 px with augmentation, so that 4 cores
feed one A100 training ResNet-50 with AMP (2,375 images/s).

The records hold raw uint8 pixels (no JPEG to decode: `preprocessing.schema`), so parsing is a copy; the
augmentation is the cost.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import (DEFAULT_RESULTS, DEFAULT_SHARED_DATA, REPO, check, checks_table, markdown_table, report,
                               require_dir, run_command)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.
log = logging.getLogger("cxrscale.benchmarks")
SIZES = (128, 224)
GOAL_PER_CORE = 600.0  # images/s per core at 224 px with augmentation
# published single-GPU ResNet-50 training throughput (images/s): NVIDIA DeepLearningExamples TensorFlow
# ResNet-50 v1.5 README, 20.06 container, the figures benchmarks/scaling.py validates against
GPUS = (("V100 FP32", 412), ("V100 AMP", 1270), ("A100 TF32", 909), ("A100 AMP", 2375))


def prepare(data: Path, work: Path, size: int, n_images: int) -> Path:
    """Real radiographs prepared at `size` px into work/prepared<size>-<n> (made again if incomplete)."""
    from preprocessing.sources import patient_subset_csv

    out = work / f"prepared{size}-{n_images}"
    if (out / "manifest.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = patient_subset_csv(data, work / f"input-{n_images}.csv", n_images=n_images, seed=2)
    run_command([sys.executable, "-m", "preprocessing", "--input", str(csv_path), "--output", str(out), "--size",
                 str(size), "--val-fraction", "0.1", "--test-fraction", "0", "--shards", "8", "--workers", "2",
                 "-q"])
    return out


def child_measure(prepared: Path, augment: bool, cores: int, batch: int, seconds: float) -> dict:
    """In a process pinned to `cores` CPUs: images/s of the training pipeline over `seconds` after warm-up."""
    from distributed.model.kerasenv import keras  # noqa: F401 (picks Keras before TensorFlow loads)
    import tensorflow as tf

    from distributed.training.data import plan_data, train_dataset

    tf.config.threading.set_intra_op_parallelism_threads(cores)
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    plan = plan_data(prepared, 0, 1, batch, "cnn")
    ds = train_dataset(prepared, plan, batch, seed=0, shuffle_buffer=512, augment=augment, label_form="binary")
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    it = iter(ds.with_options(options))
    for _ in range(5):
        next(it)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = next(it)
        images += int(x.shape[0])
    elapsed = time.perf_counter() - start
    return {"images": images, "seconds": elapsed, "images_per_second": images / elapsed}


def measure_one(prepared: Path, size: int, augment: bool, cores: int, batch: int, seconds: float) -> dict:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < cores:
        raise CxrError(f"--cores: {cores} cores asked for, this process may use {len(available)}")
    cpus = ",".join(str(c) for c in available[:cores])
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "benchmarks.input", "--child", "--data", str(prepared),
           "--cores", str(cores), "--batch-size", str(batch), "--seconds", str(seconds)] + (["--augment"] * augment)
    proc = run_command(cmd, timeout=600)
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"size": size, "augment": augment, "cores": cores, "cpus": cpus, **raw,
            "images_per_second_per_core": raw["images_per_second"] / cores}


def measure(data: Path, work: Path, n_images: int, seconds: float, cores: Sequence[int] = (1, 2),
            batch: int = 32) -> dict:
    if shutil.which("taskset") is None:
        raise CxrError("taskset (util-linux) is not installed: it pins each measurement to its cores")
    runs = []
    for size in SIZES:
        prepared = prepare(data, work, size, n_images)
        for augment in (False, True):
            for c in cores:
                log.info("input pipeline: %d px, augment %s, %d core(s)", size, augment, c)
                runs.append(measure_one(prepared, size, augment, c, batch, seconds))
    return {"images": n_images, "batch": batch, "seconds_per_measurement": seconds, "runs": runs}


def summarise(results: dict) -> tuple[list[dict], str]:
    runs = results["runs"]
    at = {(r["size"], r["augment"], r["cores"]): r for r in runs}
    rows = [[f"{r['size']} px", "yes" if r["augment"] else "no", r["cores"], f"{r['images_per_second']:,.0f}",
             f"{r['images_per_second_per_core']:,.0f}",
             f"{r['images_per_second'] / at[r['size'], r['augment'], 1]['images_per_second']:.2f}x"
             if (r["size"], r["augment"], 1) in at else ""] for r in runs]
    md = [f"cxrscale's training input pipeline alone (TFRecord -> parsed, shuffled batches of {results['batch']}, "
          f"optionally augmented), {results['images']} real radiographs, each figure over "
          f"{results['seconds_per_measurement']:g} s in a process pinned with `taskset`.\n",
          markdown_table(["image", "augment", "cores", "images/s", "images/s per core", "vs 1 core"], rows)]
    # cores per GPU from the best per-core rate measured with augmentation at 224 px
    aug224 = [r for r in runs if r["size"] == 224 and r["augment"]]
    per_core = max((r["images_per_second_per_core"] for r in aug224), default=None)
    plain = max((r["images_per_second_per_core"] for r in runs if r["size"] == 224 and not r["augment"]),
                default=None)
    if per_core:
        md += ["\n### CPU cores needed per GPU (224 px, ResNet-50 training at NVIDIA's published single-GPU rates)\n",
               markdown_table(["GPU", "published images/s", "cores with augmentation", "cores without"],
                              [[gpu, f"{ips:,}", f"{ips / per_core:.1f}", f"{ips / plain:.2f}" if plain else ""]
                               for gpu, ips in GPUS])]
    one_core = at.get((224, True, 1))
    checks = [check("images/s per core, 224 px, augmented, 1 core", one_core and one_core["images_per_second"],
                    ">=", GOAL_PER_CORE),
              check("cores per A100 (AMP, 2,375 images/s), augmented", per_core and 2375 / per_core, "<=", 4)]
    md.append("\n" + checks_table(checks))
    return checks, "\n".join(md)


def run_suite(quick: bool, work: Path) -> dict:
    """For `python -m benchmarks`: 400 (quick) or 1,500 real radiographs, 8 (quick) or 20 s per figure."""
    data = require_dir(DEFAULT_SHARED_DATA / "kermany224" / "train", "--data", "the shared Kermany radiographs")
    return measure(data, Path(work) / "input", 400 if quick else 1500, 8.0 if quick else 20.0)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.input", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="examples:\n  python -m benchmarks.input\n"
                             "  python -m benchmarks.input --images 1500 --seconds 20 --out /tmp/input")
    p.add_argument("--data", type=Path, default=DEFAULT_SHARED_DATA / "kermany224" / "train",
                   help="class folders of radiographs to prepare (default: the shared Kermany train split); with "
                        "--child, a prepared dataset")
    p.add_argument("--images", type=int, default=400, help="how many radiographs to prepare (whole patients)")
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per figure")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-input",
                   help="where the prepared records go (reused across invocations)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="folder for the results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--augment", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child_measure(args.data, args.augment, args.cores, args.batch_size, args.seconds)))
        return 0
    setup_logging()
    if args.images < 64 or args.seconds <= 0:
        raise CxrError("--images must be at least 64 and --seconds above 0")
    require_dir(args.data, "--data", "point it at CLASS/*.jpeg radiographs, e.g. ../shared/data/kermany224/train")
    report(args.out, "input", measure(args.data, args.work, args.images, args.seconds), summarise)
    return 0


if __name__ == "__main__":
    try:
        run_cli(main)
    except subprocess.TimeoutExpired as err:
        sys.exit(f"error: a measurement took longer than {err.timeout:.0f} s")
