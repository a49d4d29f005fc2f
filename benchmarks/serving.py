"""python -m benchmarks.serving: the exported formats of a trained run, measured: their parity with the Keras
model on real radiographs, and what a prediction process costs on each.

    python -m benchmarks.serving --run runs/kermany/final --input ~/chest_xray/test/PNEUMONIA
    python -m benchmarks.serving              # prepares and trains its own run on the shared radiographs

1. `optimize.export --format all` writes TF Serving, ONNX and TFLite and checks each against the Keras model
   on the whole test split (the largest probability difference per format, timed per format).
2. `distributed.predict` on --files real radiographs, each way in fresh processes (median of --repeats):
     litert       --model model.tflite, as shipped: LiteRT, TensorFlow never imported
     tensorflow   the same .tflite with TensorFlow loaded first, as the toolkit did before LiteRT
     savedmodel   --run: the Keras SavedModel (TensorFlow, tf_keras)
   For each: the process's wall time, the time to import distributed.predict, to load the model and to
   predict, its peak RSS, and whether TensorFlow ended up in sys.modules.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import (DEFAULT_RESULTS, DEFAULT_SHARED_DATA, REPO, check, checks_table, markdown_table, report,
                               require_dir, run_command)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import read_json

WAYS = ("litert", "tensorflow", "savedmodel")
# The child: times its own imports and work, prints one JSON line. TensorFlow first for the "tensorflow" way.
CHILD = """
import json, sys, time
from benchmarks.common import peak_rss_mb  # before the clock starts: plain Python, no TensorFlow
start = time.perf_counter()
if sys.argv[1] == "tensorflow":
    import distributed.model.kerasenv  # what distributed.predict imported first before LiteRT
from distributed import predict
imported = time.perf_counter()
from distributed.model.scoring import load_scorer
from cxrscale.console import setup_logging
scorer = load_scorer(sys.argv[2])
loaded = time.perf_counter()
config = predict.parse_config(sys.argv[3:])
setup_logging(40)
rows = predict.predict(config)
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "predict_s": done - loaded,
                  "peak_rss_mb": peak_rss_mb(), "rows": len(rows),
                  "errors": sum("error" in r for r in rows), "tensorflow_loaded": "tensorflow" in sys.modules}))
"""


def export_all(run_dir: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    run_command([sys.executable, "-m", "optimize.export", "--run", str(run_dir), "--output", str(out),
                 "--check-images", "100000", "-q"])
    record = read_json(out / "export.json", "export record")
    record["seconds"] = time.perf_counter() - started
    return record


def predict_costs(way: str, model: Path, source: list[str], files: Sequence[Path], repeats: int) -> dict[str, Any]:
    """Median over `repeats` fresh processes of what one prediction run costs `way`; `source` is what tells
    distributed.predict the model (--run RUN, or --model FILE --manifest MANIFEST)."""
    samples = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            proc = run_command([sys.executable, "-c", CHILD, way, str(model), *source, "-q", "--output",
                                str(Path(tmp) / "rows.csv"), *map(str, files)])
            wall = time.perf_counter() - started
        samples.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall})
    keys = ("wall_s", "import_s", "load_s", "predict_s", "peak_rss_mb")
    return {**{k: statistics.median(s[k] for s in samples) for k in keys}, "runs": repeats, "files": len(files),
            "errors": samples[-1]["errors"], "tensorflow_loaded": samples[-1]["tensorflow_loaded"]}


def measure(run_dir: Path, files: Sequence[Path], work: Path, repeats: int) -> dict[str, Any]:
    if not (run_dir / "model" / "saved_model.pb").is_file():
        raise CxrError(f"--run {run_dir} is not a finished training run (no model/saved_model.pb)")
    if not files:
        raise CxrError("no radiographs to predict (--input holds no image files)")
    export_dir = work / f"export-{time.strftime('%Y%m%d-%H%M%S')}"
    record = export_all(run_dir, export_dir)
    tflite = Path(record["formats"]["tflite"]["path"])
    lite = ["--model", str(tflite), "--manifest", str(run_dir / "dataset_manifest.json")]
    costs = {way: predict_costs(way, run_dir / "model" if way == "savedmodel" else tflite,
                                ["--run", str(run_dir)] if way == "savedmodel" else lite, files, repeats)
             for way in WAYS}
    parity = {fmt: entry["parity"] for fmt, entry in record["formats"].items()}
    return {"run": str(run_dir), "export": str(export_dir), "export_seconds": record["seconds"],
            "checked_on": record["checked_on"], "parity": parity, "predict": costs}


def summarise(results: dict) -> tuple[list[dict], str]:
    parity, costs = results["parity"], results["predict"]
    lite, tf_way = costs["litert"], costs["tensorflow"]
    checks = [check("ONNX Runtime vs Keras, largest probability difference", parity["onnx"]["max_abs_difference"],
                    "<=", 1e-4),
              check("LiteRT vs Keras, largest probability difference", parity["tflite"]["max_abs_difference"],
                    "<=", 1e-4),
              check("TF Serving SavedModel vs Keras, largest difference", parity["serving"]["max_abs_difference"],
                    "<=", 1e-5),
              check("TensorFlow modules loaded by a .tflite prediction", float(lite["tensorflow_loaded"]), "<=", 0),
              check("import + load time, LiteRT / TensorFlow route", (lite["import_s"] + lite["load_s"]) /
                    (tf_way["import_s"] + tf_way["load_s"]), "<=", 0.5),
              check("peak memory, LiteRT / TensorFlow route", lite["peak_rss_mb"] / tf_way["peak_rss_mb"], "<=", 0.5)]
    md = [f"Run `{results['run']}`; every format checked on the {results['checked_on']['images']} radiographs of the "
          f"`{results['checked_on']['split']}` split of `{results['checked_on']['data']}`.", "",
          markdown_table(["format", "largest |p - p_keras|", "images"],
                         [[f, f"{p['max_abs_difference']:.2e}", p["images"]] for f, p in parity.items()]), "",
          f"`distributed.predict` on {lite['files']} radiographs, median of {lite['runs']} fresh processes:", "",
          markdown_table(["way", "process wall s", "import s", "load s", "predict s", "peak RSS MiB", "TensorFlow"],
                         [[w, f"{c['wall_s']:.2f}", f"{c['import_s']:.2f}", f"{c['load_s']:.2f}",
                           f"{c['predict_s']:.2f}", f"{c['peak_rss_mb']:.0f}",
                           "yes" if c["tensorflow_loaded"] else "no"]
                          for w, c in costs.items()]), "", checks_table(checks)]
    return checks, "\n".join(md)


def image_files(folder: Path, count: int) -> list[Path]:
    suffixes = (".jpeg", ".jpg", ".png", ".dcm")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)[:count]


def run_suite(quick: bool, work: Path) -> dict:
    """For `python -m benchmarks`: the robustness suite's default run (quick: ~1,300 radiographs, 64 px)."""
    from benchmarks.robustness import default_run

    data = require_dir(DEFAULT_SHARED_DATA / "kermany224" / "train", "--data", "the shared Kermany radiographs")
    size, epochs, subset = (64, 4, 1300) if quick else (128, 8, None)
    run_dir, _, _ = default_run(data, work / "robustness", size=size, epochs=epochs, workers=2, subset=subset)
    files = image_files(DEFAULT_SHARED_DATA / "kermany-fullres", 32 if quick else 128)
    return measure(run_dir, files, work / "serving", repeats=3 if quick else 5)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog=__doc__.split("\n\n", 1)[1] + "\nexamples:\n"
                             "  python -m benchmarks.serving --run runs/kermany/final --input chest_xray/test\n"
                             "  python -m benchmarks.serving --quick")
    p.add_argument("--run", type=Path, help="a finished run (default: train the robustness suite's own run)")
    p.add_argument("--input", type=Path, default=DEFAULT_SHARED_DATA / "kermany-fullres",
                   help="radiographs to predict (default: the shared full-resolution ones)")
    p.add_argument("--files", type=int, default=128, help="how many of them (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per way (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="the default run at 64 px on ~1,300 images; 32 files, 3 repeats")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench", help="scratch folder (reused)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.run is None:
        results = run_suite(args.quick, args.work)
    else:
        files = image_files(require_dir(args.input, "--input", "radiographs to predict"), args.files)
        results = measure(args.run, files, args.work / "serving", args.repeats if not args.quick else 3)
    report(args.out, "serving", results, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
