"""python -m benchmarks.optimize: what each compressed variant of a real-data model costs and saves.

For each trained run (default: the thesis CNN at 128 px and ResNet50 at 64 px, trained here on the shared
Kermany radiographs when --runs is not given), runs `python -m optimize.prune_quantize` and checks:
  int8 PTQ: >= 3.5x smaller than the fp32 TFLite model, >= 1.5x lower latency at batch 1 (1 thread),
            test AUC drop <= 0.01;
  80 % sparsity + int8 (prune-qat-80): gzip size >= 8x smaller than fp32's gzip size, AUC drop <= 0.02.
Latency is measured on this machine's CPU; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import (DEFAULT_RESULTS, DEFAULT_SHARED_DATA, HOROVODRUN, REPO, check, checks_table,
                               markdown_table, report, require_dir, run_command)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.
log = logging.getLogger("cxrscale.benchmarks")
# model, image size, epochs: the default real-data runs trained when --runs is not given
DEFAULT_MODELS = (("cnn", 128, 6), ("resnet50", 64, 6))
TARGETS = {"ptq-int8": {"size_ratio": 3.5, "speedup": 1.5, "auc_drop": 0.01},
           "prune-qat-80": {"gzip_ratio": 8.0, "auc_drop": 0.02}}


def run(cmd: list[str]) -> None:
    log.info("running %s", " ".join(cmd[:6]))
    run_command(cmd)


def train_default_runs(data: Path, work: Path, workers: int) -> list[Path]:
    """Prepare the shared radiographs (split by patient, 15 % test) and train each default model once;
    existing runs under `work` are reused."""
    runs = []
    for model, size, epochs in DEFAULT_MODELS:
        prepared, run_dir = work / f"prepared{size}", work / f"{model}{size}"
        if not (prepared / "manifest.json").is_file():
            run([sys.executable, "-m", "preprocessing", "--input", str(data), "--output", str(prepared), "--size",
                 str(size), "--val-fraction", "0.1", "--test-fraction", "0.15", "--workers", "2", "-q"])
        if not (run_dir / "model" / "saved_model.pb").is_file():
            cmd = [sys.executable, "-m", "distributed.train", "--data", str(prepared), "--model", model, "--weights",
                   "none", "--epochs", str(epochs), "--batch-size", "32", "--output", str(run_dir),
                   "--early-stopping-patience", "3"]
            run([HOROVODRUN, "-np", str(workers), "--gloo", *cmd] if workers > 1 else cmd)
        runs.append(run_dir)
    return runs


def optimize_run(run_dir: Path, args: argparse.Namespace) -> dict:
    out = args.work / "optimized" / run_dir.name
    cmd = [sys.executable, "-m", "optimize.prune_quantize", "--run", str(run_dir), "--output", str(out),
           "--sparsity", args.sparsity, "--fine-tune-epochs", str(args.fine_tune_epochs),
           "--latency-runs", str(args.latency_runs), "-q"] + (["--variants", args.variants] if args.variants else [])
    if args.workers > 1:
        cmd = [HOROVODRUN, "-np", str(args.workers), "--gloo", *cmd]
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    run(cmd)
    comparison = json.loads((out / "comparison.json").read_text())
    comparison["benchmark_started"] = started
    config = json.loads((run_dir / "config.json").read_text())
    comparison["model"] = config["config"]["model"]
    comparison["image_size"] = config["resolved"]["image_shape"][0]
    comparison["output"] = str(out)
    return comparison


def checks_for(comparison: dict) -> list[dict]:
    rows = {r["name"]: r for r in comparison["variants"] if "test_auc" in r}
    measured_as = {"size_ratio": "size_ratio_vs_fp32", "gzip_ratio": "gzip_ratio_vs_fp32",
                   "speedup": "speedup_1_thread", "auc_drop": "test_auc_drop"}
    return [check(f"{comparison['model']} {name} {key}", rows.get(name, {}).get(measured_as[key]),
                  "<=" if key == "auc_drop" else ">=", goal)
            for name, goals in TARGETS.items() for key, goal in goals.items()]


def measured_when(row: dict, started: str) -> str:
    """"in this run", or "REUSED from <time>, commit <c>" for a figure `optimize.prune_quantize` kept from an
    earlier invocation (same latency settings and code; ISO timestamps compare as strings)."""
    measured = row.get("measured") or {}
    if not measured:
        return "unknown (a record from before measurements were stamped)"
    if measured["at"] >= started:
        return "in this run"
    return f"REUSED from {measured['at']}, code {measured['code'][:12]}"


def summarise(results: dict) -> tuple[list[dict], str]:
    checks, parts = [], []
    for comparison in results["comparisons"]:
        checks += checks_for(comparison)
        rows = [[r["name"], r["bytes"] / 1e6, r["gzip_bytes"] / 1e6, f"{r['sparsity']:.2f}", f"{r['int8_fraction']:.2f}",
                 f"{r['test_auc']:.4f}", f"{r['test_auc_drop']:+.4f}", f"{r['latency']['1']['median_ms']:.2f}",
                 f"{r['latency'].get('2', {}).get('median_ms', float('nan')):.2f}", f"{r['peak_rss_delta_mb']:.1f}",
                measured_when(r, comparison.get("benchmark_started", ""))]
                if "test_auc" in r else [r["name"], f"skipped: {r.get('skipped', '')}"] + [""] * 9
                for r in comparison["variants"]]
        parts.append(f"## {comparison['model']} at {comparison['image_size']} px\n\n" + markdown_table(
            ["variant", "MB", "gzip MB", "sparsity", "int8 share", "test AUC", "AUC drop", "ms 1T", "ms 2T",
             "memory MB", "AUC and latency measured"], rows) + f"\n\nrecommended: {comparison['recommended']}; report: "
                                   f"{comparison['output']}/report.md")
    parts.append("## Targets\n\n" + checks_table(checks))
    return checks, "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.optimize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m benchmarks.optimize --runs runs/kermany128-cnn\n"
                                       "  python -m benchmarks.optimize            # trains the default runs first")
    p.add_argument("--runs", help="comma-separated trained run folders (default: train the CNN at 128 px and "
                                  "ResNet50 at 64 px on --data first)")
    p.add_argument("--data", type=Path, default=DEFAULT_SHARED_DATA / "kermany224" / "train",
                   help="class folders of radiographs for the default runs (default: the shared Kermany set)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-optimize",
                   help="where default runs and optimized variants go (reused across invocations)")
    p.add_argument("--sparsity", default="0.5,0.8")
    p.add_argument("--variants", help="subset of optimize.prune_quantize's variants (default all)")
    p.add_argument("--fine-tune-epochs", type=int, default=1)
    p.add_argument("--latency-runs", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="Horovod workers for training and fine-tuning")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    return p


def quick_run(data: Path, work: Path) -> Path:
    """About 600 real radiographs at 64 px and the CNN trained on them for 3 epochs (reused if present)."""
    from preprocessing.sources import patient_subset_csv

    prepared, run_dir = work / "quick-prepared", work / "quick-cnn"
    if not (prepared / "manifest.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        csv_path = patient_subset_csv(data, work / "quick.csv", n_images=600, seed=1)
        run([sys.executable, "-m", "preprocessing", "--input", str(csv_path), "--output", str(prepared), "--size",
             "64", "--val-fraction", "0.2", "--test-fraction", "0.25", "--workers", "2", "-q"])
    if not (run_dir / "model" / "saved_model.pb").is_file():
        run([sys.executable, "-m", "distributed.train", "--data", str(prepared), "--model", "cnn", "--epochs", "3",
             "--batch-size", "32", "--output", str(run_dir)])
    return run_dir


def run_suite(quick: bool, work: Path) -> dict:
    """For `python -m benchmarks`: quick optimizes a small CNN (int8 PTQ and 80 % prune + QAT only); full trains
    and optimizes the default runs with every variant."""
    data = require_dir(DEFAULT_SHARED_DATA / "kermany224" / "train", "--data", "the shared Kermany radiographs")
    args = build_parser().parse_args(["--work", str(work / "optimize")])
    if quick:
        args.sparsity, args.latency_runs = "0.8", 30
        runs = [quick_run(data, args.work)]
        args.variants = "ptq-int8,prune-qat"
    else:
        runs = train_default_runs(data, args.work, args.workers)
    return {"comparisons": [optimize_run(r, args) for r in runs]}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.runs:
        runs = [Path(r) for r in args.runs.split(",") if r]
        for r in runs:
            if not (r / "model" / "saved_model.pb").is_file():
                raise CxrError(f"--runs: {r} is not a finished training run (no model/saved_model.pb)")
    else:
        require_dir(args.data, "--data", "point it at CLASS/*.jpeg radiographs, e.g. ../shared/data/kermany224/train")
        runs = train_default_runs(args.data, args.work, args.workers)
    comparisons = [optimize_run(r, args) for r in runs]
    report(args.out, "optimize", {"settings": {k: str(v) for k, v in vars(args).items()},
                                  "comparisons": comparisons}, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
