"""python -m benchmarks.shift: a trained run at another site: ranking, threshold, calibration, adaptation, guard.

    python -m benchmarks.shift --run runs/kermany/final
    python -m benchmarks.shift --run runs/kermany/final --external ~/site-b --labelled 100 --draws 30

A validation score is not the world. This suite scores a run on an external labelled folder (class folders;
default: the shared Kermany external development set, another acquisition batch than the training split, so
its figures are development figures) and measures what issue 27 asks of the toolkit there:

  run             ROC-AUC (95 % bootstrap interval), and accuracy, sensitivity and specificity at the run's own
                  threshold (chosen on its validation split); ECE as served
  calibration     each calibration method fitted on the run's validation split (never the external images)
                  applied to the external images: ECE there and on validation
  adaptation      `--draws` times: a stratified draw of `--labelled` external images refits calibration and
                  threshold (distributed.evaluation.adaptation, as `python -m distributed.adapt` does); the
                  other images are scored: ECE, sensitivity, specificity, accuracy (mean and spread over the
                  draws), and how often the adaptation's out-of-bag interval held the figure on the rest; the
                  same for each calibration method the command offers, on the same draws; and the ECE floor:
                  what the adapted probabilities would read on the rest if they were exactly right
  adabn           BatchNormalization statistics re-estimated on the external images (unlabelled): ROC-AUC
                  and ECE before and after
  guard           the run's out-of-distribution guard (eval/guard.npz): the share it flags of validation, of the
                  external images and of the images of other kinds (benchmarks.ood_set); the ROC-AUC of its score
                  between the external chest films and those, beside the model's own confidence (maximum
                  probability) and energy score; the adult chest CR's score
Without --run the suite trains the kermany-cpu recipe's first member (quick: 3 epochs) with launch.pipeline.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import (DEFAULT_RESULTS, DEFAULT_SHARED_DATA, REPO, check, checks_table, markdown_table, report,
                               require_dir, run_command)
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.errors import CxrError

log = logging.getLogger("cxrscale.benchmarks")
METHODS = ("none", "temperature", "platt", "isotonic")
ADAPT_METHODS = ("temperature", "platt", "isotonic")  # what distributed.adapt --calibration refits at a site
# issue 27's targets, before and after adapting with 100 labelled images of the site
TARGETS = {"roc_auc": (">=", 0.96), "accuracy": (">=", 0.90), "sensitivity": (">=", 0.95),
           "specificity": (">=", 0.80), "ece": ("<=", 0.08)}
ADAPTED_MAX_ECE = 0.05
MAX_EXTERNAL_FLAGGED = 0.05


def _labelled_folder(folder: Path, params, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from distributed.adapt import labelled_sample

    return labelled_sample(str(folder), classes, params, option="--external")


def _quality(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    from distributed.model import metrics as m

    return {"roc_auc": m.roc_auc(y, p), **{name: float(m.THRESHOLD_METRICS[name](y, p, threshold))
                                           for name in ("accuracy", "sensitivity", "specificity")},
            "ece": m.expected_calibration_error(y, p)}


def _ece_floor(p: np.ndarray, rng: np.random.Generator, simulations: int = 200) -> float:
    """The ECE that probabilities `p` would read on len(p) images if they were exactly right: the mean over
    `simulations` label draws y ~ Bernoulli(p). The binned estimator is biased upwards on a small sample, so
    this is the floor a perfectly calibrated model reads at this sample size and score distribution."""
    from distributed.model import metrics as m

    return float(np.mean([m.expected_calibration_error((rng.random(len(p)) < p).astype(int), p)
                          for _ in range(simulations)]))


def _adaptation(y: np.ndarray, z: np.ndarray, head, labelled: int, draws: int, seed: int) -> dict[str, Any] | None:
    """`draws` stratified draws of `labelled` images; on each, every calibration method of distributed.adapt
    refits calibration and threshold on the draw (the same draw for every method, so the methods are compared
    pairwise) and the rest are scored. The headline is the command's default method."""
    from distributed.adapt import AdaptConfig
    from distributed.evaluation.adaptation import adapt_site, fit_site
    from distributed.model.calibration import Calibration

    if draws < 1:
        return None
    default, rule = AdaptConfig.calibration, AdaptConfig.threshold
    rng, floor_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    by_method: dict[str, list[dict]] = {method: [] for method in ADAPT_METHODS}
    floors = []
    for draw in range(draws):
        pick = np.concatenate([rng.choice(np.flatnonzero(y == c), int(round(labelled * np.mean(y == c))),
                                          replace=False) for c in (0, 1)])
        rest = np.setdiff1d(np.arange(len(y)), pick)
        for method in ADAPT_METHODS:
            if method == default:  # the command's whole procedure, its out-of-bag intervals included
                site = adapt_site(y[pick], z[pick], head, method=method, rule=rule, n_bootstrap=200,
                                  seed=seed + draw)
                calibration, threshold = Calibration.from_dict(site["calibration"]), site["threshold"]
            else:
                calibration, threshold = fit_site(y[pick], z[pick], head, method, rule)
            p_rest = calibration.apply(head, z[rest])[:, 1]
            figures = _quality(y[rest], p_rest, threshold)
            round_ = {"rest": figures, "threshold": threshold}
            if method == default:
                round_["covered"] = {k: site["out_of_bag"][k]["low"] <= figures[k] <= site["out_of_bag"][k]["high"]
                                     for k in ("sensitivity", "specificity", "accuracy")}
                round_["intervals"], round_["narrowing"] = site["out_of_bag"], site["narrowing"]
                floors.append(_ece_floor(p_rest, floor_rng))
            by_method[method].append(round_)

    def spread(rounds: list[dict]) -> dict[str, dict[str, float]]:
        return {stat: {k: float(fn([r["rest"][k] for r in rounds])) for k in rounds[0]["rest"]}
                for stat, fn in (("mean", np.mean), ("sd", np.std))}

    rounds = by_method[default]
    return {"labelled": labelled, "draws": draws, "method": default, "rounds": rounds, **spread(rounds),
            "coverage": {k: float(np.mean([r["covered"][k] for r in rounds])) for k in rounds[0]["covered"]},
            "ece_floor": {"mean": float(np.mean(floors)), "sd": float(np.std(floors))},
            "methods": {method: spread(r) for method, r in by_method.items()}}


def measure(run_dir: Path, external: Path, shared_data: Path, work: Path, labelled: int, draws: int,
            seed: int = 0) -> dict[str, Any]:
    """Every figure of the suite for one run (TensorFlow in this process: run it as a child)."""
    from distributed.model.kerasenv import keras
    from distributed.evaluation.scores import ThresholdRule, recorded_rule
    from distributed.model import metrics as m
    from distributed.model.builders import recalibrate_batchnorm
    from distributed.model.calibration import fit_calibration, logits_of
    from distributed.model.guard import GUARD_FILE, Guard
    from distributed.model.heads import Head
    from distributed.model.scoring import read_run_config, run_model_path
    from benchmarks.ood_set import adult_chest, write_ood_set
    from cxrscale.files import read_json
    from preprocessing import schema
    from preprocessing.shifts import score_under_shifts
    from preprocessing.transform import TransformParams, transform

    config = read_run_config(run_dir)
    manifest = read_json(run_dir / "dataset_manifest.json", "dataset manifest")
    params, classes = TransformParams.from_dict(manifest["transform"]), list(manifest["classes"])
    data_dir = Path(config["config"]["data"])
    model = keras.models.load_model(str(run_model_path(run_dir)), compile=False)
    head = Head.of_logits(model)
    x_ext, y_ext = _labelled_folder(external, params, classes)
    val = [(x, y) for x, y in schema.dataset(data_dir, "val").as_numpy_iterator()]
    x_val, y_val = np.stack([x for x, _ in val]), np.array([int(y) for _, y in val])
    z_ext, z_val = logits_of(model, x_ext), logits_of(model, x_val)
    served = model.predict(x_ext, batch_size=64, verbose=0)
    p_served = served[:, 0] if served.shape[1] == 1 else served[:, 1]
    evaluation = read_json(run_dir / "eval" / "metrics.json", "the run's evaluation")
    threshold = float(evaluation["threshold"]["value"])
    out: dict[str, Any] = {"run": str(run_dir), "external": str(external), "n_external": int(len(y_ext)),
                           "external_class_counts": [int(np.sum(y_ext == c)) for c in range(len(classes))],
                           "threshold": threshold, "calibration_method": evaluation["calibration"]["method"]}
    out["as_served"] = _quality(y_ext, p_served, threshold)
    out["as_served"]["intervals"] = m.bootstrap_intervals(m.interval_metric_functions(threshold), y_ext, p_served,
                                                          n_resamples=1000, seed=seed)

    # each method's threshold by the run's own rule (Youden for an adapted run's fixed one, which no
    # calibration method chose)
    rule = recorded_rule(evaluation) or ThresholdRule("youden")
    rule = ThresholdRule("youden") if rule.kind == "fixed" else rule
    z_shifted = score_under_shifts(x_val, lambda batch: logits_of(model, batch)) if rule.needs_shifts else None
    out["calibration_threshold_rule"] = str(rule)
    out["calibration"] = {}
    for method in METHODS:
        cal = fit_calibration(method, y_val, z_val, head)
        p_ext, p_val = cal.apply(head, z_ext)[:, 1], cal.apply(head, z_val)[:, 1]
        t = rule.choose(y_val, p_val, None if z_shifted is None else np.stack([cal.apply(head, z)[:, 1]
                                                                               for z in z_shifted]))
        out["calibration"][method] = {"external": _quality(y_ext, p_ext, t), "val_ece": m.expected_calibration_error(
            y_val, p_val), "params": cal.params if method != "isotonic" else {}}

    out["adaptation"] = _adaptation(y_ext, z_ext, head, labelled, draws, seed)

    adabn_model = keras.models.load_model(str(run_model_path(run_dir)), compile=False)
    recalibrate_batchnorm(adabn_model, x_ext)
    z_adabn = logits_of(adabn_model, x_ext)
    out["adabn"] = {"roc_auc_before": m.roc_auc(y_ext, head.positive_logit(z_ext)),
                    "roc_auc_after": m.roc_auc(y_ext, head.positive_logit(z_adabn))}

    guard_file = run_dir / "eval" / GUARD_FILE
    if guard_file.is_file():
        guard = Guard.load(guard_file)
        ood = write_ood_set(work / "ood-set", shared_data)
        any_header = TransformParams.from_dict({**params.to_dict(), "modalities": [], "body_parts": []})
        names = [p for group in ood.values() for p in group]
        x_ood = np.stack([transform(p.read_bytes(), any_header, p.name) for p in names])
        s_ext, s_ood, s_val = guard.scores(x_ext), guard.scores(x_ood), guard.scores(x_val)
        z_ood = logits_of(model, x_ood)

        def separation(score_ext, score_ood) -> float:  # higher score = more out of distribution
            return m.roc_auc(np.r_[np.zeros(len(score_ext)), np.ones(len(score_ood))], np.r_[score_ext, score_ood])

        def energy(z):  # the 2-class logits of a sigmoid unit are (0, z); the energy is -logsumexp
            d = head.positive_logit(z)
            return -np.logaddexp(0.0, d)

        def confidence(z):
            p = 1 / (1 + np.exp(-head.positive_logit(z)))
            return np.maximum(p, 1 - p)

        adult = guard.scores(transform(adult_chest(shared_data).read_bytes(), any_header, "adult.dcm")[None])[0]
        out["guard"] = {
            "threshold": guard.threshold, "val_flagged": float(np.mean(guard.outside(s_val))),
            "external_flagged": float(np.mean(guard.outside(s_ext))),
            "ood_flagged": float(np.mean(guard.outside(s_ood))), "n_ood": len(names),
            "ood_scores": {p.name: float(s) for p, s in zip(names, s_ood)},
            "separation_auc": {"guard": separation(s_ext, s_ood), "energy": separation(-energy(z_ext),
                                                                                        -energy(z_ood)),
                               "max_probability": separation(-confidence(z_ext), -confidence(z_ood))},
            "adult_chest": {"score": float(adult), "flagged": bool(adult > guard.threshold)}}
    return out


def summarise(results: dict) -> tuple[list[dict], str]:
    served, ext = results["as_served"], Path(results["external"]).name
    checks = [check(f"{ext}: {k} at the run's threshold", served[k], op, goal) for k, (op, goal) in TARGETS.items()]
    adaptation = results.get("adaptation")
    if adaptation:
        checks.append(check(f"{ext}: ECE after adapting on {adaptation['labelled']} labelled (mean of "
                            f"{adaptation['draws']} draws)", adaptation["mean"]["ece"], "<=", ADAPTED_MAX_ECE))
    guard = results.get("guard")
    if guard:
        checks.append(check("guard: share of the other-kind images flagged", guard["ood_flagged"], ">=", 1.0))
        checks.append(check(f"guard: share of {ext} flagged", guard["external_flagged"], "<=", MAX_EXTERNAL_FLAGGED))
    iv = served["intervals"]
    lines = [f"Run `{results['run']}` on `{results['external']}` ({results['n_external']} images, "
             f"{results['external_class_counts']} per class). Development figures when this is the shared "
             "external development set.", "", checks_table(checks), "",
             "As served (its threshold " + f"{results['threshold']:.3f}, calibration {results['calibration_method']}):",
             "", markdown_table(["metric", "value", "95 % interval"],
                                [[k, f"{iv[k]['value']:.3f}", f"{iv[k]['low']:.3f}-{iv[k]['high']:.3f}"]
                                 for k in iv] + [["ece", f"{served['ece']:.3f}", ""]]), "",
             "Calibration fitted on validation, applied to the external images:", "",
             markdown_table(["method", "external ECE", "validation ECE",
                             f"accuracy at its {results.get('calibration_threshold_rule', 'youden')} threshold",
                             "sensitivity", "specificity"],
                            [[k, f"{v['external']['ece']:.3f}", f"{v['val_ece']:.3f}",
                              f"{v['external']['accuracy']:.3f}", f"{v['external']['sensitivity']:.3f}",
                              f"{v['external']['specificity']:.3f}"] for k, v in results["calibration"].items()])]
    if adaptation:
        mean, sd, cov = adaptation["mean"], adaptation["sd"], adaptation["coverage"]
        lines += ["", f"Adaptation on {adaptation['labelled']} labelled images, scored on the rest "
                      f"({adaptation['draws']} draws; mean and sd; coverage: how often the out-of-bag interval "
                      "held the figure on the rest):", "",
                  markdown_table(["metric", "mean", "sd", "coverage"],
                                 [[k, f"{mean[k]:.3f}", f"{sd[k]:.3f}", f"{cov[k]:.2f}" if k in cov else ""]
                                  for k in mean])]
        if "methods" in adaptation:
            floor = adaptation["ece_floor"]
            lines += ["", f"By calibration method (`distributed.adapt --calibration`; the same draws; "
                          f"{adaptation['method']} is the command's default). The ECE that the default's "
                          f"probabilities would read on the rest if they were exactly right (labels drawn from "
                          f"them): {floor['mean']:.3f} (sd {floor['sd']:.3f}), the binned estimator's floor at this "
                          "sample size:", "",
                      markdown_table(["method", "ECE mean (sd)", "accuracy", "sensitivity", "specificity",
                                      "ROC-AUC"],
                                     [[method, f"{v['mean']['ece']:.3f} ({v['sd']['ece']:.3f})"] +
                                      [f"{v['mean'][k]:.3f}" for k in ("accuracy", "sensitivity", "specificity",
                                                                       "roc_auc")]
                                      for method, v in adaptation["methods"].items()])]
    lines += ["", f"AdaBN on the external images: ROC-AUC {results['adabn']['roc_auc_before']:.4f} -> "
                  f"{results['adabn']['roc_auc_after']:.4f}."]
    if guard:
        sep = guard["separation_auc"]
        lines += ["", f"Guard: flags {100 * guard['val_flagged']:.1f} % of validation, "
                      f"{100 * guard['external_flagged']:.1f} % of the external images and "
                      f"{100 * guard['ood_flagged']:.0f} % of the {guard['n_ood']} other-kind images. Separation "
                      f"(ROC-AUC, external chest films against the others): guard {sep['guard']:.3f}, energy "
                      f"{sep['energy']:.3f}, maximum probability {sep['max_probability']:.3f}. The adult chest CR "
                      f"scores {guard['adult_chest']['score']:.2f} against a threshold of {guard['threshold']:.2f} "
                      f"({'flagged' if guard['adult_chest']['flagged'] else 'not flagged'})."]
    return checks, "\n".join(lines) + "\n"


def run_suite(quick: bool, work: Path) -> dict:
    """Train the kermany-cpu recipe's first member (quick: 3 epochs) on the shared train split with the external
    development set as its given test split, then measure it."""
    from cxrscale.files import write_text_atomic

    shared = DEFAULT_SHARED_DATA
    inputs = work / "shift-input"
    inputs.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", shared / "kermany224" / "train"), ("test", shared / "kermany224-external-dev")):
        require_dir(target, "shared data", "the shift suite needs ../shared/data (or $CXR_SHARED_DATA)")
        if not (inputs / name).exists():
            (inputs / name).symlink_to(target)
    import yaml

    recipe = yaml.safe_load((REPO / "launch" / "recipes" / "kermany-cpu.yaml").read_text())
    recipe["members"] = recipe["members"][:1]
    if quick:
        recipe["train"]["epochs"] = 3
    recipe_file = work / f"shift-recipe{'-quick' if quick else ''}.yaml"
    write_text_atomic(recipe_file, yaml.safe_dump(recipe))
    out = work / f"shift-run{'-quick' if quick else ''}"
    run_command([sys.executable, "-m", "launch.pipeline", "--recipe", str(recipe_file), "--input", str(inputs),
                 "--output", str(out), "--np", "1", "-q"])
    return measure_in_child(out / "final", shared / "kermany224-external-dev", shared, work, 100, 5 if quick else 30)


def measure_in_child(run_dir: Path, external: Path, shared: Path, work: Path, labelled: int, draws: int) -> dict:
    result = work / "shift-measure.json"
    run_command([sys.executable, "-m", "benchmarks.shift", "--child", str(result), "--run", str(run_dir),
                 "--external", str(external), "--labelled", str(labelled), "--draws", str(draws),
                 "--shared-data", str(shared), "--work", str(work)])
    return json.loads(result.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m benchmarks.shift", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Example:\n  python -m benchmarks.shift --run runs/kermany/final")
    parser.add_argument("--run", help="an evaluated run folder (default: train one, see above)")
    parser.add_argument("--external", default=str(DEFAULT_SHARED_DATA / "kermany224-external-dev"),
                        help="labelled class folders of another site (default: the shared external development set)")
    parser.add_argument("--labelled", type=int, default=100, help="labelled images per adaptation draw (default 100)")
    parser.add_argument("--draws", type=int, default=30, help="adaptation draws (default 30)")
    parser.add_argument("--shared-data", default=str(DEFAULT_SHARED_DATA), help="the shared data folder")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-shift"),
                        help="scratch folder: the other-kind images, the quick run (default runs/bench-shift)")
    parser.add_argument("--out", default=str(DEFAULT_RESULTS), help="results folder")
    parser.add_argument("--quick", action="store_true", help="without --run: train 3 epochs, 5 draws")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    work = Path(args.work)
    if args.child:
        from cxrscale.files import write_json_atomic

        write_json_atomic(args.child, measure(Path(args.run), Path(args.external), Path(args.shared_data), work,
                                              args.labelled, args.draws))
        return 0
    if args.labelled < 20 or args.draws < 1:
        raise CxrError("--labelled must be at least 20 and --draws at least 1")
    if args.run:
        require_dir(Path(args.run), "--run", "give an evaluated run folder")
        results = measure_in_child(Path(args.run), Path(args.external), Path(args.shared_data), work,
                                   args.labelled, args.draws)
    else:
        results = run_suite(args.quick, work)
    report(Path(args.out), "shift", results, summarise)
    return 0


if __name__ == "__main__":
    run_cli(main)
