"""python -m benchmarks.robustness: a trained model on its own test split under acquisition shifts.

    python -m benchmarks.robustness --run runs/kermany --input ~/chest_xray/train --salt-file prepared/salt

A validation score is not the world: another hospital's radiographs differ in exposure, processing, detector
resolution, noise and compression. This suite re-reads the test split's own files (patient-disjoint from
training), changes them the way another site's acquisition would, runs the run's whole transform (the same
pure function as preparation and prediction) and scores them with the exported model:

  none             the files as they are (matches distributed.evaluate on the test split)
  gamma, contrast, blur, noise, jpeg, zoom
                   the nine acquisition shifts listed in preprocessing/shifts.py: another detector, window,
                   resolution, dose, PACS export or collimation
  fullres          the full-resolution originals of the same test radiographs (--fullres), through the
                   whole transform: the real input size and decoder path (only the test split's images)

Per shift: ROC-AUC (95 % bootstrap interval), and accuracy, sensitivity and specificity at the threshold
chosen on the validation split (by --threshold: the run's own evaluation's rule unless told, else Youden;
never on test). Beside them, the run's own training and calibration: its best validation AUC, how far
validation loss and accuracy swing after the first two epochs (judged in inference mode, as the checkpoints
are), and the carved test split's ECE after the built-in calibration fitted on validation.

Mapping the test split back to files needs the salt its ids were hashed with: prepare with --salt-file
(launch.pipeline does). Without --run, the suite prepares the shared Kermany radiographs with a salt of its
own and trains the CNN on them (reused across invocations).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import (DEFAULT_RESULTS, DEFAULT_SHARED_DATA, HOROVODRUN, REPO, check, checks_table,
                               markdown_table, report, require_dir, run_command)
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from preprocessing import schema
from preprocessing.shifts import SHIFTS as ACQUISITION_SHIFTS

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.
log = logging.getLogger("cxrscale.benchmarks")
MAX_AUC_DROP = 0.05  # the target: no controlled shift costs more than this much test AUC
# The run's own training and calibration, on the same carved split (what the test suite checked on the whole
# Kermany split until it moved here): the model validation judges in inference mode learns and does not
# swing from epoch to epoch once past its first two. The carved test split's ECE is reported, not a target:
# the default calibration keeps the balanced prior of class weighting for other sites' sake, which reads
# worse at the training source's own prevalence; calibration is judged where it matters, at another site
# (benchmarks.shift).
MIN_VAL_AUC = 0.95
MAX_LOSS_OVER_BEST = 2.0      # later epochs' validation loss within twice its best
MAX_ACCURACY_BELOW_BEST = 0.05  # later epochs' validation accuracy at 0.5 within 5 points of its best


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {"none": None, **ACQUISITION_SHIFTS}


# --- files of the test split ----------------------------------------------------------------------------

def test_split_files(input_dir: Path, prepared: Path, salt: bytes, split: str = "test") -> list[tuple[Path, int]]:
    """(file, label) of every record of `split` in `prepared`, found by recomputing the salted id hashes of
    the files under `input_dir` (the folder or CSV the dataset was prepared from)."""
    from preprocessing.records import keyed_hash
    from preprocessing.sources import discover

    with open(prepared / schema.SPLIT_CSV, newline="") as fh:
        wanted = {r["id"]: int(r["label"]) for r in csv.DictReader(fh) if r["split"] == split}
    if not wanted:
        raise CxrError(f"{prepared} has no {split} split")
    found = []
    for item in discover(input_dir).items:
        record_id = keyed_hash(salt, "id", item.rel)
        if record_id in wanted:
            found.append((Path(item.path), wanted[record_id]))
    if len(found) < len(wanted):
        raise CxrError(f"only {len(found)} of the {len(wanted)} {split} records of {prepared} were found under "
                       f"--input {input_dir} with this --salt-file: give the folder and salt the dataset was "
                       "prepared with")
    return found


def shifted_images(files: Sequence[Path], params, shift: Callable | None) -> np.ndarray:
    """The whole transform of each file, with `shift` applied to its decoded pixels first."""
    from preprocessing.transform import Decoded, decode, transform_decoded

    out = []
    for path in files:
        decoded = decode(path.read_bytes(), params.size, params.resize, path.name)
        if shift is not None:
            decoded = Decoded(shift(decoded.pixels), decoded.original_shape, decoded.fmt)
        out.append(transform_decoded(decoded, params))
    return np.stack(out)


def shift_metrics(y: np.ndarray, p: np.ndarray, threshold: float, *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    from distributed.model import metrics as m

    row: dict[str, Any] = {"n": int(len(y)), "positives": int(y.sum())}
    summary = m.binary_summary(y, p, threshold)
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece"):
        row[key] = summary.get(key)
    if len(np.unique(y)) == 2 and n_bootstrap:
        row["roc_auc_ci"] = m.bootstrap_intervals({"roc_auc": m.roc_auc}, y, p, n_resamples=n_bootstrap,
                                                  seed=seed)["roc_auc"]
    return row


def measure(run_dir: Path, input_dir: Path, salt: bytes, fullres: Path | None, *, tta: bool = False,
            rule=None, n_bootstrap: int = 500, seed: int = 0) -> dict[str, Any]:
    """Every shift's figures at the threshold `rule` (a scores.ThresholdRule, default youden) chooses on the
    run's validation split."""
    from distributed.evaluation.scores import ThresholdRule, score_split
    from distributed.model.scoring import load_scorer, read_run_config, run_model_path
    from preprocessing.sources import discover
    from preprocessing.transform import TransformParams

    config = read_run_config(run_dir)
    prepared = Path(config["config"]["data"])
    manifest = json.loads((run_dir / "dataset_manifest.json").read_text())
    params = TransformParams.from_dict(manifest["transform"])
    scorer = load_scorer(run_model_path(run_dir))
    scorer.tta = tta
    rule = rule or ThresholdRule("youden")
    val = score_split(scorer, prepared, "val", shifted=rule.needs_shifts)
    threshold = rule.choose(val.labels, val.probs[:, 1], val.shifted_positive)
    files = test_split_files(input_dir, prepared, salt)
    labels = np.array([label for _, label in files])
    rows: dict[str, Any] = {}
    for name, shift in SHIFTS.items():
        probs = scorer.predict(shifted_images([f for f, _ in files], params, shift))[:, 1]
        rows[name] = shift_metrics(labels, probs, threshold, n_bootstrap=n_bootstrap, seed=seed)
        log.info("%-12s AUC %.4f  accuracy %.3f", name, rows[name]["roc_auc"] or float("nan"),
                 rows[name]["accuracy"] or float("nan"))
    if fullres is not None:
        by_name = {Path(item.path).name: Path(item.path) for item in discover(fullres, option="--fullres").items}
        matched = [(by_name[f.name], label) for f, label in files if f.name in by_name]
        if matched:
            probs = scorer.predict(shifted_images([f for f, _ in matched], params, None))[:, 1]
            rows["fullres"] = shift_metrics(np.array([label for _, label in matched]), probs, threshold,
                                            n_bootstrap=n_bootstrap, seed=seed)
            rows["fullres"]["note"] = f"the {len(matched)} test images that have a full-resolution original"
        else:
            rows["fullres"] = {"n": 0, "note": f"none of the test images has a full-resolution original in {fullres}"}
    from distributed.evaluate import split_origin

    return {"run": str(run_dir), "data": str(prepared), "test_origin": split_origin(schema.read_manifest(prepared),
                                                                                    "test"),
            "threshold": threshold, "threshold_rule": str(rule), "tta": tta, "shifts": rows,
            "training": training_stability(run_dir)}


def training_stability(run_dir: Path) -> dict[str, Any]:
    """From the run's history.csv and calibration.json: its best validation AUC, and after its first two
    epochs the highest validation loss over the best one and the largest fall of validation accuracy (at 0.5)
    below the best; the calibration method and what it was fitted on. An ensemble (distributed.ensemble) has
    no history of its own: each member's is read, and the weakest member's figure is the ensemble's."""
    from cxrscale.files import read_numeric_csv

    calibration = json.loads((run_dir / "calibration.json").read_text()) if (run_dir / "calibration.json").is_file() \
        else {}
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    members = [Path(m) for m in (config.get("ensemble") or {}).get("members", [])] or [run_dir]
    histories = {str(m): read_numeric_csv(m / "history.csv") for m in members}
    out: dict[str, Any] = {"epochs": max(len(rows) for rows in histories.values()),
                           "calibration": calibration.get("method"),
                           "calibration_fitted_on": calibration.get("fitted_on")}
    judged = []
    for rows in histories.values():
        if rows:
            best_loss, best_accuracy = min(r["val_loss"] for r in rows), max(r["val_accuracy"] for r in rows)
            later = rows[2:] or rows
            judged.append({"best_val_auc": max(r["val_auc"] for r in rows),
                           "loss_over_best": max(r["val_loss"] for r in later) / best_loss,
                           "accuracy_below_best": best_accuracy - min(r["val_accuracy"] for r in later)})
    if judged and len(judged) == len(histories):
        out.update(best_val_auc=min(j["best_val_auc"] for j in judged),
                   loss_over_best=max(j["loss_over_best"] for j in judged),
                   accuracy_below_best=max(j["accuracy_below_best"] for j in judged))
    histories = {m: [{k: r[k] for k in ("epoch", "val_loss", "val_accuracy", "val_auc")} for r in rows]
                 for m, rows in histories.items()}
    if len(members) > 1:
        out["members"] = histories
    else:
        out["history"] = histories[str(run_dir)]
    return out


# --- default run, report -------------------------------------------------------------------------------

def default_run(data: Path, work: Path, *, size: int, epochs: int, workers: int,
                subset: int | None = None) -> tuple[Path, Path, bytes]:
    """The shared radiographs prepared with this suite's own salt (80/10/10 by patient) and the CNN trained on
    them; reused when present. Returns (run, the input the dataset was prepared from, the salt)."""
    from preprocessing.sources import patient_subset_csv

    work.mkdir(parents=True, exist_ok=True)
    salt_file = work / "salt"
    if not salt_file.is_file():
        salt_file.write_bytes(b"cxrscale-robustness-benchmark-salt")
    source = data if subset is None else patient_subset_csv(data, work / f"subset{subset}.csv", subset, seed=2)
    prepared, run_dir = work / f"prepared{size}", work / f"cnn{size}"
    if not (prepared / schema.MANIFEST).is_file():
        run_command([sys.executable, "-m", "preprocessing", "--input", str(source), "--output", str(prepared),
                     "--size", str(size), "--salt-file", str(salt_file), "--workers", "2", "-q"])
    if not (run_dir / "model" / "saved_model.pb").is_file():
        cmd = [sys.executable, "-m", "distributed.train", "--data", str(prepared), "--model", "cnn", "--epochs",
               str(epochs), "--batch-size", "32", "--output", str(run_dir)]
        run_command([HOROVODRUN, "-np", str(workers), "--gloo", *cmd] if workers > 1 else cmd)
    return run_dir, source, salt_file.read_bytes()


def summarise(results: dict) -> tuple[list[dict], str]:
    shifts = results["shifts"]
    base = shifts["none"].get("roc_auc")

    def fmt(v, digits=3):
        return "" if v is None else f"{v:.{digits}f}"

    rows = []
    for name, r in shifts.items():
        ci = r.get("roc_auc_ci") or {}
        interval = f"{ci['low']:.3f}-{ci['high']:.3f}" if ci.get("low") is not None else ""
        drop = None if (r.get("roc_auc") is None or base is None) else base - r["roc_auc"]
        rows.append([name, r.get("n", 0), fmt(r.get("roc_auc"), 4), interval, fmt(drop, 4), fmt(r.get("accuracy")),
                     fmt(r.get("sensitivity")), fmt(r.get("specificity")), fmt(r.get("ece"))])
    checks = [check(f"AUC drop under {name}", None if r.get("roc_auc") is None or base is None
                    else base - r["roc_auc"], "<=", MAX_AUC_DROP)
              for name, r in shifts.items() if name != "none" and r.get("n")]
    training = results.get("training") or {}
    checks += [check("best validation AUC", training.get("best_val_auc"), ">=", MIN_VAL_AUC),
               check("validation loss after epoch 2 / its best", training.get("loss_over_best"), "<=",
                     MAX_LOSS_OVER_BEST),
               check("validation accuracy after epoch 2 below its best", training.get("accuracy_below_best"), "<=",
                     MAX_ACCURACY_BELOW_BEST)]
    text = (f"Run `{results['run']}`, test split of `{results['data']}` "
            f"({results.get('test_origin', 'carved at random, grouped by patient')}), threshold "
            f"{results['threshold']:.4f} ({results.get('threshold_rule', 'youden')} on validation)"
            f"{', with test-time augmentation' if results['tta'] else ''}.\n\n"
            + markdown_table(["shift", "images", "ROC-AUC", "95 % CI", "AUC drop", "accuracy", "sensitivity",
                              "specificity", "ECE"], rows))
    notes = [f"- fullres: {shifts['fullres']['note']}"] if "fullres" in shifts else []
    moved = operating_point_moves(shifts)
    if moved:
        notes.insert(0, "- the operating point: " + "; ".join(
            f"{metric} at the validation threshold falls most under {name}, by {drop:.3f} (from {before:.3f})"
            for metric, (name, drop, before) in moved.items()) + ". The AUC target does not see this.")
    return checks, text + ("\n\n" + "\n".join(notes) if notes else "") + "\n\n## Targets\n\n" + checks_table(checks)


def operating_point_moves(shifts: dict[str, dict]) -> dict[str, tuple[str, float, float]]:
    """{metric: (shift, fall, unshifted value)} for sensitivity and specificity at the validation threshold:
    the shift under which each falls the most, when one lowers it. A shift can leave the ranking (ROC-AUC)
    alone and still move every score across the threshold one way."""
    base, out = shifts["none"], {}
    for metric in ("sensitivity", "specificity"):
        falls = {name: base[metric] - r[metric] for name, r in shifts.items()
                 if name != "none" and r.get(metric) is not None and base.get(metric) is not None}
        if falls and max(falls.values()) > 0:
            name = max(falls, key=falls.get)
            out[metric] = (name, falls[name], base[metric])
    return out


def plots(results: dict, out: Path) -> list[Path]:
    from cxrscale.figures import save_figure, styled

    @styled
    def draw(path: Path) -> Path:
        import matplotlib.pyplot as plt

        names = [n for n, r in results["shifts"].items() if r.get("roc_auc") is not None]
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        aucs = [results["shifts"][n]["roc_auc"] for n in names]
        low = [a - (results["shifts"][n].get("roc_auc_ci") or {}).get("low", a) for n, a in zip(names, aucs)]
        high = [(results["shifts"][n].get("roc_auc_ci") or {}).get("high", a) - a for n, a in zip(names, aucs)]
        ax.bar(names, aucs, yerr=[low, high], color=["C0"] + ["C1"] * (len(names) - 1), capsize=3)
        ax.axhline(aucs[0] - MAX_AUC_DROP, ls="--", color="grey", lw=1, label=f"baseline - {MAX_AUC_DROP}")
        ax.set(ylabel="test ROC-AUC", ylim=(max(0.5, min(aucs) - 0.1), 1.0), title="AUC under acquisition shifts")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(loc="lower left")
        return save_figure(fig, path)

    return [draw(out / "robustness-auc.png")]


def run_suite(quick: bool, work: Path) -> dict:
    """For `python -m benchmarks`: quick uses ~1,300 radiographs at 64 px and 4 epochs; full, the whole shared
    train split at 128 px and 8 epochs."""
    data = require_dir(DEFAULT_SHARED_DATA / "kermany224" / "train", "--data", "the shared Kermany radiographs")
    fullres = DEFAULT_SHARED_DATA / "kermany-fullres"
    size, epochs, subset = (64, 4, 1300) if quick else (128, 8, None)
    run_dir, source, salt = default_run(data, work / "robustness", size=size, epochs=epochs, workers=2, subset=subset)
    return measure(run_dir, source, salt, fullres if fullres.is_dir() else None, n_bootstrap=200 if quick else 1000)


def build_parser() -> argparse.ArgumentParser:
    from distributed.evaluation.scores import parse_threshold

    p = OneLineParser(prog="python -m benchmarks.robustness", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1] + "\nexamples:\n"
                                       "  python -m benchmarks.robustness --run OUT/final --input chest_xray "
                                       "--salt-file OUT/salt\n"
                                       "  python -m benchmarks.robustness          # prepares and trains its own run")
    p.add_argument("--run", type=Path, help="a run folder (a launch.pipeline OUT/final, a training run, an ensemble)")
    p.add_argument("--input", type=Path, help="the folder or CSV the run's dataset was prepared from")
    p.add_argument("--salt-file", type=Path, help="the --salt-file the dataset was prepared with")
    p.add_argument("--fullres", type=Path, default=DEFAULT_SHARED_DATA / "kermany-fullres",
                   help="class folders of full-resolution originals, matched by file name (default: the shared "
                        "kermany-fullres; 'none' to skip)")
    p.add_argument("--tta", action="store_true", help="score with test-time augmentation")
    p.add_argument("--threshold", type=parse_threshold, default=None,
                   help="the rule the operating threshold is chosen on validation by, as distributed.evaluate's "
                        "--threshold: youden, robust, sensitivity:X, ... (default: the rule of the run's own "
                        "evaluation, else youden)")
    p.add_argument("--size", type=int, default=128, help="image size of the default run (without --run)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the default run (without --run)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-robustness",
                   help="where the default run goes (reused across invocations)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    fullres = None if str(args.fullres).lower() == "none" or not args.fullres.is_dir() else args.fullres
    if args.run:
        if not (args.input and args.salt_file):
            raise CxrError("--run needs --input and --salt-file: the folder and salt its dataset was prepared with")
        try:
            salt = args.salt_file.read_bytes()
        except OSError as err:
            raise CxrError(f"--salt-file {args.salt_file} cannot be read: {err.strerror or err}") from None
        run_dir, source = args.run, args.input
    else:
        data = require_dir(DEFAULT_SHARED_DATA / "kermany224" / "train", "--data", "the shared Kermany radiographs")
        run_dir, source, salt = default_run(data, args.work, size=args.size, epochs=args.epochs, workers=2)
    from distributed.evaluation.scores import evaluated_rule

    rule = args.threshold or evaluated_rule(run_dir)  # measure() falls back to youden
    results = measure(run_dir, source, salt, fullres, tta=args.tta, rule=rule, n_bootstrap=args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    results["plots"] = [p.name for p in plots(results, args.out)]
    report(args.out, "robustness", results, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
