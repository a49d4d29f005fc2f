"""python -m distributed.adapt: adapt a trained model to a new site with that site's own images.

    python -m distributed.adapt --run runs/kermany/final --labelled site-a/ --site site-a --output runs/site-a
    python -m distributed.adapt --run runs/kermany/final --unlabelled site-a-scans/ --adabn --site site-a \\
        --output runs/site-a-adabn

A model fitted and calibrated on one hospital's images ranks another's well enough but reads its
probabilities and its threshold wrongly. With a small labelled sample of the new site (class folders or a
CSV path,label; 50-200 images) this refits the calibration and chooses the operating threshold there, and
bootstraps both to say how sure the new operating point is and how many labelled images would narrow it
(distributed.evaluation.adaptation). Optionally (--adabn) it first re-estimates the BatchNormalization
statistics on the site's images, labelled or not (AdaBN, Li et al. 2016): measure whether that helps
(docs/evaluation.md); it is off by default.

It writes a new run folder that evaluate, predict, export and optimize take as it is: the adapted model,
its config.json and calibration.json, adaptation.json (site, sample, intervals), the original run's
out-of-distribution guard, and, when the original run's dataset is here, its evaluation at the site's
threshold and the model card, which records the adaptation.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxrscale.cli import OneLineParser, config_from, run_cli
from cxrscale.console import setup_logging
from cxrscale.errors import CxrError
from cxrscale.files import atomic_dir, check_writable_dir, read_json, write_json_atomic
from cxrscale.provenance import git_commit
from distributed.evaluation.scores import DEFAULT_BOOTSTRAP, ThresholdRule, parse_threshold
from distributed.model.guard import GUARD_FILE
from distributed.model.heads import Head
from distributed.model.scoring import ADAPTATION_FILE, read_run_config, run_head, run_model_path
from distributed.training.config import CALIBRATIONS
from preprocessing import multilabel
from preprocessing.sources import discover
from preprocessing.transform import ImageRejected, TransformParams, transform

log = logging.getLogger("cxrscale.adapt")

COPIED = ("dataset_manifest.json", "train_summary.json", "history.csv")


@dataclass(frozen=True)
class AdaptConfig:
    """Every option of `python -m distributed.adapt` (see `build_parser`), as `parse_config` builds it."""

    run: str
    output: str
    site: str
    labelled: str | None = None
    unlabelled: str | None = None
    adabn: bool = False
    calibration: str = "temperature"
    threshold: ThresholdRule = ThresholdRule("youden")
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    no_evaluate: bool = False
    quiet: bool = False


def load_images(paths: Sequence[Path], params: TransformParams, what: str) -> tuple[np.ndarray, list[int]]:
    """The run's transform of each file; a file that cannot be used is reported and left out. Returns the
    images and the positions of the files kept."""
    images, kept = [], []
    for k, path in enumerate(paths):
        try:
            images.append(transform(Path(path).read_bytes(), params, Path(path).name))
            kept.append(k)
        except (ImageRejected, OSError) as err:
            log.error("%s image %s left out: %s", what, path, str(err).strip() or type(err).__name__)
    if not images:
        raise CxrError(f"none of the {len(paths)} {what} images could be read with the run's transform")
    return np.stack(images), kept


def labelled_sample(folder: str, classes: list[str], params: TransformParams,
                    option: str = "--labelled") -> tuple[np.ndarray, np.ndarray]:
    """A site's labelled images (class folders, a Kermany layout or a CSV path,label) with labels in the
    run's class order; a class the run does not know is refused. option: the command-line option that gave
    the folder, named in every error."""
    found = discover(folder, option=option)
    unknown = [c for c in found.classes if c not in classes]
    if unknown:
        raise CxrError(f"{option} {folder} has classes {', '.join(unknown)} the run does not know "
                       f"(it was trained on {', '.join(classes)})")
    images, kept = load_images([Path(item.path) for item in found.items], params, "labelled")
    labels = np.array([classes.index(found.classes[found.items[k].label]) for k in kept])
    return images, labels


def labelled_findings(table: str, findings: list[str], params: TransformParams, policies: dict[str, str],
                      option: str = "--labelled") -> tuple[np.ndarray, np.ndarray]:
    """A site's labelled images for a multi-label model: a CSV in any form preprocessing reads (NIH, one column
    per finding, CheXpert's), as images and targets (n, K) in the run's finding order (1, 0, -1 unknown). A
    finding the CSV does not name is unknown for a column CSV and negative for an NIH table (whose Finding
    Labels name what is present); a label the run does not know is left out, with a warning. The run's
    policies for uncertain and blank labels (its dataset manifest) apply; option names the command-line option
    that gave the CSV in every error."""
    if not Path(table).is_file():
        raise CxrError(f"{option} {table}: a multi-label model's site sample is a CSV (NIH's form, or path and "
                       "one column per finding), not a folder")
    found = discover(table, option=option, uncertain=policies.get("uncertain", "ignore"),
                     blank=policies.get("blank", "negative"))
    if not found.multilabel:
        raise CxrError(f"{option} {table} has one label per image; this model has findings "
                       f"{', '.join(findings)}: give a multi-label CSV")
    extra = [c for c in found.classes if c not in findings]
    if extra:
        log.warning("%s %s: %s not findings of this model, left out", option, table, ", ".join(extra))
    missing = multilabel.NEGATIVE if found.layout == "nih" else multilabel.UNKNOWN
    columns = [found.classes.index(f) if f in found.classes else None for f in findings]
    images, kept = load_images([Path(item.path) for item in found.items], params, "labelled")
    targets = np.array([[found.items[k].targets[c] if c is not None else missing for c in columns] for k in kept])
    return images, targets


def unlabelled_images(folder: str, params: TransformParams) -> np.ndarray:
    from distributed.predict import expand_inputs

    return load_images(expand_inputs([folder]), params, "unlabelled")[0]


def adapt(config: AdaptConfig) -> dict[str, Any]:
    run_dir, output = Path(config.run), Path(config.output)
    run_config = read_run_config(run_dir)
    model_path = run_model_path(run_dir)
    if output.resolve() == run_dir.resolve():
        raise CxrError("--output must be a new folder: the adapted run never replaces the one it came from")
    check_writable_dir(output, "--output")
    if (output / "model").exists():
        raise CxrError(f"--output {output} already holds a model; choose another folder")
    manifest = read_json(run_dir / "dataset_manifest.json", "the run's dataset manifest")
    params, classes = TransformParams.from_dict(manifest["transform"]), list(manifest["classes"])

    # TensorFlow loads here, after the checks that need none: a mistake is reported without its start-up
    from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads
    from distributed.evaluation.adaptation import adapt_findings, adapt_site
    from distributed.model.builders import recalibrate_batchnorm
    from distributed.model.calibration import Calibration, calibrated_model, logits_of

    model = keras.models.load_model(str(model_path), compile=False)
    head = run_head(run_config) or Head.of_model(model)
    if head.multilabel and config.calibration != "temperature":
        raise CxrError(f"--calibration {config.calibration} is for two classes; a multi-label model is "
                       "recalibrated by a temperature per finding (--calibration temperature)")
    logits_head = Head.of_logits(model)
    record: dict[str, Any] = {"site": config.site, "adapted_from": str(run_dir), "adabn": None}
    calibration_file = run_dir / "calibration.json"  # every run's; none only in a folder made by hand
    calibration_record = read_json(calibration_file, "calibration record") if calibration_file.is_file() else \
        {"method": "none", "fitted_on": "nothing (no calibration.json)"}
    run_calibration = Calibration.from_dict(calibration_record)
    if not config.labelled:
        labelled = None
    elif head.multilabel:
        labelled = labelled_findings(config.labelled, classes, params,
                                     manifest.get("labels", {}))
    else:
        labelled = labelled_sample(config.labelled, classes, params)
    if config.adabn:
        images = unlabelled_images(config.unlabelled, params) if config.unlabelled else labelled[0]
        layers = recalibrate_batchnorm(model, images)
        if not layers:
            raise CxrError(f"--adabn: {model_path} has no BatchNormalization layer to re-estimate")
        record["adabn"] = {"images": int(len(images)), "layers": layers,
                           "from": "unlabelled" if config.unlabelled else "labelled (labels unused)"}
        log.info("AdaBN: %d BatchNormalization layers re-estimated on %d site images", layers, len(images))
    if labelled is not None and head.multilabel:
        images, targets = labelled
        run_t = run_calibration.params.get("temperature") if run_calibration.method == "temperature" else None
        site = adapt_findings(targets, logits_of(model, images), classes,
                              list(np.broadcast_to(1.0 if run_t is None else run_t, len(classes))),
                              rule=config.threshold, n_bootstrap=config.bootstrap, seed=config.seed)
        calibration = Calibration("temperature", {"temperature": site["temperature"]})
        record["labelled"] = site
        for row in site["findings"]:
            if row["adapted"]:
                oob = row["out_of_bag"]
                log.info("site %s, %s: threshold %.3f (%.3f-%.3f) on %d labelled images; out of bag sensitivity "
                         "%.3f, specificity %.3f", config.site, row["finding"], row["threshold"],
                         row["threshold_interval"]["low"], row["threshold_interval"]["high"], row["n"],
                         oob["sensitivity"]["value"], oob["specificity"]["value"])
            else:
                log.warning("site %s, %s not adapted: %s", config.site, row["finding"], row["reason"])
    elif labelled is not None:
        images, labels = labelled
        site = adapt_site(labels, logits_of(model, images), logits_head, method=config.calibration,
                          rule=config.threshold, n_bootstrap=config.bootstrap, seed=config.seed)
        calibration = Calibration.from_dict(site["calibration"])
        record["labelled"] = site
        oob = site["out_of_bag"]
        log.info("site %s, %d labelled images: threshold %.3f (%.3f-%.3f); out of bag sensitivity %.3f "
                 "(%.3f-%.3f), specificity %.3f (%.3f-%.3f)", config.site, site["n"], site["threshold"],
                 site["threshold_interval"]["low"], site["threshold_interval"]["high"],
                 oob["sensitivity"]["value"], oob["sensitivity"]["low"], oob["sensitivity"]["high"],
                 oob["specificity"]["value"], oob["specificity"]["low"], oob["specificity"]["high"])
    else:
        calibration = run_calibration
        log.warning("no --labelled sample: the run's own calibration and threshold are kept; only the "
                    "normalisation statistics are adapted")
    final = calibrated_model(model, calibration, head=logits_head)

    output.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, output / name)
    if (run_dir / "eval" / GUARD_FILE).is_file():  # the guard looks at the images, which adaptation leaves alone
        (output / "eval").mkdir(exist_ok=True)
        shutil.copyfile(run_dir / "eval" / GUARD_FILE, output / "eval" / GUARD_FILE)
    fitted_on = calibration_record.get("fitted_on", "val")
    if labelled is not None:
        kept = [r["finding"] for r in record["labelled"].get("findings", []) if not r["adapted"]]
        fitted_on = f"site {config.site}: {record['labelled']['n']} labelled images" + \
            (f" ({', '.join(kept)}: {fitted_on}, too few site labels)" if kept else "")
    write_json_atomic(output / "calibration.json", {**calibration.to_dict(), "fitted_on": fitted_on})
    record["git_commit"] = git_commit()
    write_json_atomic(output / ADAPTATION_FILE, record)
    meta = {**run_config, "config": {**run_config["config"], "output": str(output)},
            "resolved": {**run_config.get("resolved", {}), "output": str(output)},
            "head": head.to_dict(), "adaptation": {"site": config.site, "from": str(run_dir),
                                                   "file": ADAPTATION_FILE}}
    with atomic_dir(output / "model") as tmp:  # the model lands last: its presence means a finished run
        final.save(str(tmp))
        write_json_atomic(output / "config.json", meta)
    log.info("adapted run written to %s", output)
    if not config.no_evaluate:
        evaluate_adapted(output, run_config, config.bootstrap)
    return record


def evaluate_adapted(output: Path, run_config: dict, bootstrap: int) -> None:
    """The adapted run's evaluation on its dataset's test split at the site's threshold (and so its model card),
    when that dataset is here."""
    data = Path(run_config["config"]["data"])
    if not (data / "manifest.json").is_file():
        log.warning("the run's dataset %s is not here: run python -m distributed.evaluate --run %s --data "
                    "PREPARED to write the adapted run's report and model card", data, output)
        return
    from distributed.evaluate import EvaluateConfig, evaluate

    evaluate(EvaluateConfig(run=str(output), no_gradcam=True, bootstrap=bootstrap))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m distributed.adapt", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python -m distributed.adapt --run runs/kermany/final --labelled site-a/ --site site-a "
               "--output runs/site-a\n(docs/evaluation.md, \"Site adaptation\")")
    parser.add_argument("--run", required=True, help="the trained run folder to adapt (runs/NAME)")
    parser.add_argument("--output", required=True, help="the adapted run folder to write (a new folder)")
    parser.add_argument("--site", required=True, help="the site's name, recorded in the run and its model card")
    parser.add_argument("--labelled", help="the site's labelled images: class folders named like the run's "
                                           "classes, or a CSV path,label")
    parser.add_argument("--unlabelled", help="--adabn: a folder of the site's images, without labels (default: "
                                             "the --labelled images)")
    parser.add_argument("--adabn", action="store_true",
                        help="re-estimate BatchNormalization statistics on the site's images first (AdaBN)")
    parser.add_argument("--calibration", choices=[m for m in CALIBRATIONS if m != "auto"], default="temperature",
                        help="calibration refitted on the labelled sample (default temperature; platt also learns "
                             "the sample's prevalence, isotonic any monotone map: docs/evaluation.md compares them)")
    parser.add_argument("--threshold", type=parse_threshold, default=ThresholdRule("youden"),
                        help="operating point chosen on the labelled sample: youden (default), sensitivity:0.95 or "
                             "specificity:0.9")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                        help=f"bootstrap rounds for the site's intervals and the adapted run's evaluation "
                             f"(default {DEFAULT_BOOTSTRAP})")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--no-evaluate", action="store_true",
                        help="do not evaluate the adapted run on its dataset's test split afterwards")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> AdaptConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.labelled and not args.adabn:
        parser.error("give --labelled (refit calibration and threshold), --adabn (re-estimate normalisation), or both")
    if args.unlabelled and not args.adabn:
        parser.error("--unlabelled images are only used by --adabn")
    if args.adabn and not (args.unlabelled or args.labelled):
        parser.error("--adabn needs the site's images: --unlabelled FOLDER or --labelled")
    if args.bootstrap < 100:
        parser.error(f"--bootstrap must be at least 100, got {args.bootstrap}")
    if args.threshold.kind == "robust":
        parser.error("--threshold robust guards a threshold chosen on the training source's validation split "
                     "against another site's acquisition; here it is chosen on the site's own labelled images: give "
                     "youden, sensitivity:X or specificity:X")
    return config_from(AdaptConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(logging.WARNING if config.quiet else logging.INFO)
    adapt(config)
    print(f"adapted run: {config.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
