"""python -m distributed.predict: classify radiographs (JPEG, PNG, DICOM) with a trained model.

    python -m distributed.predict --run runs/kermany-cnn scans/ patient7.dcm
    python -m distributed.predict --model runs/kermany-cnn/optimized/ptq-int8.tflite --format json scans/

Each image gets exactly the transform its model's training data was prepared with (read from the run's
dataset manifest), so there is no train/serve skew. One row per image: file, predicted class, probability
of the positive class (K classes: of the predicted class), the threshold used, the out-of-distribution
score and whether it is outside what the model was trained on (the guard the run's evaluation fitted:
distributed.model.guard), and an error for a file that cannot be read; the others are still predicted, and
the exit status is 1 if any file failed.

A `.tflite` model runs on LiteRT (`ai_edge_litert`): such a prediction never imports TensorFlow, so it
starts in a fraction of the time and memory (docs/serving.md).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distributed.model.guard import GUARD_FILE, OUTSIDE, Guard
from distributed.model.scoring import (adapted_finding_thresholds, adapted_threshold, load_scorer, read_run_config,
                                       run_head, run_model_path)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, config_from, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import read_json, write_text_atomic
from preprocessing.transform import ImageRejected, TransformParams, transform

log = logging.getLogger("cxrscale.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
RUN_MANIFEST = "dataset_manifest.json"
EXPORT_RECORD = "export.json"  # optimize.export's record: transform, classes, the evaluation's threshold
CHUNK = 256  # images transformed and held at once


def find_run_dir(model_path: Path) -> Path | None:
    """The training run a model file belongs to (it or a parent holds dataset_manifest.json)."""
    for folder in [model_path, *model_path.parents][:4]:
        if (folder / RUN_MANIFEST).is_file():
            return folder
    return None


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted); a missing path is an error."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                log.warning("%s holds no image files (%s)", path, ", ".join(IMAGE_SUFFIXES))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CxrError(f"input not found: {path}")
    if not files:
        raise CxrError("no image files to predict")
    return files


def find_export_record(model_path: Path) -> Path | None:
    """The export.json of the optimize.export folder a model file belongs to (TF Serving or TFLite layout)."""
    for folder in [model_path, *model_path.parents][:5]:
        if (folder / EXPORT_RECORD).is_file():
            return folder / EXPORT_RECORD
    return None


def find_guard(run_dir: Path | None, exported: Path | None) -> Guard | None:
    """The out-of-distribution guard fitted by the run's evaluation (RUN/eval/guard.npz), or the one
    optimize.export wrote beside export.json; None (with a warning) when there is none."""
    candidates = ([run_dir / "eval" / GUARD_FILE] if run_dir else []) + \
        ([exported.parent / GUARD_FILE] if exported else [])
    for path in candidates:
        if path.is_file():
            return Guard.load(path)
    log.warning("no out-of-distribution guard found (%s): images unlike the training data are not flagged; "
                "python -m distributed.evaluate fits one", ", ".join(map(str, candidates)) or "no run folder")
    return None


def read_evaluation(metrics_file: Path | None, tta: bool) -> dict[str, Any] | None:
    """The run's evaluation record (its eval/metrics.json, or the export.json that carries its thresholds),
    with a warning when its thresholds were chosen with or without test-time augmentation and this prediction
    runs the other way (the probabilities the thresholds were chosen on are then not these)."""
    if not (metrics_file and metrics_file.is_file()):
        return None
    metrics = read_json(metrics_file, "evaluation metrics")
    if bool(metrics.get("tta")) != tta:
        log.warning("the threshold was chosen by an evaluation %s test-time augmentation, and this prediction "
                    "runs %s it: pass the same --tta to both", "with" if metrics.get("tta") else "without",
                    "with" if tta else "without")
    return metrics


def default_threshold(metrics_file: Path | None, tta: bool = False) -> tuple[float, str]:
    """The operating threshold chosen on validation by the run's evaluation (its eval/metrics.json, or the
    export.json that carries it), else 0.5."""
    metrics = read_evaluation(metrics_file, tta)
    chosen = (metrics or {}).get("threshold", {})
    if chosen and chosen.get("value") is not None:
        where = chosen.get("chosen_on") or "val"
        return float(chosen["value"]), f"{chosen['rule']} on {'validation' if where == 'val' else where} " \
                                       f"({metrics_file})"
    return 0.5, "0.5 (no evaluation of this run found: run python -m distributed.evaluate to choose one)"


@dataclass(frozen=True)
class PredictConfig:
    """Every option of `python -m distributed.predict` (see `build_parser`), as `parse_config` builds it."""

    inputs: tuple[str, ...]
    run: str | None = None
    model: str | None = None
    manifest: str | None = None
    threshold: float | None = None
    gradcam: str | None = None
    format: str = "csv"
    output: str | None = None
    batch_size: int = 32
    tta: bool = False
    quiet: bool = False


def predict(config: PredictConfig) -> list[dict[str, Any]]:
    files = expand_inputs(config.inputs)
    model_path = Path(config.model) if config.model else run_model_path(config.run)
    run_dir = Path(config.run) if config.run else find_run_dir(model_path.resolve())
    manifest_path = Path(config.manifest) if config.manifest else (run_dir / RUN_MANIFEST if run_dir else None)
    exported = None if manifest_path else find_export_record(model_path.resolve())
    if manifest_path is None and exported is None:
        raise CxrError(f"cannot tell how {model_path}'s training images were prepared: pass --manifest with the "
                       "prepared dataset's manifest.json (or the run's dataset_manifest.json)")
    if manifest_path is not None and manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.json"
    manifest_path = manifest_path or exported  # an export folder's export.json has the transform and classes
    manifest = read_json(manifest_path, "dataset manifest" if exported is None else "export record")
    params = TransformParams.from_dict(manifest["transform"])
    classes = list(manifest["classes"])
    recorded = run_dir is not None and (run_dir / "config.json").is_file()
    scorer = load_scorer(model_path, head=run_head(read_run_config(run_dir)) if recorded else None)
    scorer.tta = config.tta
    if scorer.input_shape != (params.size, params.size, 1):
        raise CxrError(f"{model_path} takes {scorer.input_shape} images but {manifest_path} prepares "
                       f"{params.size}x{params.size}x1: the manifest is not this model's")
    if config.gradcam and scorer.keras_model is None:
        raise CxrError(f"--gradcam needs a Keras model; {model_path} is {scorer.kind}: use --run or the "
                       "SavedModel for heat-maps")
    binary = scorer.head.binary
    used_names: set[str] = set()
    if scorer.head.multilabel:
        threshold, why = None, ""  # a threshold per finding, below
    elif config.threshold is not None:
        threshold, why = config.threshold, "--threshold"
    elif run_dir and not (run_dir / "eval" / "metrics.json").is_file() and adapted_threshold(run_dir):
        threshold, why = adapted_threshold(run_dir)  # an adapted run not evaluated since
    else:
        threshold, why = default_threshold(run_dir / "eval" / "metrics.json" if run_dir else exported, config.tta)
    if binary:
        log.info("threshold %.4f: %s", threshold, why)
    thresholds = None
    if scorer.head.multilabel:  # a threshold per finding
        thresholds, why = finding_thresholds(run_dir / "eval" / "metrics.json" if run_dir else exported, classes,
                                             config.threshold, config.tta,
                                             adapted_finding_thresholds(run_dir) if run_dir else None)
        log.info("a threshold per finding: %s", why)
    guard = find_guard(run_dir, None if run_dir else exported or find_export_record(model_path.resolve()))
    if guard is not None and guard.fitted.get("image_size") not in (0, params.size):
        raise CxrError(f"the out-of-distribution guard beside {model_path} was fitted on "
                       f"{guard.fitted['image_size']} px images, the model takes {params.size} px")

    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), CHUNK):  # bounded memory on folders of any size
        chunk_rows, images = [], []
        for path in files[start:start + CHUNK]:
            try:
                images.append(transform(path.read_bytes(), params, path.name))
                chunk_rows.append({"file": str(path)})
            except (ImageRejected, OSError) as err:
                rows.append({"file": str(path), "error": str(err).strip() or type(err).__name__})
                log.error("%s: %s", path, rows[-1]["error"])
        if images:
            batch = np.stack(images)
            probs = scorer.predict(batch, config.batch_size)
            if thresholds is not None:
                for row, p in zip(chunk_rows, probs):
                    row.update(finding_row(p, classes, thresholds))
                pred = None
            else:
                pred = scorer.head.decide(probs, threshold if binary else None)
                for row, p, c in zip(chunk_rows, probs, pred):
                    row.update(predicted=classes[c], probability=float(p[1] if binary else p[c]),
                               threshold=threshold if binary else "argmax")
            if guard is not None:
                ood = guard.scores(batch)
                for row, score, outside in zip(chunk_rows, ood, guard.outside(ood)):
                    row.update(ood_score=float(score), outside=bool(outside))
            if config.gradcam:
                write_gradcams(Path(config.gradcam), scorer.keras_model, batch, pred, chunk_rows, used_names,
                               classes if thresholds is not None else None)
        rows += chunk_rows
    flagged = sum(bool(r.get("outside")) for r in rows)
    if flagged:
        log.warning("%d of %d predicted images are %s (out-of-distribution score above %.3f): their predictions are not "
                    "to be trusted", flagged, sum("error" not in r for r in rows), OUTSIDE, guard.threshold)
    order = {str(f): i for i, f in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["file"]])


def finding_thresholds(metrics_file: Path | None, findings: list[str], fixed: float | None, tta: bool = False,
                       adapted: tuple[dict[str, float], str] | None = None) -> tuple[list[float], str]:
    """A multi-label model's threshold per finding: --threshold for every finding when given, else the ones the
    run's evaluation chose (its eval/metrics.json, or the export.json that carries them: on validation, or a
    site's where distributed.adapt chose one), else those of an adapted run not evaluated since (`adapted`,
    0.5 for the findings its site had too few labels of), else 0.5."""
    if fixed is not None:
        return [fixed] * len(findings), "--threshold for every finding"
    record = read_evaluation(metrics_file, tta)
    if record is not None:
        summary = record.get("findings") or {}
        chosen = record.get("finding_thresholds") or {
            r["finding"]: r["threshold"] for r in summary.get("findings", [])}
        if all(chosen.get(f) is not None for f in findings):
            how = summary.get("rule_description") or "chosen on validation"
            return [float(chosen[f]) for f in findings], f"the evaluation's ({metrics_file}): {how}"
    if adapted:
        chosen, source = adapted
        return [chosen.get(f, 0.5) for f in findings], \
            f"{source} for {', '.join(f for f in findings if f in chosen)}, 0.5 for any other (not evaluated since)"
    return [0.5] * len(findings), "0.5 for every finding (no evaluation of this run found: run python -m " \
                                  "distributed.evaluate to choose one per finding)"


def finding_row(probs: np.ndarray, findings: list[str], thresholds: list[float]) -> dict[str, Any]:
    """One image of a multi-label model: the findings at or above their thresholds (joined by |, or "none"),
    and each finding's probability and decision."""
    positive = [f for f, p, t in zip(findings, probs, thresholds) if p >= t]
    row: dict[str, Any] = {"predicted": "|".join(positive) or "none"}
    for f, p, t in zip(findings, probs, thresholds):
        row[f"p_{f}"] = float(p)
        row[f"positive_{f}"] = bool(p >= t)
    return row


def write_gradcams(folder: Path, model, images: np.ndarray, pred: np.ndarray | None, rows: list[dict],
                   used: set[str], findings: list[str] | None = None) -> None:
    """Grad-CAM overlays under FOLDER: one of the predicted class per image (<file stem>-gradcam.png), or for a
    multi-label model one per finding called positive (<file stem>-<finding>-gradcam.png; none when no finding
    is). The row's "gradcam" names them, joined by | for several findings."""
    from distributed.evaluation.gradcam import file_stem, gradcam, overlay  # TensorFlow: a Keras model is loaded
    from distributed.evaluation.report import write_png

    folder.mkdir(parents=True, exist_ok=True)
    if findings is None:
        pairs = [(i, int(c), "") for i, c in enumerate(pred)]
    else:
        pairs = [(i, k, f"-{file_stem(name)}")
                 for i, row in enumerate(rows) for k, name in enumerate(findings) if row[f"positive_{name}"]]
    if not pairs:
        return
    index = np.array([i for i, _, _ in pairs])
    heat = gradcam(model, images[index], np.array([k for _, k, _ in pairs], np.int32))
    for (i, _, tag), h in zip(pairs, heat):
        stem = Path(rows[i]["file"]).stem
        name, n = f"{stem}{tag}-gradcam.png", 1
        while name in used:  # same stem in two folders
            n += 1
            name = f"{stem}-{n}{tag}-gradcam.png"
        used.add(name)
        write_png(folder / name, overlay(images[i], h))
        rows[i]["gradcam"] = "|".join(filter(None, [rows[i].get("gradcam"), str(folder / name)]))


def write_rows(rows: list[dict[str, Any]], fmt: str, out) -> None:
    if fmt == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    columns = ["file", "predicted"]
    columns += [c for r in rows for c in r if c.startswith(("p_", "positive_"))]  # a multi-label model's
    columns = list(dict.fromkeys(columns))
    if any("probability" in r for r in rows) or not any(c.startswith("p_") for c in columns):
        columns += ["probability", "threshold"]
    columns += [c for c in ("ood_score", "outside", "gradcam") if any(c in r for r in rows)] + ["error"]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else ("yes" if v else "no") if isinstance(v, bool)
                             else v) for k, v in row.items()})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m distributed.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example:\n  python -m distributed.predict --run runs/sample "
                                            "data/sample/test/PNEUMONIA")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of them")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a training run folder (runs/NAME): its exported model and transform")
    source.add_argument("--model", help="a model file: SavedModel folder, .keras/.h5 or .tflite")
    parser.add_argument("--manifest", help="the dataset manifest giving the transform, when --model is neither inside "
                                           "a run folder nor an optimize.export folder (export.json)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability threshold for the positive class (default: the one the run's evaluation "
                             "chose on validation, else 0.5)")
    parser.add_argument("--gradcam", metavar="OUT_DIR",
                        help="also write a Grad-CAM overlay per image here (a multi-label model: one per finding "
                             "called positive)")
    parser.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default csv)")
    parser.add_argument("--output", help="write the rows to this file instead of standard output")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average each image's output over 4 views (as is, 92 %% centre "
                             "zoom, gamma 0.8 and 1.25; never a flip); 4x the scoring time")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> PredictConfig:
    args = build_parser().parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise CxrError(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    return config_from(PredictConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(logging.WARNING if config.quiet else logging.INFO)
    rows = predict(config)
    if config.output:
        buf = io.StringIO()
        write_rows(rows, config.format, buf)
        write_text_atomic(config.output, buf.getvalue())
    else:
        write_rows(rows, config.format, sys.stdout)
    failed = sum("error" in r for r in rows)
    if failed:
        log.error("%d of %d files could not be predicted", failed, len(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
