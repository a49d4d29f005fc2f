"""python -m distributed.evaluate: clinical evaluation of a trained model, with a report a clinician can read.

    python -m distributed.evaluate --run runs/kermany-cnn
    python -m distributed.evaluate --run runs/kermany-cnn --threshold sensitivity:0.95
    python -m distributed.evaluate --model runs/kermany-cnn/optimized/ptq-int8.tflite --data prepared/kermany

The operating threshold is always chosen on the validation split and then applied to the evaluated split
(test by default); the report shows the metrics at that threshold and at 0.5, each with stratified
bootstrap 95 % intervals, the plots, and a Grad-CAM gallery of the most confident right and wrong cases.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distributed.evaluation import report
from distributed.evaluation.findings import (add_threshold_stability, finding_curves, finding_summary,
                                             report_blocks as findings_report_blocks, write_finding_scores)
from distributed.evaluation.model_card import write_model_card
from distributed.evaluation.scores import (DEFAULT_BOOTSTRAP, SplitScores, ThresholdRule, compute_metrics,
                                           evaluated_rule, gallery_picks, load_records, parse_threshold,
                                           per_view_metrics, score_split, split_row, split_views,
                                           threshold_stability)
from distributed.model.metrics import THRESHOLD_METRICS, probability_quality
from distributed.model.guard import DEFAULT_QUANTILE, GUARD_FILE, Guard, fit_guard
from distributed.model.scoring import (adapted_finding_thresholds, adapted_threshold, load_scorer, read_run_config,
                                       run_head, run_model_path)
from cxrscale import tracking
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, config_from, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import check_writable_dir, read_json, sha256_file
from preprocessing import schema

log = logging.getLogger("cxrscale.evaluate")

# --- the command ----------------------------------------------------------------------------------------

@dataclass
class Target:
    """What is evaluated, resolved from --run/--model/--data/--output."""

    model_path: Path
    data_dir: Path
    output: Path
    run_dir: Path | None
    run_config: dict | None


@dataclass(frozen=True)
class EvaluateConfig:
    """Every option of `python -m distributed.evaluate` (see `build_parser`), as `parse_config` builds it."""

    run: str | None = None
    model: str | None = None
    data: str | None = None
    split: str = "test"
    threshold: ThresholdRule | None = None  # None: an adapted run's site threshold, else youden
    bootstrap: int = DEFAULT_BOOTSTRAP
    gallery: int = 2
    no_gradcam: bool = False
    batch_size: int = 32
    tta: bool = False
    guard_quantile: float = DEFAULT_QUANTILE
    external: tuple[str, ...] = ()
    seed: int = 0
    output: str | None = None
    dataset_credit: str | None = None
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    quiet: bool = False


def resolve_target(config: EvaluateConfig) -> Target:
    run_dir = Path(config.run) if config.run else None
    run_config = read_run_config(run_dir) if run_dir else None
    model_path = Path(config.model) if config.model else run_model_path(run_dir)
    if not model_path.exists():
        raise CxrError(f"model not found: {model_path}")
    if config.data:
        data_dir = Path(config.data)
    elif run_config:
        data_dir = Path(run_config["config"]["data"])
        if not data_dir.is_dir():
            raise CxrError(f"the run's dataset {data_dir} (from {run_dir / 'config.json'}) is not here; "
                           "pass --data with the prepared folder")
    else:
        raise CxrError("--model without --run needs --data: the prepared dataset to evaluate on")
    if config.output:
        output = Path(config.output)
    elif run_dir and not config.model:
        output = run_dir / "eval"
    else:
        output = model_path.parent / f"eval-{model_path.stem if model_path.suffix else model_path.name}"
    return Target(model_path, data_dir, output, run_dir, run_config)


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    started = time.perf_counter()
    target = resolve_target(config)
    manifest = schema.read_manifest(target.data_dir)
    classes = list(manifest["classes"])
    check_writable_dir(target.output, "--output")
    # TensorFlow loads here, after the checks that need none (a mistake in the options, the run, the data or
    # the output folder answers without its start-up); kerasenv first, so that Keras is tf_keras whichever
    # model is scored
    from distributed.model.kerasenv import keras  # noqa: F401

    scorer = load_scorer(target.model_path, head=run_head(target.run_config) if target.run_config else None)
    scorer.tta = config.tta
    if scorer.input_shape != schema.image_shape(manifest):
        raise CxrError(f"{target.model_path} takes {scorer.input_shape} images but {target.data_dir} holds "
                       f"{schema.image_shape(manifest)}: evaluate on data prepared like the training data")
    same_data = None
    if target.run_config:
        trained_on = target.run_config.get("manifest_sha256")
        same_data = trained_on == sha256_file(target.data_dir / schema.MANIFEST)
        trained_classes = target.run_config["resolved"]["classes"]
        if trained_classes != classes:
            raise CxrError(f"the run was trained on classes {trained_classes} but {target.data_dir} has {classes}")
        if not same_data:
            log.warning("%s is not the dataset the run was trained on: its test split may overlap the training "
                        "data, which only the user can rule out", target.data_dir)

    if scorer.head.multilabel:
        return evaluate_findings(config, target, manifest, scorer, started, same_data)
    externals = check_external(config.external, target, manifest)  # a bad one fails before any scoring
    rule = config.threshold or default_rule(target.run_dir)
    shifted = rule.needs_shifts and scorer.head.binary  # K > 2 classes: the most probable class, no threshold
    log.info("scoring the val and %s splits of %s with %s%s", config.split, target.data_dir, target.model_path,
             " (val also under the acquisition shifts, for --threshold robust)" if shifted else "")
    val = score_split(scorer, target.data_dir, "val", config.batch_size, uncalibrated=config.split == "val",
                      shifted=shifted)
    test = val if config.split == "val" else score_split(scorer, target.data_dir, config.split, config.batch_size,
                                                       uncalibrated=True)
    if config.split == "val":
        log.warning("--split val: the threshold is chosen on the same cases it is measured on (optimistic)")
    results = compute_metrics(val, test, classes, rule, n_bootstrap=config.bootstrap, seed=config.seed)
    if rule.source:
        results["threshold"]["chosen_on"] = rule.source
    if scorer.head.binary:  # for the report and the model card; compute_metrics serves optimize too
        stability = threshold_stability(rule, val.labels, val.probs[:, 1], test.labels, test.probs[:, 1],
                                        shifted=val.shifted_positive,
                                        n_resamples=config.bootstrap, seed=config.seed)
        if stability:
            results["threshold"]["stability"] = stability
    results["per_view"] = per_view_metrics(test, split_views(target.data_dir), classes, results["threshold"]["value"],
                                           n_bootstrap=config.bootstrap, seed=config.seed)
    results["calibration"] = calibration_report(target, test, test.before_calibration())
    results["guard"], guard = guard_report(target.data_dir, config.split, target.output, config.guard_quantile)
    results["splits"] = compare_splits(config, manifest, externals, scorer, val, test, results, guard)
    results.update(provenance(config, target, manifest, scorer, same_data))
    target.output.mkdir(parents=True, exist_ok=True)
    report.write_scores(target.output / "scores.csv", test, classes, results["threshold"]["value"])
    history = target.run_dir / "history.csv" if target.run_dir else None
    picks = gallery_picks(test, results["threshold"]["value"], config.gallery)
    images = load_records(target.data_dir, test.split, [p["index"] for p in picks])
    results["plots"], results["gallery"] = report.write_figures(
        target.output, val, test, classes, results, history, scorer, picks, images, gradcam=not config.no_gradcam)
    results["calibration"].pop("before_probs", None)  # plotted, not a number for metrics.json
    results["seconds"] = time.perf_counter() - started
    report.write_report(target.output, results)
    card = write_model_card(target.output / "metrics.json", dataset_credit=config.dataset_credit)
    log.info("report written to %s, model card to %s (%.0f s)", target.output / "report.html", card,
             results["seconds"])
    track_evaluation(config, target, results, card)
    return results


def evaluate_findings(config: EvaluateConfig, target: Target, manifest: dict, scorer, started: float,
                      same_data: bool | None) -> dict[str, Any]:
    """A multi-label model's evaluation, finding by finding (distributed.evaluation.findings): metrics.json,
    report.md/html, scores.csv, the per-finding ROC and precision-recall figures, the guard and the model card."""
    findings = list(manifest["classes"])
    if config.external:
        raise CxrError("--external compares the splits of a single-label model; evaluate a multi-label model on "
                       "another site's prepared dataset with --data instead")
    log.info("scoring the val and %s splits of %s with %s (%d findings)", config.split, target.data_dir,
             target.model_path, len(findings))
    rule = config.threshold or finding_rules(target.run_dir, findings)
    needs_shifts = any(r.needs_shifts for r in (rule if isinstance(rule, list) else [rule]))
    val = score_split(scorer, target.data_dir, "val", config.batch_size, uncalibrated=config.split == "val",
                      shifted=needs_shifts)
    test = val if config.split == "val" else score_split(scorer, target.data_dir, config.split, config.batch_size,
                                                       uncalibrated=True)
    summary = finding_summary(val.labels, val.probs, test.labels, test.probs, findings, rule, split=config.split,
                              val_shifted=val.shifted, n_bootstrap=config.bootstrap, seed=config.seed)
    add_threshold_stability(summary, val.labels, val.probs, test.labels, test.probs, rule, val_shifted=val.shifted,
                            n_bootstrap=config.bootstrap, seed=config.seed)
    results: dict[str, Any] = {
        "task": schema.MULTILABEL, "split": config.split, "n": int(len(test.labels)), "classes": findings,
        "findings": summary,
        "threshold": {"rule": summary["rule"], "description": summary["rule_description"], "value": None,
                      "per_finding": True},
        "calibration": calibration_report(target, test, test.before_calibration()),
        **provenance(config, target, manifest, scorer, same_data)}
    results["calibration"].pop("before_probs", None)
    results["guard"], _ = guard_report(target.data_dir, config.split, target.output, config.guard_quantile)
    target.output.mkdir(parents=True, exist_ok=True)
    write_finding_scores(target.output / "scores.csv", test.ids, test.labels, test.probs, findings,
                         [row["threshold"] for row in summary["findings"]])
    results["plots"] = {}
    if summary["measured"]:
        for kind in ("roc", "pr"):
            finding_curves(test.labels, test.probs, summary, target.output / f"{kind}.png", kind=kind)
            results["plots"][kind] = f"{kind}.png"
    results["gallery"] = []
    if not config.no_gradcam and scorer.keras_model is not None:
        results["gallery"] = finding_gradcams(target, test, findings, scorer)
    results["seconds"] = time.perf_counter() - started
    report.write_report(target.output, results, findings_report_blocks(results))
    card = write_model_card(target.output / "metrics.json", dataset_credit=config.dataset_credit)
    macro = summary.get("macro_roc_auc") or {}
    log.info("%s split: macro ROC-AUC %s over %d findings; report in %s, model card %s (%.0f s)", config.split,
             "undefined" if not macro else f"{macro['value']:.3f}", len(summary["measured"]),
             target.output / "report.html", card, results["seconds"])
    track_evaluation(config, target, results, card)
    return results


def provenance(config: EvaluateConfig, target: Target, manifest: dict, scorer,
               same_data: bool | None) -> dict[str, Any]:
    """What every evaluation's metrics.json records of where its numbers come from: the model, the run, the
    dataset, TTA, the head and the output folder."""
    return {
        "tta": bool(config.tta), "head": scorer.head.to_dict(),
        "model": {"path": str(target.model_path), "kind": scorer.kind, "input_shape": list(scorer.input_shape),
                  "size_bytes": _size(target.model_path)},
        "run": ({"dir": str(target.run_dir), "model": target.run_config["config"]["model"],
                 "config": target.run_config["config"], "resolved": target.run_config["resolved"],
                 "ensemble": target.run_config.get("ensemble")} if target.run_config else None),
        "data": {"dir": str(target.data_dir), "fingerprint": manifest.get("fingerprint"),
                 "same_as_training": same_data, "transform": manifest.get("transform"),
                 "counts": manifest.get("counts", {}).get("per_split"), "source": manifest.get("source"),
                 "split": manifest.get("split"), "excluded": manifest.get("counts", {}).get("excluded", 0),
                 "warnings": manifest.get("warnings", [])},
        "output": str(target.output)}


def finding_gradcams(target: Target, test: SplitScores, findings: list[str], scorer) -> list[dict[str, Any]]:
    """For each finding, its most confident true positive in the split with the Grad-CAM of that finding's
    output: where the model looks when it says so. OUTPUT/gradcam/FINDING.png."""
    from distributed.evaluation.gradcam import file_stem, gradcam, overlay

    picks = []
    for k, name in enumerate(findings):
        positive = np.flatnonzero(test.labels[:, k] == 1)
        if len(positive):
            picks.append((k, name, int(positive[np.argmax(test.probs[positive, k])])))
    images = load_records(target.data_dir, test.split, [index for _, _, index in picks])
    folder = target.output / "gradcam"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, name, index in picks:
        heat = gradcam(scorer.keras_model, images[index][None], np.array([k]))[0]
        file = f"gradcam/{file_stem(name)}.png"
        report.write_png(target.output / file, overlay(images[index], heat))
        out.append({"finding": name, "file": file, "index": index, "probability": float(test.probs[index, k])})
    return out


def evaluation_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The evaluation's numbers as flat MLflow metric names: SPLIT_METRIC at the chosen threshold with
    SPLIT_METRIC_ci_low/_ci_high, SPLIT_METRIC_at_0.5, the threshold, calibration before/after, and
    SPLIT_VIEW_METRIC per DICOM view."""
    split, out = results["split"], {}
    if results.get("task") == schema.MULTILABEL:  # SPLIT_macro_roc_auc, SPLIT_FINDING_roc_auc, ...
        summary = results["findings"]
        for key in ("macro_roc_auc", "micro_roc_auc"):
            if summary.get(key):
                out[f"{split}_{key}"] = summary[key]["value"]
        for row in summary["findings"]:
            for key, interval in (row.get("intervals") or {}).items():
                if interval.get("value") is not None:
                    out[f"{split}_{row['finding'].replace(' ', '_')}_{key}"] = interval["value"]
        out[f"{split}_images"] = results["n"]
        return tracking.numeric(out)

    def add(prefix: str, summary: dict[str, Any], suffix: str = "", only: Sequence[str] | None = None) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("n", "threshold") \
                    and (only is None or key in only):
                out[f"{prefix}_{key}{suffix}"] = value
        for key, interval in (summary.get("intervals") or {}).items():
            if interval.get("value") is not None and (only is None or key in only):
                out[f"{prefix}_{key}_ci_low{suffix}"], out[f"{prefix}_{key}_ci_high{suffix}"] = \
                    interval["low"], interval["high"]

    if "multiclass" in results:
        add(split, results["multiclass"])
    else:
        add(split, results["at_threshold"])
        add(split, results["at_0.5"], "_at_0.5", only=tuple(THRESHOLD_METRICS))  # AUC etc. do not depend on it
        out["threshold"] = results["threshold"]["value"]
    for stage in ("before", "after"):
        for key, value in (results["calibration"].get(stage) or {}).items():
            out[f"{split}_{key}_{stage}_calibration"] = value
    for view, entry in (results.get("per_view") or {}).items():
        name = view.replace(" ", "_")
        for key, interval in entry.items():
            if isinstance(interval, dict) and interval.get("value") is not None:
                out[f"{split}_{name}_{key}"] = interval["value"]
                out[f"{split}_{name}_{key}_ci_low"], out[f"{split}_{name}_{key}_ci_high"] = \
                    interval["low"], interval["high"]
    out[f"{split}_images"] = results["n"]
    return tracking.numeric(out)


def track_evaluation(config: EvaluateConfig, target: Target, results: dict[str, Any], card: Path) -> None:
    """With --tracking-uri: the metrics and reports into the training run's MLflow run (RUN/tracking.json on the
    same store), else into a new run named after the model."""
    if not config.tracking_uri:
        return
    run_id = tracking.recorded_run(target.run_dir, config.tracking_uri)
    name = f"evaluate {target.run_dir.name if target.run_dir else target.model_path.name}"
    tracker = tracking.Tracker.start(config.tracking_uri, config.experiment, name, run_id=run_id,
                                     tags=tracking.common_tags("evaluate", target.data_dir / schema.MANIFEST))
    if run_id is None:
        tracker.log_params({"model": str(target.model_path), "data": str(target.data_dir), "split": config.split,
                            "threshold_rule": results["threshold"]["rule"], "tta": config.tta,
                            "kind": results["model"]["kind"]})
    tracker.log_metrics(evaluation_metrics(results))
    files = sorted(target.output.iterdir())
    tracker.log_artifacts(files + ([card] if card not in files else []), "eval")
    tracker.end("FINISHED")


def calibration_report(target: Target, after: SplitScores, before: SplitScores | None) -> dict[str, Any]:
    """ECE, Brier and log loss of the evaluated split before (when known) and after calibration, and how the
    run fitted it (RUN/calibration.json)."""
    fitted = None
    if target.run_dir and (target.run_dir / "calibration.json").is_file():
        fitted = read_json(target.run_dir / "calibration.json", "calibration record")
    out: dict[str, Any] = {"method": fitted["method"] if fitted else ("unknown" if before is not None else "none"),
                           "fitted_on": fitted.get("fitted_on") if fitted else None,
                           "after": probability_quality(after.labels, after.probs, after.head)}
    if before is not None:
        out["before"] = probability_quality(before.labels, before.probs, before.head)
        out["before_probs"] = before.probs
    return out


def default_rule(run_dir: Path | None) -> ThresholdRule:
    """The threshold rule without --threshold: an adapted run keeps the threshold its site chose
    (distributed.adapt); a run evaluated before keeps the rule of that evaluation (a recipe's, say), so that
    evaluating it again does not move its operating point; any other run gets Youden's on validation."""
    adapted = adapted_threshold(run_dir) if run_dir else None
    if adapted:
        return ThresholdRule("fixed", adapted[0], adapted[1])
    previous = evaluated_rule(run_dir)
    log.info("threshold rule %s (%s)", previous or "youden",
             "its previous evaluation's" if previous else "the default; --threshold chooses another")
    return previous or ThresholdRule("youden")


def finding_rules(run_dir: Path | None, findings: list[str]) -> list[ThresholdRule]:
    """A multi-label model's threshold rule per finding without --threshold: an adapted run keeps the
    thresholds its site chose (distributed.adapt) for the findings it had enough labels of; every other finding
    gets the rule of the run's previous evaluation, or Youden's on validation."""
    adapted = adapted_finding_thresholds(run_dir) if run_dir else None
    chosen, source = adapted or ({}, None)
    rule = (None if adapted else evaluated_rule(run_dir)) or ThresholdRule("youden")
    return [ThresholdRule("fixed", chosen[f], source) if f in chosen else rule for f in findings]


def guard_report(data_dir: Path, split: str, output: Path, quantile: float) -> tuple[dict[str, Any], Guard | None]:
    """Fit the out-of-distribution guard on the train split, its threshold on val; write OUTPUT/guard.npz
    (predict and export carry it). Returns its summary, with the share of val and `split` it flags, and it."""
    def images(name: str):
        return (image for image, _ in schema.dataset(data_dir, name).as_numpy_iterator())

    try:
        guard = fit_guard(images("train"), images("val"), quantile=quantile)
    except CxrError as err:  # a toy dataset: the evaluation stands, predictions go unguarded
        log.warning("no out-of-distribution guard for %s: %s", data_dir, err)
        return {"fitted": False, "reason": str(err)}, None
    output.mkdir(parents=True, exist_ok=True)
    guard.save(output / GUARD_FILE)
    out = guard.summary()
    out["file"] = GUARD_FILE
    for name in dict.fromkeys(("val", split)):
        out[f"{name}_flagged"] = flagged_share(guard, data_dir, (name,))
    log.info("out-of-distribution guard: flags %s", ", ".join(f"{out[f'{n}_flagged']:.1%} of {n}"
                                                                for n in dict.fromkeys(("val", split))))
    return out, guard


def flagged_share(guard: Guard, data_dir: Path, splits: Sequence[str]) -> float:
    """The share of the records of these splits of a prepared dataset that the guard flags."""
    flagged = [guard.outside(guard.scores(batch)) for split in splits
               for batch, _ in schema.dataset(data_dir, split).batch(256).as_numpy_iterator()]
    return float(np.concatenate(flagged).mean()) if flagged else 0.0


def split_origin(manifest: dict, split: str) -> str:
    """How a split of a prepared dataset was made, in words (manifest.json; older manifests are read too)."""
    info = manifest.get("split") or {}
    if info.get(split):
        return info[split]
    return "given by the input" if split in (info.get("given") or []) else "carved at random, grouped by patient"


def check_external(folders: Sequence[str], target: Target, manifest: dict) -> list[tuple[Path, dict]]:
    """Each --external dataset with its manifest, refused (before any scoring) when it is the run's own
    training data, or was prepared with another transform or other classes."""
    pixels = ("modalities", "views", "body_parts")  # header rules: what is accepted, not how it is transformed
    ours = {k: v for k, v in manifest["transform"].items() if k not in pixels}
    out = []
    for folder in folders:
        data_dir = Path(folder)
        external = schema.read_manifest(data_dir)
        if target.run_config and sha256_file(data_dir / schema.MANIFEST) == target.run_config.get("manifest_sha256"):
            raise CxrError(f"--external {data_dir} is the dataset the run was trained on, not another site")
        theirs = {k: v for k, v in external["transform"].items() if k not in pixels}
        if ours != theirs or external["classes"] != manifest["classes"]:
            raise CxrError(f"--external {data_dir} was prepared with another transform or other classes than "
                           f"{target.data_dir}: prepare it with the same --size, --resize and --contrast")
        out.append((data_dir, external))
    return out


def compare_splits(config: EvaluateConfig, manifest: dict, externals: list[tuple[Path, dict]], scorer,
                   val: SplitScores, test: SplitScores, results: dict[str, Any],
                   guard: Guard | None) -> list[dict[str, Any]]:
    """Every split this evaluation has, side by side at the validation-chosen threshold: val, the evaluated
    split, and each checked --external dataset (all of its records, which the model never saw)."""
    threshold = results["threshold"]["value"]
    rows = []
    for scores in ([val] if config.split == "val" else [val, test]):
        known = results.get("at_threshold", {}).get("intervals") if scores is test else None
        row = split_row(scores, threshold, split_origin(manifest, scores.split), n_bootstrap=config.bootstrap,
                        seed=config.seed, intervals=known)
        if guard is not None:
            row["flagged"] = results["guard"][f"{scores.split}_flagged"]
        rows.append(row)
    for data_dir, external in externals:
        splits = [s for s, c in (external.get("counts", {}).get("per_split") or {}).items() if c.get("total")]
        parts = [score_split(scorer, data_dir, s, config.batch_size) for s in splits]
        scores = SplitScores(f"external:{data_dir.name}", np.concatenate([p.labels for p in parts]),
                             np.concatenate([p.probs for p in parts]), [i for p in parts for i in p.ids], scorer.head)
        row = split_row(scores, threshold, f"external dataset {data_dir} (every record)",
                        n_bootstrap=config.bootstrap, seed=config.seed)
        if guard is not None:
            row["flagged"] = flagged_share(guard, data_dir, splits)
        rows.append(row)
    return rows


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m distributed.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes OUTPUT/metrics.json (every number), report.md, report.html (self-contained), scores.csv, "
               "the plots and gradcam/, and the model card (RUN/model_card.md, or OUTPUT/model_card.md for "
               "--model). Example:\n  python -m distributed.evaluate --run runs/sample")
    source = parser.add_argument_group("what to evaluate (--run, or --model with --data)")
    source.add_argument("--run", help="a training run folder (runs/NAME): its exported model, dataset and history")
    source.add_argument("--model", help="a model file instead: SavedModel folder, .keras/.h5 or .tflite")
    source.add_argument("--data", help="prepared dataset folder (default: the one the run was trained on)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate (default test)")
    parser.add_argument("--external", action="append", default=[], metavar="PREPARED",
                        help="also score every record of this prepared dataset (another site's labelled images, "
                             "prepared with the same transform) at the same threshold, beside the run's own splits; "
                             "repeatable")
    parser.add_argument("--threshold", type=parse_threshold, default=None,
                        help="operating point, chosen on the validation split: youden, robust (Youden's J at its "
                             "worst across validation as it is and under nine acquisition shifts: for use at other "
                             "sites), sensitivity:0.95, specificity:0.9, or a fixed probability such as 0.5 "
                             "(default: for a run adapted by distributed.adapt, the site's threshold; for a run "
                             "evaluated before, that evaluation's rule; else youden)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                        help=f"bootstrap resamples for the 95%% intervals (default {DEFAULT_BOOTSTRAP})")
    parser.add_argument("--gallery", type=int, default=2,
                        help="images per group (right/wrong x class) in the Grad-CAM gallery (default 2)")
    parser.add_argument("--no-gradcam", action="store_true", help="gallery without Grad-CAM heat-maps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average each image's output over 4 views (as is, 92 %% centre "
                             "zoom, gamma 0.8 and 1.25; never a flip); 4x the scoring time")
    parser.add_argument("--guard-quantile", type=float, default=DEFAULT_QUANTILE,
                        help="the out-of-distribution guard flags images scoring above this quantile of the "
                             "validation split's scores (default %(default)s: 0.5 %% of same-source images)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--output", help="report folder (default RUN/eval, or eval-MODEL beside a --model)")
    parser.add_argument("--dataset-credit", help="how the training data must be credited, for the model card "
                                                 "(default: the Kermany credit when the classes are its own)")
    tracking.add_arguments(parser, "the evaluation (into the training run's MLflow run when it has one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> EvaluateConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.run and not args.model:
        parser.error("give --run runs/NAME or --model FILE (with --data)")
    if args.bootstrap < 0 or args.gallery < 0 or args.batch_size < 1:
        parser.error("--bootstrap and --gallery must be >= 0 and --batch-size >= 1")
    if not 0.5 <= args.guard_quantile < 1:
        parser.error(f"--guard-quantile must be in [0.5, 1), got {args.guard_quantile}")
    return config_from(EvaluateConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(logging.WARNING if config.quiet else logging.INFO)
    results = evaluate(config)
    print(f"report: {Path(results['output']) / 'report.html'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
