"""python -m benchmarks.members: which trained members to ensemble, judged on another site's images.

    python -m benchmarks.members --runs runs/a/members/seed0 runs/a/members/seed1 runs/b/members/seed0
    python -m benchmarks.members --runs R1 R2 R3 --external ~/site-b --calibration temperature

distributed.ensemble joins members by the mean of their logits. Which members to join is a recipe decision
that a carved validation split reads as a tie (on the Kermany split every candidate reads ROC-AUC near 0.99).
This suite scores each member once, on the validation split the members share and on an external labelled
sample (class folders or a path,label CSV; default: the shared external development set, whose figures are
development figures), then forms every ensemble of them from those logits as distributed.ensemble and
distributed.evaluate would: the mean of the positive-class logits, calibration fitted on validation, the
threshold chosen on validation.
Nothing is trained or joined, so trying 2^N - 1 ensembles costs N forward passes.

  members     each member's model, its ROC-AUC on validation and on the external images, and the correlation
              of the members' logits on both: members that agree add little to each other
  ensembles   for every subset of the members: validation and external ROC-AUC (with its 95 % bootstrap
              interval), the validation-chosen threshold and the 95 % interval of where it lands when
              validation is resampled (distributed.evaluation.scores.threshold_stability), accuracy,
              sensitivity and specificity on the external images at that threshold with the range they take
              across that interval, and external ECE as calibrated on validation

Multi-label members are compared finding by finding, as distributed.ensemble joins them: a temperature per
finding and each finding's threshold fitted on validation, and on the external images (a CSV with a column per
finding, or NIH's form) the macro and micro ROC-AUC and each finding's ROC-AUC, sensitivity and specificity.

Build the one you choose with `python -m distributed.ensemble --runs ...`. The members must share one
validation split (the same prepared dataset, or one prepared again with the same seed) and one head. It
measures runs you already have, so `python -m benchmarks --suite all` does not run it.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import DEFAULT_RESULTS, DEFAULT_SHARED_DATA, markdown_table, report, require_dir
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.errors import CxrError

log = logging.getLogger("cxrscale.benchmarks")
MAX_MEMBERS = 8  # 255 ensembles, each with its bootstraps: about a second apiece


def member_labels(runs: Sequence[Path]) -> list[str]:
    """Short unique names for the runs: the fewest trailing path parts that tell them apart (members of two
    recipes are both `members/seed0`)."""
    parts = [Path(r).resolve().parts for r in runs]
    if len(set(parts)) < len(parts):
        raise CxrError(f"--runs names {len(parts) - len(set(parts))} run folder(s) twice")
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return ["/".join(p) for p in parts]


def score_members(runs: Sequence[Path], external: Path, *, shifted: bool = False) -> dict[str, Any]:
    """Each member's logits on the shared validation split and on the external images: the positive-class
    logit of a binary member, (n, findings) of a multi-label one, with the labels ((n,) or (n, findings), -1
    unknown); with `shifted`, also validation's under each acquisition shift (the robust threshold rule's)."""
    from distributed.model.kerasenv import keras  # first: chooses tf_keras before TensorFlow loads
    from distributed.adapt import labelled_findings, labelled_sample
    from distributed.model.calibration import logits_of
    from distributed.model.heads import Head
    from distributed.model.scoring import read_run_config, run_model_path
    from cxrscale.files import read_json
    from preprocessing import schema
    from preprocessing.shifts import score_under_shifts
    from preprocessing.transform import TransformParams

    members, reference, external_images = {}, None, {}
    for label, run in zip(member_labels(runs), runs):
        config = read_run_config(run)
        manifest = read_json(run / "dataset_manifest.json", f"--runs {run}: dataset manifest")
        classes = list(manifest["classes"])
        model = keras.models.load_model(str(run_model_path(run)), compile=False)
        head = Head.of_logits(model)
        if not (head.binary or head.multilabel):
            raise CxrError(f"--runs {run} has a {head.describe()} head: this suite compares binary or multi-label "
                           "members")
        if head.multilabel and Path(external).is_dir():
            raise CxrError(f"--external {external} is a folder: multi-label members are judged on a site's CSV "
                           "(NIH's form, or path and a column per finding); the default, the Kermany development "
                           "set, is for binary members")
        # record ids are salted per preparation, so the images themselves tell whether two datasets prepared
        # apart hold one validation split; every member's records are put in the order of their contents.
        # Scored a batch at a time, so a large validation split is never held in memory
        keys, labels, logits, under = [], [], [], []
        for x, y in schema.dataset(Path(config["config"]["data"]), "val").batch(256).as_numpy_iterator():
            keys += [hashlib.sha256(image.tobytes()).hexdigest() + ":"
                     + ",".join(map(str, np.atleast_1d(target).astype(int))) for image, target in zip(x, y)]
            labels.append(np.asarray(y).astype(int))
            logits.append(logits_of(model, x))
            if shifted:
                under.append(score_under_shifts(x, lambda batch: logits_of(model, batch)))
        if not keys:
            raise CxrError(f"--runs {run}: its dataset {config['config']['data']} has no validation split")
        order = np.argsort(keys, kind="stable")
        keys = [keys[i] for i in order]
        if reference is None:
            reference = {"run": run, "keys": keys, "classes": classes, "head": head.kind}
        elif keys != reference["keys"] or classes != reference["classes"] or head.kind != reference["head"]:
            raise CxrError(f"--runs {run} was validated on other images than {reference['run']} (its validation "
                           "split, image size, classes or head differ): members are compared on one validation "
                           "split; prepare them from one dataset with the same --seed")
        y_val, z_val = np.concatenate(labels)[order], np.concatenate(logits)[order]
        z_shifted = np.concatenate(under, axis=1)[:, order] if shifted else None
        # the external images are decoded once per transform (members of one preparation share it)
        transform = json.dumps(manifest["transform"], sort_keys=True)
        if transform not in external_images:
            params = TransformParams.from_dict(manifest["transform"])
            external_images[transform] = (
                labelled_findings(str(external), classes, params, manifest.get("labels", {}), option="--external")
                if head.multilabel else labelled_sample(str(external), classes, params, option="--external"))
        x_ext, y_ext = external_images[transform]
        z_ext = logits_of(model, x_ext)
        if head.binary:
            z_val, z_ext = head.positive_logit(z_val), head.positive_logit(z_ext)
            z_shifted = None if z_shifted is None else np.stack([head.positive_logit(z) for z in z_shifted])
        members[label] = {"run": str(run), "model": config["config"]["model"], "classes": classes,
                          "z_val": z_val, "z_ext": z_ext, "y_val": y_val, "y_ext": y_ext, "z_val_shifted": z_shifted}
        log.info("scored %s (%s): %d validation and %d external images", label, members[label]["model"],
                 len(y_val), len(y_ext))
    return members


def subsets(names: list[str], max_size: int) -> list[tuple[str, ...]]:
    return [combo for size in range(1, min(max_size, len(names)) + 1)
            for combo in itertools.combinations(names, size)]


def compare(members: dict[str, dict], method: str, rule_text: str, *, max_size: int, n_bootstrap: int,
            seed: int = 0) -> dict[str, Any]:
    """Every ensemble of up to `max_size` of the members, from their logits: the figures
    distributed.ensemble + distributed.evaluate would give it, on validation and on the external images."""
    from distributed.evaluation.scores import parse_threshold, threshold_stability
    from distributed.model import metrics as m
    from distributed.model.calibration import fit_calibration
    from distributed.model.heads import Head

    names = list(members)
    first = members[names[0]]
    if first["z_val"].ndim == 2:
        return compare_findings(members, method, rule_text, max_size=max_size, n_bootstrap=n_bootstrap, seed=seed)
    y_val, y_ext = first["y_val"], first["y_ext"]
    rule, head = parse_threshold(rule_text), Head("binary", 1)  # the ensemble's head: the mean logit

    def correlation(key: str) -> list[list[float]]:
        return np.corrcoef([members[n][key] for n in names]).reshape(len(names), len(names)).round(4).tolist()

    rows = []
    for combo in subsets(names, max_size):
        z_val = np.mean([members[n]["z_val"] for n in combo], axis=0)
        z_ext = np.mean([members[n]["z_ext"] for n in combo], axis=0)
        calibration = fit_calibration(method, y_val, z_val, head)
        p_val, p_ext = calibration.apply(head, z_val)[:, 1], calibration.apply(head, z_ext)[:, 1]
        p_shifted = _shifted_probs(members, combo, calibration, head)
        p_shifted = None if p_shifted is None else p_shifted[..., 1]
        threshold = rule.choose(y_val, p_val, p_shifted)
        external = m.bootstrap_intervals(m.interval_metric_functions(threshold), y_ext, p_ext,
                                         n_resamples=n_bootstrap, seed=seed)
        rows.append({"members": list(combo), "val_roc_auc": m.roc_auc(y_val, p_val), "threshold": threshold,
                     "calibration": calibration.to_dict(), "external": external,
                     "external_ece": m.expected_calibration_error(y_ext, p_ext),
                     "val_ece": m.expected_calibration_error(y_val, p_val),
                     "stability": threshold_stability(rule, y_val, p_val, y_ext, p_ext, shifted=p_shifted,
                                                      n_resamples=n_bootstrap, seed=seed)})
    return {"task": "binary",
            "members": {n: {"run": members[n]["run"], "model": members[n]["model"],
                            "val_roc_auc": m.roc_auc(y_val, members[n]["z_val"]),
                            "external_roc_auc": m.roc_auc(y_ext, members[n]["z_ext"])} for n in names},
            "correlation": {"validation": correlation("z_val"), "external": correlation("z_ext")},
            "n_val": int(len(y_val)), "n_external": int(len(y_ext)),
            "external_class_counts": np.bincount(y_ext, minlength=2).tolist(), "calibration_method": method,
            "threshold_rule": str(rule), "bootstrap": n_bootstrap, "ensembles": rows}


def compare_findings(members: dict[str, dict], method: str, rule_text: str, *, max_size: int, n_bootstrap: int,
                     seed: int = 0) -> dict[str, Any]:
    """`compare` for multi-label members, finding by finding as distributed.ensemble joins them and
    distributed.evaluate reads them: the mean of each finding's logits, a temperature per finding fitted on
    validation, each finding's threshold chosen on its known validation images; on the external images each
    finding's figures (`findings.finding_summary`, with where its threshold lands when validation is
    resampled) and the macro and micro ROC-AUC."""
    from distributed.evaluation.findings import add_threshold_stability, finding_summary
    from distributed.evaluation.scores import parse_threshold
    from distributed.model import metrics as m
    from distributed.model.calibration import fit_calibration
    from distributed.model.heads import Head

    names = list(members)
    first = members[names[0]]
    findings, y_val, y_ext = first["classes"], first["y_val"], first["y_ext"]
    rule, head = parse_threshold(rule_text), Head("multilabel", len(findings))

    def correlation(key: str) -> list[list[float]]:
        # per finding, then the mean over findings: pooling them would count the findings' different
        # prevalences (so different mean logits) as agreement
        per_finding = [np.corrcoef([members[n][key][:, k] for n in names]) for k in range(len(findings))]
        return np.mean(per_finding, axis=0).reshape(len(names), len(names)).round(4).tolist()

    def ece(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
        out = {}
        for k, name in enumerate(findings):
            seen = y[:, k] >= 0
            out[name] = m.expected_calibration_error(y[seen, k], p[seen, k]) if seen.any() else None
        return out

    rows = []
    for combo in subsets(names, max_size):
        z_val = np.mean([members[n]["z_val"] for n in combo], axis=0)
        z_ext = np.mean([members[n]["z_ext"] for n in combo], axis=0)
        calibration = fit_calibration(method, y_val, z_val, head)  # platt, isotonic: refused for findings
        p_val, p_ext = calibration.apply(head, z_val), calibration.apply(head, z_ext)
        p_shifted = _shifted_probs(members, combo, calibration, head)
        summary = finding_summary(y_val, p_val, y_ext, p_ext, findings, rule, split="external",
                                  val_shifted=p_shifted, n_bootstrap=n_bootstrap, seed=seed)
        add_threshold_stability(summary, y_val, p_val, y_ext, p_ext, rule, val_shifted=p_shifted,
                                n_bootstrap=n_bootstrap, seed=seed)
        rows.append({"members": list(combo), "val_macro_roc_auc": m.macro_roc_auc(y_val, p_val),
                     "calibration": calibration.to_dict(), "external": summary, "external_ece": ece(y_ext, p_ext)})
    # a member's external macro ROC-AUC over the findings the ensembles' rows measure, so the two tables agree
    measured = [findings.index(name) for name in rows[0]["external"]["measured"]]

    def external_macro(z: np.ndarray) -> float | None:
        return m.macro_roc_auc(y_ext[:, measured], z[:, measured]) if measured else None

    return {"task": "multi-label", "findings": findings,
            "members": {n: {"run": members[n]["run"], "model": members[n]["model"],
                            "val_macro_roc_auc": m.macro_roc_auc(y_val, members[n]["z_val"]),
                            "external_macro_roc_auc": external_macro(members[n]["z_ext"])} for n in names},
            "correlation": {"validation": correlation("z_val"), "external": correlation("z_ext")},
            "n_val": int(len(y_val)), "n_external": int(len(y_ext)),
            "external_positives": {name: int((y_ext[:, k] == 1).sum()) for k, name in enumerate(findings)},
            "calibration_method": method, "threshold_rule": str(rule), "bootstrap": n_bootstrap, "ensembles": rows}


def _shifted_probs(members: dict[str, dict], combo: Sequence[str], calibration, head) -> np.ndarray | None:
    """The ensemble's calibrated validation probabilities under each acquisition shift, (shifts, n, columns),
    from its members' mean logits there; None when the members were scored without the shifts."""
    if members[combo[0]].get("z_val_shifted") is None:
        return None
    z = np.mean([members[n]["z_val_shifted"] for n in combo], axis=0)
    return np.stack([calibration.apply(head, row) for row in z])


def _interval(fig: dict | None) -> str:
    """A figure with its interval, or - where it is undefined."""
    if not fig or fig.get("value") is None:
        return "-"
    return f"{fig['value']:.3f} ({fig['low']:.3f}-{fig['high']:.3f})"


def _correlation_lines(results: dict, names: list[str], external: str) -> list[str]:
    per_finding = " (per finding, then averaged over the findings)" if results.get("task") == "multi-label" else ""
    correlation = results["correlation"]
    return [f"Correlation of the members' logits on {external}{per_finding}, validation in brackets:", "",
            markdown_table(["", *names], [[a] + [f"{correlation['external'][i][j]:.3f} "
                                                 f"({correlation['validation'][i][j]:.3f})" for j in range(len(names))]
                                          for i, a in enumerate(names)]), ""]


def summarise_findings(results: dict) -> tuple[list[dict], str]:
    """`summarise` for multi-label members: macro and micro ROC-AUC, then each finding."""
    names, findings = list(results["members"]), results["findings"]
    external = Path(results["external"]).name

    def finding_cell(row: dict) -> str:
        if not row["measured"]:
            return "not measured"
        iv = row["intervals"]
        at = (f", {iv['sensitivity']['value']:.2f} / {iv['specificity']['value']:.2f}"
              if iv.get("sensitivity", {}).get("value") is not None else "")
        return f"{iv['roc_auc']['value']:.3f}{at}"

    def macro(row: dict) -> float:
        return (row["external"].get("macro_roc_auc") or {}).get("value") or 0.0

    ranked = sorted(results["ensembles"], key=lambda r: -macro(r))
    positives = ", ".join(f"{name} {n}" for name, n in results["external_positives"].items())
    lines = [f"{len(names)} multi-label members, {len(ranked)} ensembles, scored on `{results['external']}` "
             f"({results['n_external']} images; positive for {positives}). "
             f"{'No calibration' if results['calibration_method'] == 'none' else 'A temperature per finding'} and "
             f"each finding's threshold ({results['threshold_rule']}) fitted on the members' validation split "
             f"({results['n_val']} images); a finding with too few positive or negative external images is not "
             "measured, nor counted in the macro ROC-AUC.", "",
             markdown_table(["member", "model", "validation macro ROC-AUC", f"{external} macro ROC-AUC"],
                            [[n, v["model"], f"{v['val_macro_roc_auc']:.4f}",
                              "-" if v["external_macro_roc_auc"] is None else f"{v['external_macro_roc_auc']:.4f}"]
                             for n, v in results["members"].items()]), "",
             *_correlation_lines(results, names, external),
             f"Every ensemble, best {external} macro ROC-AUC first (95 % bootstrap intervals in brackets):", "",
             markdown_table(["members", "validation macro ROC-AUC", f"{external} macro ROC-AUC",
                             f"{external} micro ROC-AUC"],
                            [[" + ".join(r["members"]), f"{r['val_macro_roc_auc']:.4f}",
                              _interval(r["external"].get("macro_roc_auc")),
                              _interval(r["external"].get("micro_roc_auc"))] for r in ranked]), "",
             f"Each finding on {external}: ROC-AUC, then sensitivity / specificity at the finding's validation "
             "threshold (the thresholds, where they land when validation is resampled and each finding's ECE are "
             "in the JSON results):", "",
             markdown_table(["members", *findings],
                            [[" + ".join(r["members"]), *map(finding_cell, r["external"]["findings"])]
                             for r in ranked])]
    return [], "\n".join(lines) + "\n"


def summarise(results: dict) -> tuple[list[dict], str]:
    """No targets: a table to choose from."""
    if results.get("task") == "multi-label":
        return summarise_findings(results)
    names = list(results["members"])
    external = Path(results["external"]).name

    def at(row: dict, k: str) -> str:
        value = f"{row['external'][k]['value']:.3f}"
        spread = (row["stability"] or {}).get("at_evaluated", {}).get(k)
        return value + (f" ({spread['low']:.3f}-{spread['high']:.3f})" if spread else "")

    def threshold(row: dict) -> str:
        s = row["stability"]
        return f"{row['threshold']:.3f}" + (f" ({s['low']:.3f}-{s['high']:.3f})" if s else "")

    ranked = sorted(results["ensembles"], key=lambda r: -r["external"]["roc_auc"]["value"])
    lines = [f"{len(names)} members, {len(ranked)} ensembles, scored on `{results['external']}` "
             f"({results['n_external']} images, {results['external_class_counts']} per class; development figures "
             f"when this is the shared external development set). Calibration {results['calibration_method']} "
             f"and threshold {results['threshold_rule']} fitted on the members' validation split "
             f"({results['n_val']} images).", "",
             markdown_table(["member", "model", "validation ROC-AUC", f"{external} ROC-AUC"],
                            [[n, v["model"], f"{v['val_roc_auc']:.4f}", f"{v['external_roc_auc']:.4f}"]
                             for n, v in results["members"].items()]), "",
             *_correlation_lines(results, names, external),
             f"Every ensemble, best {external} ROC-AUC first. In brackets: the 95 % bootstrap interval of the "
             "ROC-AUC; for the threshold, where it lands when validation is resampled, and for accuracy, "
             "sensitivity and specificity the range they take across that landing:", "",
             markdown_table(["members", "validation ROC-AUC", f"{external} ROC-AUC", "threshold", "accuracy",
                             "sensitivity", "specificity", f"{external} ECE"],
                            [[" + ".join(r["members"]), f"{r['val_roc_auc']:.4f}",
                              _interval(r["external"]["roc_auc"]), threshold(r), at(r, "accuracy"),
                              at(r, "sensitivity"), at(r, "specificity"), f"{r['external_ece']:.3f}"]
                             for r in ranked])]
    return [], "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from distributed.training.config import CALIBRATIONS  # no TensorFlow

    parser = OneLineParser(prog="python -m benchmarks.members", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Examples:\n  python -m benchmarks.members --runs runs/kermany/members/seed0 "
                                  "runs/kermany/members/seed1 runs/resnet/members/seed0\n"
                                  "  python -m benchmarks.members --runs runs/findings/members/seed0 "
                                  "runs/findings/members/seed1 --external site-b/labels.csv   # multi-label")
    parser.add_argument("--runs", nargs="+", required=True, help="trained member run folders (at least two)")
    parser.add_argument("--external", default=str(DEFAULT_SHARED_DATA / "kermany224-external-dev"),
                        help="another site's labelled images: class folders or a path,label CSV (default: the shared "
                             "external development set); for multi-label members a CSV with a column per finding "
                             "or NIH's form")
    parser.add_argument("--calibration", default="auto", choices=CALIBRATIONS,
                        help="fitted on validation for each ensemble, as distributed.ensemble does (default auto)")
    parser.add_argument("--threshold", default="youden",
                        help="chosen on validation for each ensemble, as distributed.evaluate does: youden "
                             "(default), robust, sensitivity:X, specificity:X")
    parser.add_argument("--max-size", type=int, default=None,
                        help=f"largest ensemble to try (default: all the members; needed above {MAX_MEMBERS})")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from distributed.evaluation.scores import parse_threshold

    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    runs = [require_dir(Path(r), "--runs", "give trained run folders") for r in args.runs]
    if len(runs) < 2:
        raise CxrError("--runs needs at least two member runs to compare ensembles of")
    max_size = len(runs) if args.max_size is None else args.max_size
    if not 1 <= max_size <= len(runs):
        raise CxrError(f"--max-size {args.max_size}: between 1 and the {len(runs)} --runs")
    if args.max_size is None and len(runs) > MAX_MEMBERS:
        raise CxrError(f"--runs names {len(runs)} members, {2 ** len(runs) - 1} ensembles: give --max-size")
    if args.bootstrap < 100:
        raise CxrError(f"--bootstrap {args.bootstrap}: at least 100 resamples for a 95 % interval")
    try:
        rule = parse_threshold(args.threshold)
    except argparse.ArgumentTypeError as err:
        raise CxrError(f"--threshold {err}") from None
    external = Path(args.external)
    if not external.exists():
        raise CxrError(f"--external {external} does not exist: give labelled class folders (or a CSV) of another "
                       "site; a multi-label CSV for multi-label members")
    results = {"external": str(external),
               **compare(score_members(runs, external, shifted=rule.needs_shifts), args.calibration, args.threshold,
                         max_size=max_size, n_bootstrap=args.bootstrap)}
    report(Path(args.out), "members", results, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
