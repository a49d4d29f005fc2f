"""python -m benchmarks.complexity: how runtime and memory grow, as log-log slopes beside the thesis's big-O.

Each quantity is measured at a few sizes, every point in its own process (so each peak RSS is its own; timings
are the fastest of 3 runs, of 1 with --quick), and fitted with log y = slope * log x + intercept: the slope is
the measured exponent, to set beside the thesis's analysis of runtime and space complexity (its Tables 3-4).
  preprocessing time and memory vs N images (N, 2N, 4N, 8N full-resolution radiographs: the same N files
      listed 1..8 times, so the mix of image sizes stays the same): the thesis's serial OpenCV loop keeping
      every float32 image in a list (memory: peak RSS minus the RSS after importing OpenCV) against
      `python -m preprocessing` with 2 Ray workers, streaming to shards (memory: the driver's whole peak RSS,
      since a constant is what O(1) claims);
  training epoch time vs N train images (the CNN at 64 px, `python -m distributed.train`, one worker, the
      median epoch after the first);
  training memory vs batch size B (the CNN at 128 px, `model.fit` for one epoch): peak RSS minus the
      process's RSS after importing TensorFlow, i.e. the marginal part, and the total;
  model memory and build time vs parameter count P (CNN, ResNet50, VGG16 with the thesis's head, 224 px,
      random weights): RSS and seconds of `build_model`, after a warm-up build of a 2-parameter model.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import (DEFAULT_RESULTS, DEFAULT_SHARED_DATA, check, checks_table, markdown_table, model_setups,
                               peak_rss_mb, report, require_dir, run_child)
from benchmarks.preprocess import image_files, repeated_input, run_thesis
from benchmarks.train import child_plain, make_dataset, run_distributed
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import atomic_path

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.
log = logging.getLogger("cxrscale.benchmarks")
FACTORS = (1, 2, 4, 8)
MODELS = tuple(model_setups())  # every model of the zoo
# The claims, as data. Data-loading memory is the thesis's big-O statement as quoted in the issue ("data loading
# memory O(N) in the thesis vs our streaming stage ≈ O(1)"); the others are the standard big-O statements for
# these quantities (time linear in the images processed, activations linear in the batch, weights in P).
# key: (panel, quantity, claim, expected exponent, (part, variant), x field, y field)
CLAIMS = {
    "prep_time_thesis": ("preprocessing time", "thesis's serial loop", "O(N)", 1, ("preprocess", "thesis"),
                         "images", "seconds"),
    "prep_time_ours": ("preprocessing time", "cxrscale Ray stage", "O(N)", 1, ("preprocess", "cxrscale-2"),
                       "images", "seconds"),
    "prep_memory_thesis": ("data-loading memory", "thesis's loop, marginal peak RSS", "O(N)", 1,
                           ("preprocess", "thesis"), "images", "marginal_rss_mb"),
    "prep_memory_ours": ("data-loading memory", "cxrscale driver, peak RSS", "O(N) in the thesis; ours O(1)", 0,
                         ("preprocess", "cxrscale-2"), "images", "peak_rss_mb"),
    "epoch_time": ("training epoch time", "CNN 64 px, 1 worker", "O(N)", 1, ("epoch", None), "images",
                   "epoch_seconds"),
    "train_memory": ("training memory", "CNN 128 px, marginal peak RSS", "O(B)", 1, ("batch", None),
                     "batch_size", "marginal_rss_mb"),
    "model_memory": ("model memory", "RSS delta of build_model", "O(P)", 1, ("model_build", None), "parameters",
                     "rss_delta_mb"),
    "build_time": ("model build time", "seconds of build_model", "O(P)", 1, ("model_build", None), "parameters",
                   "build_seconds"),
}
AXES = {"images": "images N", "batch_size": "batch size B", "parameters": "parameters P", "seconds": "time (s)",
        "epoch_seconds": "time per epoch (s)", "build_seconds": "time (s)", "marginal_rss_mb": "memory (MiB)",
        "peak_rss_mb": "memory (MiB)", "rss_delta_mb": "memory (MiB)"}


def fit_loglog(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares line through (log x, log y): {slope, intercept (natural log), r2}."""
    import numpy as np

    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (slope * lx + intercept)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


# --- child processes ------------------------------------------------------------------------------------

def child_thesis(folder: Path, size: int) -> dict:
    """The thesis's loop; marginal = its peak RSS minus the RSS after importing OpenCV and numpy."""
    import cv2  # noqa: F401
    import numpy  # noqa: F401

    baseline = peak_rss_mb()
    return {**run_thesis(folder, size), "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb()}


def child_batch(data: Path, batch_size: int) -> dict:
    """One epoch of the thesis's `model.fit` on the CNN; RSS after importing TensorFlow and at peak."""
    from distributed.model.kerasenv import keras  # noqa: F401  (before tensorflow)
    import tensorflow  # noqa: F401

    import distributed.model.builders  # noqa: F401

    baseline = peak_rss_mb()
    child_plain(argparse.Namespace(data=data, model="cnn", precision="fp32", extra="", batch_size=batch_size,
                                   epochs=1))
    return {"baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb()}


def child_build(model: str, size: int) -> dict:
    """Seconds and RSS growth (current, not peak: what the built model holds) of one `build_model`."""
    import psutil

    from distributed.model.kerasenv import keras
    from distributed.model.zoo import build_model

    keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])  # runtime start-up is not the model's
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    built = build_model(model, size, 2, weights="none", seed=0)
    seconds = time.perf_counter() - start
    return {"parameters": built.count_params(), "build_seconds": seconds,
            "rss_delta_mb": (psutil.Process().memory_info().rss - before) / 2**20, "peak_rss_mb": peak_rss_mb()}


# --- the driver -----------------------------------------------------------------------------------------

def child(kind: str, *args: str) -> dict:
    return run_child("benchmarks.complexity", ["--child", kind, *args])


def fastest(repeats: int, run, key: str = "seconds") -> dict:
    """The fastest of `repeats` runs: on a shared machine the minimum is the least disturbed timing."""
    return min((run() for _ in range(repeats)), key=lambda r: r[key])


def measure_preprocess(source: Path, n: int, repeats: int, work: Path) -> list[dict]:
    base, total = work / "prep-base", len(image_files(source))
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):  # the class mix of the source, n files
        files = sorted(class_dir.iterdir())
        (base / class_dir.name).mkdir(parents=True)
        for image in files[: round(n * len(files) / total)]:
            (base / class_dir.name / image.name).symlink_to(image.resolve())
    runs = []
    for factor in FACTORS:
        folder = work / f"prep-x{factor}"
        images = repeated_input(base, factor, folder)
        thesis = fastest(repeats, lambda: child("thesis", "--child-input", str(folder)))
        ours = fastest(repeats, lambda: run_child("benchmarks.preprocess", ["--child", "cxrscale-2", "--child-input",
                                                                            str(folder), "--size", "224"]))
        for variant, r in (("thesis", thesis), ("cxrscale-2", ours)):
            marginal = r["peak_rss_mb"] - r["baseline_rss_mb"] if "baseline_rss_mb" in r else None
            runs.append({"variant": variant, "images": images, "seconds": r["seconds"],
                         "peak_rss_mb": r["peak_rss_mb"], "marginal_rss_mb": marginal})
            log.info("%s, %d images: %.2f s, peak RSS %.0f MiB", variant, images, r["seconds"], r["peak_rss_mb"])
    return runs


def measure_epochs(source: Path, sizes: Sequence[int], epochs: int, work: Path) -> list[dict]:
    runs = []
    for n in sizes:  # make_dataset keeps ~10 % for validation: ask for n / 0.9 to train on about n
        data = make_dataset(source, round(n / 0.9), 64, work / f"epoch-{n}")
        rows = run_distributed(data, "cnn", "fp32", 1, 16, epochs, [], work / f"epoch-run-{n}")["history"]
        steady = rows[1:] or rows
        runs.append({"images": round(float(rows[0]["images_per_second"]) * float(rows[0]["train_seconds"])),
                     "epoch_seconds": statistics.median(float(r["train_seconds"]) for r in steady),
                     "first_epoch_seconds": float(rows[0]["train_seconds"])})
        log.info("epoch of %d images: %.2f s", runs[-1]["images"], runs[-1]["epoch_seconds"])
    return runs


def measure_batches(source: Path, batches: Sequence[int], work: Path) -> list[dict]:
    data = make_dataset(source, round(2 * max(batches) / 0.9) + 2, 128, work / "batch-data")
    runs = []
    for b in batches:
        r = child("batch", "--child-input", str(data), "--batch-size", str(b))
        runs.append({"batch_size": b, **r, "marginal_rss_mb": r["peak_rss_mb"] - r["baseline_rss_mb"]})
        log.info("batch %d: peak RSS %.0f MiB, marginal %.0f MiB", b, r["peak_rss_mb"], runs[-1]["marginal_rss_mb"])
    return runs


def run_suite(quick: bool, work: Path, data: Path = DEFAULT_SHARED_DATA) -> dict:
    """Every measurement (quick: ~4 min on 2 idle cores; full: ~15) and its log-log fit; `work` gets a scratch
    folder that is removed afterwards."""
    fullres = require_dir(data / "kermany-fullres", "--data", "expected the shared kermany-fullres/ folder")
    kermany = require_dir(data / "kermany224" / "train", "--data", "expected the shared kermany224/train/ folder")
    n, sizes, epochs, repeats = (120, (128, 256, 512), 2, 1) if quick else (240, (128, 256, 512, 1024), 3, 3)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="complexity-", dir=work) as scratch:  # work may hold older runs
        scratch = Path(scratch)
        results = {"quick": quick, "data": str(data), "n": n, "epochs": epochs, "repeats": repeats,
                   "preprocess": measure_preprocess(fullres, n, repeats, scratch),
                   "epoch": measure_epochs(kermany, sizes, epochs, scratch),
                   "batch": measure_batches(kermany, (8, 16, 32, 64), scratch),
                   "model_build": [{"model": m, **fastest(repeats, lambda: child("build", "--model", m),
                                                          "build_seconds")} for m in MODELS]}
    return add_fits(results)


def add_fits(results: dict) -> dict:
    """results["fits"][claim key] = {x, y, slope, intercept, r2} from the raw measurements."""
    results["fits"] = {}
    for key, (_, _, _, _, (part, variant), xf, yf) in CLAIMS.items():
        rows = [r for r in results[part] if variant is None or r["variant"] == variant]
        x, y = [r[xf] for r in rows], [r[yf] for r in rows]
        results["fits"][key] = {"x": x, "y": y, **fit_loglog(x, y)}
    return results


def summarise(results: dict) -> tuple[list[dict], str]:
    fits = results["fits"]
    claims = markdown_table(["quantity", "measured as", "claim", "expected exponent", "measured exponent", "r²",
                             "x range"],
                            [[panel, what, claim, expected, f"{fits[k]['slope']:.2f}", f"{fits[k]['r2']:.3f}",
                              f"{min(fits[k]['x']):,}–{max(fits[k]['x']):,}"]
                             for k, (panel, what, claim, expected, *_) in CLAIMS.items()])
    slope = {k: f["slope"] for k, f in fits.items()}
    # Targets are properties of cxrscale's code that a change could break (a driver that keeps images, a
    # quadratic audit or epoch). The thesis loop's O(N) memory, memory against batch size and against the
    # parameter count hold by construction: they are in the exponent table above, not checked.
    checks = [check("our driver memory exponent", slope["prep_memory_ours"], "<", 0.2),
              check("epoch time exponent: distance from 1", abs(slope["epoch_time"] - 1), "<=", 0.3),
              check("our preprocessing time exponent: distance from 1", abs(slope["prep_time_ours"] - 1), "<=", 0.3)]
    prep = markdown_table(["variant", "images", "seconds", "images/s", "peak RSS MiB", "marginal MiB"],
                          [[r["variant"], r["images"], f"{r['seconds']:.2f}", r["images"] / r["seconds"],
                            r["peak_rss_mb"], "" if r["marginal_rss_mb"] is None else r["marginal_rss_mb"]]
                           for r in results["preprocess"]])
    epoch = markdown_table(["train images", "first epoch s", "steady epoch s", "images/s"],
                           [[r["images"], f"{r['first_epoch_seconds']:.2f}", f"{r['epoch_seconds']:.2f}",
                             r["images"] / r["epoch_seconds"]] for r in results["epoch"]])
    batch = markdown_table(["batch size", "RSS after TF import MiB", "peak RSS MiB", "marginal MiB"],
                           [[r["batch_size"], r["baseline_rss_mb"], r["peak_rss_mb"], r["marginal_rss_mb"]]
                            for r in results["batch"]])
    build = markdown_table(["model", "parameters", "build s", "RSS delta MiB", "peak RSS MiB"],
                           [[r["model"], f"{r['parameters']:,}", f"{r['build_seconds']:.2f}", r["rss_delta_mb"],
                             r["peak_rss_mb"]] for r in results["model_build"]])
    runs = "one run" if results["repeats"] == 1 else f"the fastest of {results['repeats']} runs"
    md = ("Measured exponent = slope of a least-squares line through (log x, log y); each point is its own "
          f"process, timings from {runs}. Preprocessing: {results['n']} full-resolution radiographs listed 1, 2, "
          "4, 8 times, at 224 px; the cxrscale driver's memory is its whole peak RSS.\n\n"
          + claims + "\n\n" + checks_table(checks) + "\n\n### Preprocessing vs N\n\n" + prep
          + "\n\n### Training epoch vs N\n\n" + epoch + "\n\n### Training memory vs batch size\n\n" + batch
          + "\n\n### Model build vs parameters\n\n" + build)
    return checks, md


def plots(results: dict, out_dir: Path) -> list[Path]:
    """One PNG: a log-log panel per quantity, the points and each fitted line with its slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

    def tick(v: float) -> str:
        return f"{v / 1e6:.0f}M" if v >= 1e6 else f"{v / 1e6:.1f}M" if v >= 1e5 else f"{v:g}"

    class Plain(LogFormatter):  # matplotlib's choice of which log ticks to label, written 0.2 and 300, not 2e-01
        def _num_to_string(self, x, vmin, vmax):
            return tick(x)

    panels = list(dict.fromkeys(c[0] for c in CLAIMS.values()))
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, panel in zip(axes.flat, panels):
        for key, (_, what, _, _, _, xf, yf) in ((k, c) for k, c in CLAIMS.items() if c[0] == panel):
            f = results["fits"][key]
            points = ax.loglog(f["x"], f["y"], "o")[0]
            xs = np.geomspace(min(f["x"]), max(f["x"]), 20)
            ax.loglog(xs, np.exp(f["intercept"]) * xs ** f["slope"], "-", color=points.get_color(),
                      label=f"{what}: slope {f['slope']:.2f}")
        ax.set(title=panel, xlabel=AXES[xf], ylabel=AXES[yf])
        ax.set_xticks(sorted(set(f["x"])))  # ticks at the measured sizes, plain numbers
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(Plain())
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("cxrscale complexity: measured log-log slopes" + (" (--quick)" if results.get("quick") else ""))
    fig.tight_layout()
    path = out_dir / "complexity.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return [path]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.complexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m benchmarks.complexity --quick\n"
                                       "  python -m benchmarks.complexity --data /work/shared/data --out results/")
    p.add_argument("--quick", action="store_true", help="N = 120 instead of 240, three training sizes, 2 epochs, "
                   "one run per point instead of the fastest of 3 (~4 min instead of ~15)")
    p.add_argument("--data", type=Path, default=DEFAULT_SHARED_DATA,
                   help="shared data folder holding kermany-fullres/ and kermany224/train/")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results folder")
    p.add_argument("--child", choices=("thesis", "batch", "build"), help=argparse.SUPPRESS)
    p.add_argument("--child-input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        result = (child_thesis(args.child_input, 224) if args.child == "thesis" else
                  child_batch(args.child_input, args.batch_size) if args.child == "batch" else
                  child_build(args.model, 224))
        print(json.dumps(result))
        return 0
    setup_logging()
    start = time.perf_counter()
    results = run_suite(args.quick, Path(tempfile.gettempdir()), args.data)
    results["seconds"] = time.perf_counter() - start
    report(args.out, "complexity", results, summarise)
    print("plot:", *plots(results, args.out))
    return 0


if __name__ == "__main__":
    run_cli(main)
