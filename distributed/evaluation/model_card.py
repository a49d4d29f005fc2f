"""The model card: what a model is for, what it was trained on, how well it does and where it falls short,
written in Markdown from what the run already records (after Mitchell et al. 2019, "Model Cards for Model
Reporting").

distributed.evaluate writes it (RUN/model_card.md for a run, OUTPUT/model_card.md beside any other evaluated
model), launch.pipeline rewrites it at the end of every invocation with the pipeline's own record, and
optimize.export copies it beside the exported models. Every figure comes from the evaluation's metrics.json
(the evaluated split, the validation-chosen threshold, bootstrap intervals), the run's config.json,
calibration.json and train_summary.json, and the dataset manifest; nothing is typed in by hand, so the card
is as current as the last evaluation. No TensorFlow here.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cxrscale.cli import version_line
from cxrscale.files import read_json, write_text_atomic
from cxrscale.provenance import git_commit
from distributed.evaluation.scores import describe_stability
from distributed.model.heads import Head
from distributed.model.scoring import ADAPTATION_FILE

CARD_NAME = "model_card.md"
KERMANY_CREDIT = ('D. Kermany, K. Zhang, M. Goldbaum, "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray '
                  'Images for Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, licence CC BY 4.0')
METRIC_NAMES = {"roc_auc": "ROC-AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
                "specificity": "specificity", "ppv": "PPV (precision)", "npv": "NPV", "balanced_accuracy":
                "balanced accuracy", "f1": "F1", "average_precision": "average precision", "ece": "ECE",
                "brier": "Brier score", "log_loss": "log loss"}


def card_path(metrics: dict[str, Any]) -> Path:
    """Where the card of an evaluation goes: RUN/model_card.md when the run's own model was evaluated, else
    beside the evaluation's files."""
    run = metrics.get("run") or {}
    output = Path(metrics["output"])
    if run.get("dir") and output == Path(run["dir"]) / "eval":
        return Path(run["dir"]) / CARD_NAME
    return output / CARD_NAME


def write_model_card(metrics_file: str | Path, target: str | Path | None = None, *,
                     pipeline: dict[str, Any] | None = None, dataset_credit: str | None = None) -> Path:
    """Write the card of the evaluation in `metrics_file` (an eval/metrics.json) to `target` (default
    `card_path`); `pipeline` is launch.pipeline's record, when it made the model."""
    metrics = read_json(metrics_file, "evaluation metrics")
    path = Path(target) if target else card_path(metrics)
    write_text_atomic(path, model_card(metrics, Path(metrics_file), pipeline=pipeline, dataset_credit=dataset_credit))
    return path


def model_card(metrics: dict[str, Any], metrics_file: Path, *, pipeline: dict[str, Any] | None = None,
               dataset_credit: str | None = None) -> str:
    run = metrics.get("run") or {}
    run_dir = Path(run["dir"]) if run.get("dir") else None
    data = metrics.get("data") or {}
    classes = metrics["classes"]
    name = run_dir.resolve().name if run_dir else Path(metrics["model"]["path"]).name
    synthetic = "SAMPLE.json" in ((data.get("source") or {}).get("ignored") or [])
    lines = [f"# Model card: {name}", "",
             f"Written by {version_line()} on {datetime.date.today().isoformat()} from the evaluation in "
             f"`{metrics_file}`; regenerate it with `python -m distributed.evaluate`.", ""]
    if synthetic:
        lines += ["> **Demonstration only.** This model was trained on the toolkit's built-in synthetic sample, "
                  "which is not made of real radiographs. Nothing below says anything about chest X-rays.", ""]
    # metrics.json written before heads were recorded: a single-label head over its classes
    head = Head.from_dict(metrics["head"]) if metrics.get("head") else Head.for_classes(len(classes))
    lines += _intended_use(classes, head)
    lines += _training_data(data, classes, synthetic, dataset_credit)
    lines += _preprocessing(data.get("transform") or {})
    lines += _model(metrics, run, run_dir, pipeline)
    lines += _adaptation(run_dir)
    multilabel = head.multilabel
    lines += _findings_performance(metrics) if multilabel else _performance(metrics)
    lines += _calibration(metrics.get("calibration") or {})
    lines += _guard(metrics.get("guard") or {}, metrics.get("split", "test"))
    lines += [] if multilabel else _subgroups(metrics, classes)
    lines += _limitations(metrics, data, synthetic)
    lines += _provenance(metrics, run, run_dir, metrics_file)
    return "\n".join(lines).rstrip() + "\n"


def _intended_use(classes: list[str], head: Head) -> list[str]:
    task = (f"tells {classes[1]} from {classes[0]}" if head.binary
            else f"says which of {', '.join(classes)} a radiograph shows, several at once" if head.multilabel
            else f"assigns one of {', '.join(classes)}")
    return ["## Intended use", "",
            f"A classifier that {task} on frontal chest radiographs prepared with the transform below. It is for "
            "research, for engineering the training, compression and deployment of such models, and, after a "
            "validation at the site that uses it, as a second reader that flags images for a qualified "
            "clinician to review. Its output is a calibrated probability and, for two classes, a decision at an "
            "operating threshold chosen on the validation split.", "",
            "**Not for:**", "",
            "- diagnosis or treatment decisions without a clinician: it is not a medical device and has no "
            "regulatory clearance;",
            "- patients, views, equipment or sites unlike the training data (for the Kermany data: paediatric "
            "patients of one centre, frontal views) without first measuring it on them;",
            "- other findings or modalities than the classes it was trained on: it always answers with one of "
            "its classes. The out-of-distribution guard below flags images unlike its training images, but an "
            "unflagged image is not thereby in scope;",
            "- telling causes apart (for pneumonia: bacterial from viral) unless those were its classes.", ""]


def _training_data(data: dict, classes: list[str], synthetic: bool, credit: str | None) -> list[str]:
    counts = data.get("counts") or {}
    rows = [f"| {split} | " + " | ".join(str(c.get(k, 0)) for k in classes) + f" | {c.get('total', '')} |"
            for split, c in counts.items()]
    source = data.get("source") or {}
    out = ["## Training data", "",
           f"Prepared dataset `{data.get('dir')}` (fingerprint `{str(data.get('fingerprint'))[:16]}`), from "
           f"{source.get('inputs', '?')} input images ({source.get('layout', 'unknown')} layout). The splits are "
           "grouped by patient and duplicate group, so no patient is on two sides:", "",
           "| split | " + " | ".join(classes) + " | total |", "|---|" + "---|" * (len(classes) + 1), *rows, ""]
    if data.get("excluded"):
        out += [f"{data['excluded']} images were left out because their patient or duplicate group also occurs "
                "in a given split.", ""]
    if credit:
        out += [f"Dataset credit: {credit}.", ""]
    elif synthetic:
        out += ["Dataset: the toolkit's synthetic sample (`python -m preprocessing.sample`).", ""]
    elif sorted(classes) == ["NORMAL", "PNEUMONIA"]:
        out += [f"Dataset credit: the classes are those of the Kermany paediatric chest X-ray set, which the "
                f"toolkit's recipes are built for; if this is that data, credit it as {KERMANY_CREDIT}. (Another "
                "source: pass its credit with `distributed.evaluate --dataset-credit`.)", ""]
    else:
        out += ["Dataset credit: not recorded; pass it with `distributed.evaluate --dataset-credit`.", ""]
    return out


def _preprocessing(t: dict) -> list[str]:
    if not t:
        return ["## Preprocessing", "", "Not recorded with this evaluation.", ""]
    contrast = t.get("contrast")
    if contrast == "clahe":
        contrast = f"CLAHE (clip limit {t.get('clahe_clip_limit')}, {t.get('clahe_tile_grid')}x" \
                   f"{t.get('clahe_tile_grid')} tiles)"
    return ["## Preprocessing", "",
            f"Every image, in training and at prediction alike (the transform is read from the dataset manifest), "
            f"is decoded (JPEG, PNG or DICOM) to 8-bit greyscale, rejected if its shorter side is below "
            f"{t.get('min_side')} px, resized to {t.get('size')}x{t.get('size')} px by {t.get('resize')} and "
            f"given {contrast} contrast. The model takes the uint8 pixels and scales them itself."
            + _dicom_rules(t), ""]


def _dicom_rules(t: dict) -> str:
    if "modalities" not in t:
        return ""
    modalities = ", ".join(t["modalities"]) or "any modality"
    views = ", ".join(t.get("views") or []) or "every view"
    parts = ", ".join(t.get("body_parts") or []) or "any body part"
    burned = "accepted" if t.get("allow_burned_in_annotation") else "refused"
    return (f" DICOM files are accepted from {modalities}, {views} and BodyPartExamined {parts}; burnt-in "
            f"annotations are {burned}, at preparation and at prediction alike.")


def _model(metrics: dict, run: dict, run_dir: Path | None, pipeline: dict | None) -> list[str]:
    model = metrics.get("model") or {}
    config, resolved = run.get("config") or {}, run.get("resolved") or {}
    out = ["## Model", ""]
    ensemble = run.get("ensemble")
    if ensemble:
        members = ensemble.get("members") or []
        kinds = ", ".join(f"{m} (seed {s})" for m, s in zip(ensemble.get("models") or [], ensemble.get("seeds") or []))
        out.append(f"- An ensemble of {len(members)} trained runs ({kinds}), the {ensemble.get('combine')}, then "
                   "calibrated: " + ", ".join(f"`{m}`" for m in members) + ".")
    elif run:
        out.append(f"- `{run.get('model')}`, weights `{resolved.get('weights')}`, {config.get('epochs')} epochs "
                   f"at a global batch of {resolved.get('global_batch')} on {resolved.get('workers')} "
                   f"{resolved.get('device')} worker(s), {resolved.get('precision')}; weight average "
                   f"{config.get('ema') or 'off'}.")
    summary_file = run_dir / "train_summary.json" if run_dir else None
    if summary_file and summary_file.is_file():
        summary = read_json(summary_file, "training summary")
        if summary.get("best_epoch") is not None:
            out.append(f"- Best epoch {summary['best_epoch']} of {summary.get('epochs_completed')} by validation "
                       f"ROC-AUC {summary.get('best_val_auc', float('nan')):.4f}.")
    out.append(f"- Input {model.get('input_shape')} uint8; {model.get('kind')} model of "
               f"{(model.get('size_bytes') or 0) / 1e6:.1f} MB at `{model.get('path')}`.")
    if metrics.get("tta"):
        out.append("- Evaluated with test-time augmentation (4 views); predict with `--tta` to match.")
    if pipeline:
        out.append(f"- Made by `launch.pipeline`, recipe `{pipeline.get('recipe')}`: "
                   f"`{' '.join(pipeline.get('command') or [])}`.")
    return out + [""]


def split_table(rows: list[dict]) -> list[str]:
    """The side-by-side table of every split an evaluation has (metrics.json's "splits"), Markdown rows."""
    keys = [k for k in ("roc_auc", "accuracy", "sensitivity", "specificity") if any(k in r["intervals"] for r in rows)]
    flagged = any("flagged" in r for r in rows)
    out = ["| split | how it was made | images | " + " | ".join(METRIC_NAMES[k] for k in keys) + " | ECE |"
           + (" flagged by the guard |" if flagged else ""),
           "|---|---|---|" + "---|" * (len(keys) + 1 + flagged)]
    for r in rows:
        cells = [_interval_cell(r["intervals"].get(k) or {}) for k in keys]
        out.append(f"| {r['split']} | {r['origin']} | {r['n']} | " + " | ".join(cells) + f" | {r['ece']:.3f} |"
                   + (f" {100 * r['flagged']:.1f} % |" if flagged and "flagged" in r else (" - |" if flagged else "")))
    return out


def _interval_cell(ci: dict) -> str:
    if ci.get("value") is None:
        return "n/a"
    return f"{ci['value']:.3f} ({ci['low']:.3f}-{ci['high']:.3f})" if ci.get("low") is not None else \
        f"{ci['value']:.3f}"


def _adaptation(run_dir: Path | None) -> list[str]:
    path = run_dir / ADAPTATION_FILE if run_dir else None
    if not path or not path.is_file():
        return []
    record = read_json(path, "adaptation record")
    out = ["## Site adaptation", "", f"Adapted to site **{record['site']}** from `{record['adapted_from']}` by "
           "`python -m distributed.adapt`."]
    if record.get("adabn"):
        out.append(f"- BatchNormalization statistics re-estimated on {record['adabn']['images']} of the site's "
                   f"images ({record['adabn']['from']}).")
    site = record.get("labelled")
    if site and "findings" in site:
        out += _adapted_findings(site)
    elif site:
        oob, cal = site["out_of_bag"], site["calibration"]
        out += [f"- Calibration `{cal['method']}` and the operating threshold ({site['rule_description']}) were "
                f"fitted on {site['n']} labelled images of the site ({site['class_counts'][0]} negative, "
                f"{site['class_counts'][1]} positive): threshold **{site['threshold']:.3f}** (bootstrap 95 % "
                f"interval {site['threshold_interval']['low']:.3f}-{site['threshold_interval']['high']:.3f}).",
                "- What to expect at the site with a threshold chosen this way (each of "
                f"{site['bootstrap_rounds']} bootstrap rounds refits on a resample and measures on the images it "
                "left out):", "",
                "| at the site | expected | 95 % interval | labelled images for +-"
                f"{site['target_half_width']:.2f} |", "|---|---|---|---|"]
        for key in ("sensitivity", "specificity", "accuracy"):
            iv, need = oob[key], site["narrowing"][key]
            out.append(f"| {key} | {iv['value']:.3f} | {iv['low']:.3f}-{iv['high']:.3f} | "
                       f"{need['images_for_target']} |")
        out += ["", "Out-of-bag figures run a little low (each round fits on about 63 % of the distinct images); "
                "the figures in Performance below are on the original dataset's splits, at the site's threshold."]
    else:
        out.append("- No labelled sample: the original calibration and threshold are kept.")
    return out + [""]


def _adapted_findings(site: dict) -> list[str]:
    """A multi-label run's adaptation: each finding's site threshold and what to expect with it, or why the
    finding kept the run's calibration and validation threshold."""
    out = [f"- A temperature and an operating threshold ({site['rule_description']}) were fitted per finding on "
           f"{site['n']} labelled images of the site, where it had at least {site['min_per_class']} positive "
           f"and {site['min_per_class']} negative ones. "
           "Expected figures: bootstrap rounds refitting on a resample and measuring on the images it left out "
           "(95 % intervals).", "",
           "| finding | site labels (negative / positive) | threshold | sensitivity | specificity |",
           "|---|---|---|---|---|"]
    for r in site["findings"]:
        counts = f"{r['class_counts'][0]} / {r['class_counts'][1]}"
        if not r["adapted"]:
            out.append(f"| {r['finding']} | {counts} | not adapted: too few labels | - | - |")
            continue
        oob, ti = r["out_of_bag"], r["threshold_interval"]
        cells = [f"{oob[k]['value']:.3f} ({oob[k]['low']:.3f}-{oob[k]['high']:.3f})"
                 for k in ("sensitivity", "specificity")]
        out.append(f"| {r['finding']} | {counts} | {r['threshold']:.3f} ({ti['low']:.3f}-{ti['high']:.3f}) | "
                   + " | ".join(cells) + " |")
    return out + [""]


def _interval(summary: dict, key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "n/a"
    ci = (summary.get("intervals") or {}).get(key)
    return f"{value:.3f} ({ci['low']:.3f}-{ci['high']:.3f})" if ci else f"{value:.3f}"


def _performance(metrics: dict) -> list[str]:
    counts = ", ".join(f"{n} {c}" for c, n in (metrics.get("class_counts") or {}).items())
    out = ["## Performance", "",
           f"On the **{metrics['split']}** split ({metrics['n']} images: {counts}), never used to train, stop, "
           "calibrate or choose the threshold. 95 % intervals: stratified bootstrap."]
    threshold = metrics.get("threshold") or {}
    if "at_threshold" not in metrics:
        multi = metrics.get("multiclass") or {}
        out += ["", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {v:.3f} |" for k, v in multi.items() if isinstance(v, (int, float))]
        return out + [""]
    at, half = metrics["at_threshold"], metrics.get("at_0.5") or {}
    out += ["", f"Operating threshold **{threshold['value']:.4f}** ({threshold['rule']}: {threshold['description']})."]
    stability = describe_stability(threshold, metrics["split"])
    if stability:
        out += ["", stability]
    out += ["", f"| metric | at {threshold['value']:.3f} | at 0.5 |", "|---|---|---|"]
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "f1"):
        if key in at:
            out.append(f"| {METRIC_NAMES[key]} | {_interval(at, key)} | {_interval(half, key)} |")
    c = at.get("confusion") or {}
    if c:
        out += ["", f"At the threshold: {c.get('tp')} true positives, {c.get('fn')} missed, {c.get('fp')} false "
                    f"alarms, {c.get('tn')} true negatives."]
    if metrics.get("splits"):
        out += ["", "**Every split, side by side**, at the same threshold (the validation row is optimistic: the "
                    "threshold and the calibration were fitted on it). A drop from validation to a split held "
                    "out by time, by source or from another site is what a new hospital should expect:", "",
                *split_table(metrics["splits"])]
    return out + [""]


def _calibration(cal: dict) -> list[str]:
    after, before = cal.get("after") or {}, cal.get("before")
    out = ["## Calibration", "",
           f"Method `{cal.get('method', 'none')}`, fitted on the `{cal.get('fitted_on') or '-'}` split, and part "
           "of the model itself (every exported format carries it)."]
    if after:
        out += ["", "| on the evaluated split | ECE | Brier | log loss |", "|---|---|---|---|"]
        if before:
            out.append(f"| before calibration | {before['ece']:.3f} | {before['brier']:.3f} | "
                       f"{before['log_loss']:.3f} |")
        out.append(f"| as served | {after['ece']:.3f} | {after['brier']:.3f} | {after['log_loss']:.3f} |")
    return out + [""]


def _guard(guard: dict, split: str) -> list[str]:
    out = ["## Out-of-distribution guard", ""]
    if not guard.get("threshold"):
        reason = guard.get("reason") or "this evaluation fitted none"
        return out + [f"None ({reason}): predictions do not flag images unlike the training images.", ""]
    flagged = guard.get(f"{split}_flagged")
    return out + [
        f"Every prediction carries an out-of-distribution score: the {guard.get('method')} fitted on "
        f"{(guard.get('fitted') or {}).get('train')} training images. Images scoring above "
        f"{guard['threshold']:.3f}, the {guard.get('quantile')} quantile of the validation split's scores, are "
        "marked *outside what the model was trained on* by `distributed.predict` and every export.",
        "", f"It flags {guard.get('val_flagged', 0):.1%} of the validation split"
        + (f" and {flagged:.1%} of the {split} split" if flagged is not None and split != "val" else "") + ". "
        "It looks at the image, not the patient: a radiograph of another body part, a photograph or a "
        "rendering is flagged, and an adult chest film may or may not be (docs/evaluation.md).", ""]


def _findings_performance(metrics: dict) -> list[str]:
    """A multi-label model's performance, finding by finding (distributed.evaluation.findings)."""
    from distributed.evaluation.findings import finding_table, summary_lines

    summary = metrics["findings"]
    out = ["## Performance", "", f"On the **{metrics['split']}** split, never used to train, stop, calibrate or "
           "choose a threshold. 95 % intervals: stratified bootstrap per finding, images resampled for the macro "
           "and micro AUC.", ""]
    for line in summary_lines(summary, metrics["split"], metrics["n"]):
        out += [line, ""]
    head, rows = finding_table(summary)
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out + [""]


def _subgroups(metrics: dict, classes: list[str]) -> list[str]:
    out = ["## Subgroups", ""]
    at = metrics.get("at_threshold")
    if at:
        out.append(f"- By true class: {classes[1]} found in {_interval(at, 'sensitivity')} of cases "
                   f"(sensitivity), {classes[0]} left alone in {_interval(at, 'specificity')} (specificity).")
    for view, entry in (metrics.get("per_view") or {}).items():
        keys = ("roc_auc", "sensitivity", "specificity", "accuracy", "balanced_accuracy")
        figures = [f"{METRIC_NAMES.get(k, k)} {_view_value(entry[k])}" for k in keys if k in entry]
        out.append(f"- View {view} ({entry['n']} images): " + ", ".join(figures) + ".")
    grouped = "site, sex, age, device" + ("" if metrics.get("per_view") else ", view")
    out.append(f"- The prepared dataset records no other group ({grouped}) for its images, so no figures by "
               "group can be given here; measure them before use where such groups matter.")
    return out + [""]


def _view_value(interval: dict) -> str:
    if interval.get("value") is None:
        return "undefined"
    return f"{interval['value']:.3f} ({interval['low']:.3f}-{interval['high']:.3f})"


def _limitations(metrics: dict, data: dict, synthetic: bool) -> list[str]:
    out = ["## Known limitations", ""]
    split, given = metrics.get("split", "test"), (data.get("split") or {}).get("given") or []
    if data.get("same_as_training", True) and split not in given:
        out.append(f"- **The figures above are on a split carved from the training source**: the same sites, "
                   f"devices and acquisition batches as the training images ({split} split, patients disjoint "
                   "from train). They say nothing of another hospital's radiographs, where a model like this one "
                   "can rank and calibrate worse; this card holds no figure of this model on such images. Evaluate "
                   "it on your own site's labelled images (`python -m distributed.evaluate --run RUN --data "
                   "prepared/site`) before any use; `benchmarks.robustness` measures acquisition shifts.")
    elif data.get("same_as_training", True):
        out.append(f"- The {split} split is the one the input named as {split}: it was kept exactly as given and no "
                   "image of its patients was trained on. Whether it comes from another site or acquisition batch "
                   "than the training images is for the input to say; if it does not, the figures above overstate "
                   "performance elsewhere.")
    else:
        out.append("- The evaluated dataset is not the one the model was trained on; check that its test images "
                   "share no patient with the training data.")
    n = metrics.get("n", 0)
    out.append(f"- {n} test images: the intervals above are the honest width of what they can tell; two models "
               "whose intervals overlap are not shown to differ.")
    if metrics.get("at_threshold"):
        out.append("- PPV and NPV depend on how common the positive class is; the test split's share is the "
                   "training source's, not necessarily the deployment site's.")
    for warning in data.get("warnings") or []:
        out.append(f"- Data warning from preparation: {warning}")
    if synthetic:
        out.append("- Trained on synthetic images: no clinical meaning at all.")
    return out + [""]


def _provenance(metrics: dict, run: dict, run_dir: Path | None, metrics_file: Path) -> list[str]:
    out = ["## Provenance", "", f"- Evaluation: `{metrics_file}` ({metrics.get('seconds', 0):.0f} s)."]
    config_file = run_dir / "config.json" if run_dir else None
    if config_file and config_file.is_file():
        config = read_json(config_file, "training run config")
        libs = ", ".join(f"{k} {v}" for k, v in (config.get("libraries") or {}).items())
        out += [f"- Training run `{run_dir}`: git commit `{config.get('git_commit')}`, {libs}.",
                f"- Dataset manifest sha256 `{config.get('manifest_sha256')}`."]
    out.append(f"- This card: git commit `{git_commit()}`.")
    return out + [""]
