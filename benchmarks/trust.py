"""python -m benchmarks.trust: what calibration, ensembles and test-time augmentation cost a clinic at prediction.

For a trained run, builds from its exported model (in a child process, with TensorFlow):
  single          the member with no calibration (its own sigmoid / softmax)
  temperature     the member ending in temperature scaling (`--calibration temperature`)
  isotonic        the member ending in a 32-knot isotonic map (`--calibration isotonic`)
  ensemble-K      `distributed.ensemble`'s graph of K members (K = 2, 3, 5), temperature-calibrated: the
                  members are copies of the one member, which costs what K different members would
and converts each to a float32 TFLite model. Each is measured on LiteRT at batch 1 (`optimize.measure.latency`:
median and p90 ms per image on 1 and 2 threads, interpreter memory) and its size. Test-time augmentation
(`--tta`: 4 views per image, `distributed.model.scorer.tta_views`) is timed end to end through the scorer,
per image, against the same scorer without it. Goals: calibration adds at most 10 % to the latency (the
measurement's own noise here is about 5 %), an ensemble of K costs at most 1.1 K times one model, TTA at
most 4.5 times.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
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
ENSEMBLE_SIZES = (2, 3, 5)


def build_variants(run_dir: Path, out: Path) -> list[dict]:
    """The child's first half: the variants as float32 .tflite files under `out`, {name, file, members}."""
    from distributed.model.kerasenv import keras
    import numpy as np

    from distributed.ensemble import join_members
    from distributed.model.builders import MEMBER_PREFIX
    from distributed.model.calibration import Calibration, calibrated_model
    from distributed.model.scoring import run_model_path
    from optimize.compress import to_tflite

    model = keras.models.load_model(str(run_model_path(run_dir)), compile=False)
    knots = np.linspace(-6.0, 6.0, 32)
    calibrations = {"single": Calibration("none"), "temperature": Calibration("temperature", {"temperature": 1.5}),
                    "isotonic": Calibration("isotonic", {"x": knots.tolist(),
                                                         "y": (1 / (1 + np.exp(-knots / 1.5))).tolist()})}
    built = [(name, calibrated_model(model, c), 1) for name, c in calibrations.items()]
    for k in ENSEMBLE_SIZES:
        joined = join_members([model] * k)
        # copies with identical weights would be folded into one by the converter's common-subexpression
        # pass: make each member's weights its own (scaled by 1 + k / 1000), as K trained members are
        for layer in joined.layers:
            member = next((i for i in range(k) if layer.name.startswith(MEMBER_PREFIX.format(i))), None)
            if member and layer.weights:
                layer.set_weights([w * (1 + member / 1000) for w in layer.get_weights()])
        built.append((f"ensemble-{k}", calibrated_model(joined, calibrations["temperature"]), k))
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for name, variant, members in built:
        path = out / f"{name}.tflite"
        path.write_bytes(to_tflite(variant, "fp32"))
        variants.append({"name": name, "file": str(path), "members": members})
    return variants


def child_build(run_dir: Path, out: Path) -> dict:
    return {"variants": build_variants(run_dir, out)}


def child_measure(path: Path, runs: int, images: int, tta: bool) -> dict:
    """In a fresh LiteRT-only process, as a clinic runs it: latency and memory of one .tflite file, or with
    `tta` the scorer's time per image with and without test-time augmentation."""
    import numpy as np

    from distributed.model.scoring import tflite_scorer
    from optimize import measure

    if not tta:
        return {**measure.sizes(path), **measure.latency(path, threads=(1, 2), warmup=10, runs=runs, seed=0)}
    scorer = tflite_scorer(path, num_threads=1)
    pixels = np.random.default_rng(1).integers(0, 256, (images, *scorer.input_shape), dtype=np.uint8)
    per_image = {"input_shape": list(scorer.input_shape)}
    for with_tta in (False, True):
        scorer.tta = with_tta
        scorer.predict(pixels[:4], batch_size=1)  # warm up
        started = time.perf_counter()
        scorer.predict(pixels, batch_size=1)
        per_image["tta" if with_tta else "plain"] = (time.perf_counter() - started) * 1e3 / images
    return per_image


def _child(*args: str) -> dict:
    proc = run_command([sys.executable, "-m", "benchmarks.trust", "--child", *args], timeout=3600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_run(run_dir: Path, work: Path, runs: int, images: int, repeats: int = 3) -> dict:
    """Build the variants (TensorFlow), then measure each `repeats` times in fresh LiteRT processes, round
    robin, keeping the fastest median of each (the least disturbed by the rest of a shared machine)."""
    if not (run_dir / "model" / "saved_model.pb").is_file():
        raise CxrError(f"--run {run_dir} is not a finished training run (no model/saved_model.pb)")
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cxr-trust-", dir=work) as tmp:
        variants = _child("build", "--run", str(run_dir), "--work", tmp)["variants"]
        samples: dict[str, list[dict]] = {v["name"]: [] for v in variants}
        tta = []
        for _ in range(repeats):
            for v in variants:
                samples[v["name"]].append(_child("measure", "--model", v["file"], "--runs", str(runs)))
            single = next(v for v in variants if v["name"] == "single")
            tta.append(_child("tta", "--model", single["file"], "--images", str(images)))
    for v in variants:
        best = min(samples[v["name"]], key=lambda m: m["threads"]["1"]["median_ms"])
        v.update(best, repeats=repeats)
        v.pop("file")
    fastest = {k: min(t[k] for t in tta) for k in ("plain", "tta")}
    return {"run": str(run_dir), "runs": runs, "repeats": repeats, "images": images, "variants": variants,
            "tta_ms_per_image": fastest, "input_shape": tta[0]["input_shape"]}


def summarise(results: dict) -> tuple[list[dict], str]:
    rows = {v["name"]: v for v in results["variants"]}
    base = rows["single"]["threads"]["1"]["median_ms"]
    table = [[v["name"], v["members"], f"{v['bytes'] / 1e6:.2f}", f"{v['threads']['1']['median_ms']:.2f}",
              f"{v['threads']['1']['p90_ms']:.2f}", f"{v['threads'].get('2', {}).get('median_ms', float('nan')):.2f}",
              f"{v['threads']['1']['median_ms'] / base:.2f}x", f"{v['peak_rss_delta_mb']:.1f}"]
             for v in results["variants"]]
    tta = results["tta_ms_per_image"]
    table.append(["single + TTA (4 views, through the scorer)", 1, f"{rows['single']['bytes'] / 1e6:.2f}",
                  f"{tta['tta']:.2f}", "", "", f"{tta['tta'] / tta['plain']:.2f}x (vs {tta['plain']:.2f} ms)", ""])
    calibration = max(rows[n]["threads"]["1"]["median_ms"] for n in ("temperature", "isotonic")) / base - 1
    ensemble = max(rows[f"ensemble-{k}"]["threads"]["1"]["median_ms"] / (k * base) for k in ENSEMBLE_SIZES)
    checks = [check("latency added by calibration (largest of temperature, isotonic)", calibration, "<=", 0.10),
              check("ensemble latency / (K x one model), largest over K", ensemble, "<=", 1.1),
              check("TTA latency / without TTA", tta["tta"] / tta["plain"], "<=", 4.5)]
    md = (f"Run `{results['run']}`, input {results['input_shape']}; LiteRT alone (no TensorFlow), batch 1, median of "
          f"{results['runs']} invokes after 10 warm-up ones, the fastest of {results['repeats']} fresh processes "
          "(random pixels: the cost does not depend on them); memory is the interpreter's RSS rise; TTA over "
          f"{results['images']} images through `Scorer.predict`, batch 1, 1 thread.\n\n"
          + markdown_table(["variant", "members", "MB", "ms/image 1T", "p90 1T", "ms/image 2T", "vs single 1T",
                            "memory MB"], table) + "\n\n" + checks_table(checks))
    return checks, md


def run_suite(quick: bool, work: Path) -> dict:
    """For `python -m benchmarks`: the robustness suite's default run (quick: ~1,300 radiographs, 64 px)."""
    from benchmarks.robustness import default_run

    data = require_dir(DEFAULT_SHARED_DATA / "kermany224" / "train", "--data", "the shared Kermany radiographs")
    size, epochs, subset = (64, 4, 1300) if quick else (128, 8, None)
    run_dir, _, _ = default_run(data, work / "robustness", size=size, epochs=epochs, workers=2, subset=subset)
    return measure_run(run_dir, work / "trust", runs=100 if quick else 300, images=64 if quick else 256)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.trust", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="examples:\n  python -m benchmarks.trust --run runs/kermany/final\n"
                             "  python -m benchmarks.trust --quick        # trains the robustness suite's run first")
    p.add_argument("--run", type=Path, help="a finished training run (default: the robustness suite's own run)")
    p.add_argument("--runs", type=int, default=300, help="timed invokes per variant and thread count")
    p.add_argument("--images", type=int, default=256, help="images for the TTA timing")
    p.add_argument("--quick", action="store_true", help="the default run at 64 px; 100 invokes, 64 images")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="scratch folder (reused)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--child", choices=("build", "measure", "tta"), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.images < 1:
        raise CxrError("--runs and --images must be at least 1")
    if args.child == "build":
        print(json.dumps(child_build(args.run, Path(args.work))))
        return 0
    if args.child:
        print(json.dumps(child_measure(args.model, args.runs, args.images, args.child == "tta")))
        return 0
    setup_logging()
    if args.run is None:
        results = run_suite(args.quick, args.work)
    else:
        results = measure_run(args.run, args.work, 100 if args.quick else args.runs,
                              64 if args.quick else args.images)
    report(args.out, "trust", results, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
