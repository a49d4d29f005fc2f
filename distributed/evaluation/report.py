"""The evaluation's files: scores.csv, the figures, the Grad-CAM gallery, metrics.json, report.md and a
self-contained report.html (figures embedded as data URIs, no external reference).

The report is built once as a list of blocks (heading, paragraph, table, image) and rendered to both
Markdown and HTML, so the two always say the same.
"""
from __future__ import annotations

import csv
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from distributed.evaluation import plots
from distributed.evaluation.scores import describe_stability
from cxrscale.figures import png_data_uri
from cxrscale.files import read_numeric_csv, write_bytes_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger("cxrscale.evaluate")

METRIC_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "sensitivity": "sensitivity (recall)",
    "specificity": "specificity", "ppv": "precision (PPV)", "npv": "NPV", "f1": "F1",
    "roc_auc": "ROC-AUC", "average_precision": "PR-AUC (average precision)", "log_loss": "log loss, cross-entropy",
    "brier": "Brier score", "ece": "expected calibration error"}
LOWER_IS_BETTER = ("log_loss", "brier", "ece")


def write_scores(path: Path, scores, classes: list[str], threshold: float | None) -> None:
    """One row per evaluated record: its id hash, true and predicted class, and every class probability."""
    pred = scores.head.decide(scores.probs, threshold)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "true", "predicted", *[f"p_{c}" for c in classes]])
    for rid, y, p, probs in zip(scores.ids, scores.labels, pred, scores.probs):
        writer.writerow([rid, classes[y], classes[p], *[f"{v:.6f}" for v in probs]])
    write_text_atomic(path, buf.getvalue())


# --- figures --------------------------------------------------------------------------------------------

def write_figures(out: Path, val, test, classes: list[str], results: dict, history: Path | None, scorer,
                  picks: list[dict], images: dict[int, np.ndarray], *, gradcam: bool) -> tuple[dict, list]:
    """All plots; returns ({plot name: file name}, gallery entries). A plot the data cannot support (ROC on
    a one-class split) is left out with its reason under plots["skipped"]."""
    threshold = results["threshold"]["value"]
    points = ([(f"{results['threshold']['rule']} (chosen on val)", threshold), ("default", 0.5)]
              if threshold is not None else [])
    y, probs, head = test.labels, test.probs, test.head
    matrix = (_binary_matrix(results["at_threshold"]["confusion"]) if threshold is not None
              else np.array(results["multiclass"]["confusion_matrix"]))
    rule = f"threshold {fmt_threshold(threshold)}" if threshold is not None else "argmax"
    jobs = {
        "curves": lambda p: plots.training_curves(read_numeric_csv(history), p),
        "roc": lambda p: plots.roc(y, probs, classes, p, head=head, operating_points=points),
        "pr": lambda p: plots.precision_recall(y, probs, classes, p, head=head, operating_points=points),
        "confusion": lambda p: plots.confusion(matrix, classes, p, title=f"{test.split} split, {rule}"),
        "calibration": lambda p: plots.reliability(y, probs, classes, p, head=head,
                                                   before=results.get("calibration", {}).get("before_probs")),
        "histograms": lambda p: plots.score_histograms(y, probs, classes, p, head=head, threshold=threshold),
    }
    if history is None or not history.is_file():
        jobs.pop("curves")
    written: dict[str, Any] = {"skipped": {}}
    for name, job in jobs.items():
        try:
            job(out / f"{name}.png")
            written[name] = f"{name}.png"
        except ValueError as err:
            written["skipped"][name] = str(err)
            log.warning("plot %s left out: %s", name, err)
    gallery = write_gallery(out, picks, images, classes, scorer, gradcam=gradcam, threshold=threshold)
    if gallery:
        written["gallery"] = "gallery.png"
    return written, gallery


def write_png(path: Path, picture: np.ndarray) -> None:
    """An RGB (H, W, 3) or grey (H, W) uint8 picture as a PNG, written atomically."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR) if picture.ndim == 3 else picture)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    write_bytes_atomic(path, png.tobytes())


def _binary_matrix(c: dict[str, int]) -> np.ndarray:
    return np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])


def _gallery_caption(pick: dict, classes: list[str], threshold: float | None) -> str:
    if threshold is None:
        return f"id {pick['id'][:8]}"
    p = pick["probabilities"][1]
    digits = 6 if threshold > 0.999 or threshold < 0.001 else 3
    return (f"P({classes[1]}) {p:.{digits}f} {'>=' if p >= threshold else '<'} t {fmt_threshold(threshold)} "
            f"· id {pick['id'][:8]}")


def write_gallery(out: Path, picks: list[dict], images: dict[int, np.ndarray], classes: list[str], scorer, *,
                  gradcam: bool, threshold: float | None = None) -> list[dict]:
    """Grad-CAM overlays (one PNG each under gradcam/) and gallery.png of the picked cases. Without a Keras
    model (a .tflite file) or with gradcam off, the gallery shows the plain images."""
    if not picks:
        return []
    batch = np.stack([images[p["index"]] for p in picks])
    use_cam = gradcam and scorer.keras_model is not None
    if gradcam and not use_cam:
        log.warning("Grad-CAM needs a Keras model; %s is %s, so the gallery shows plain images",
                    scorer.path, scorer.kind)
    if use_cam:  # a Keras model is loaded, so TensorFlow is already: Grad-CAM's imports cost nothing more here
        from distributed.evaluation.gradcam import gradcam as grad_cam, overlay
        from distributed.model.builders import last_conv_layer_name

        layer = last_conv_layer_name(scorer.keras_model)
        heat = grad_cam(scorer.keras_model, batch, np.array([p["predicted_index"] for p in picks]), layer=layer)
        shown = [overlay(img, h) for img, h in zip(batch, heat)]
    else:
        layer, shown = None, [img[..., 0] for img in batch]
    (out / "gradcam").mkdir(exist_ok=True)
    entries, items = [], []
    for n, (pick, picture) in enumerate(zip(picks, shown), start=1):
        true, pred = classes[pick["true_index"]], classes[pick["predicted_index"]]
        name = f"gradcam/{n:02d}-{true}-as-{pred}.png"
        write_png(out / name, picture)
        entries.append({**pick, "true": true, "predicted": pred, "file": name, "gradcam_layer": layer})
        items.append({"image": picture, "true": true, "predicted": pred, "confidence": pick["confidence"],
                      "caption": _gallery_caption(pick, classes, threshold)})
    title = f"most confident right and wrong cases{f', Grad-CAM of {layer}' if layer else ''}"
    plots.gallery(items, out / "gallery.png", title=title)
    return entries


# --- the report -----------------------------------------------------------------------------------------

def write_report(out: Path, results: dict, blocks: list[tuple] | None = None) -> None:
    """metrics.json, report.md and report.html (of `blocks`, by default the single-label report's)."""
    write_json_atomic(out / "metrics.json", _finite(results))
    blocks = blocks if blocks is not None else report_blocks(results)
    write_text_atomic(out / "report.md", render_markdown(blocks))
    write_text_atomic(out / "report.html", render_html(blocks, out))


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def fmt_threshold(t: float) -> str:
    """Enough digits that a threshold near 0 or 1 (a miscalibrated model's) does not print as 0 or 1."""
    return f"{t:.6f}" if t > 0.999 or t < 0.001 else f"{t:.4f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def _ci(interval: dict | None) -> str:
    if not interval or interval.get("value") is None:
        return ""
    return f"{interval['low']:.3f} – {interval['high']:.3f}"


def report_blocks(r: dict) -> list[tuple]:
    """The report as ("h1"|"h2"|"p"|"table"|"img", ...) blocks."""
    name = Path(r["run"]["dir"]).name if r.get("run") else Path(r["model"]["path"]).name
    blocks: list[tuple] = [("h1", f"Evaluation of {name}")]
    t = r["threshold"]
    blocks.append(("p", f"{r['n']} images of the {r['split']} split of `{r['data']['dir']}`; "
                        f"classes {', '.join(f'{c} ({n})' for c, n in r['class_counts'].items())}. "
                        f"Operating point: {t['rule']}"
                        + (f", threshold {fmt_threshold(t['value'])}, which {t['description']}." if t["value"] is not None
                           else f", {t['description']}.")))
    blocks += _uncertainty_blocks(r)
    blocks += _metric_blocks(r)
    blocks += _split_blocks(r)
    blocks += _view_blocks(r)
    blocks += _calibration_blocks(r)
    blocks += _guard_blocks(r)
    blocks += _figure_blocks(r)
    blocks += _provenance_blocks(r)
    return blocks


def _uncertainty_blocks(r: dict) -> list[tuple]:
    ivs = (r.get("at_threshold") or r.get("multiclass", {})).get("intervals", {})
    acc = ivs.get("accuracy")
    if not acc or acc.get("value") is None:
        return []
    width = 100 * (acc["high"] - acc["low"])
    return [("p", f"**How sure are these numbers?** With {r['n']} test images the 95 % bootstrap interval of the "
                  f"accuracy is {100 * acc['low']:.1f} % to {100 * acc['high']:.1f} %, {width:.1f} points wide: two "
                  f"models whose accuracies differ by less than that are not told apart by this test set"
                  + (" (for example 91 % and 92 %)." if width > 1 else "."))]


def _metric_blocks(r: dict) -> list[tuple]:
    if "multiclass" in r:
        mc = r["multiclass"]
        rows = [[METRIC_LABELS[k], _fmt(mc[k]), _ci(mc["intervals"].get(k))]
                for k in ("accuracy", "balanced_accuracy", "log_loss", "brier", "ece")]
        rows.append(["macro ROC-AUC", _fmt(mc["macro"]["roc_auc"]), _ci(mc["intervals"].get("roc_auc"))])
        per = [[c, *[_fmt(v[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc",
                                          "average_precision")]] for c, v in mc["per_class"].items()]
        per.append(["macro average", *[_fmt(mc["macro"][k]) for k in ("sensitivity", "specificity", "ppv", "npv",
                                                                      "f1", "roc_auc", "average_precision")]])
        return [("h2", "Metrics"), ("table", ["metric", "value", "95 % CI"], rows),
                ("h2", "Per class (one vs rest)"),
                ("table", ["class", "sensitivity", "specificity", "PPV", "NPV", "F1", "ROC-AUC", "PR-AUC"], per)]
    at, half = r["at_threshold"], r["at_0.5"]
    head = ["metric", f"at threshold {fmt_threshold(r['threshold']['value'])}", "95 % CI", "at 0.5", "95 % CI"]
    rows = [[METRIC_LABELS[k] + (" (lower is better)" if k in LOWER_IS_BETTER else ""), _fmt(at[k]),
             _ci(at["intervals"].get(k)), _fmt(half[k]), _ci(half["intervals"].get(k))] for k in METRIC_LABELS]
    blocks = [("h2", "Metrics"), ("table", head, rows)]
    undefined = {**half["undefined"], **at["undefined"]}
    if undefined:
        blocks.append(("p", "Undefined on this data: " + "; ".join(f"{METRIC_LABELS[k]}: {v}"
                                                                   for k, v in undefined.items())))
    c, neg, pos = at["confusion"], *r["classes"]
    blocks.append(("p", f"At threshold {fmt_threshold(r['threshold']['value'])}: {c['tp']} {pos} found and {c['fn']} missed "
                        f"(false negatives); {c['tn']} {neg} cleared and {c['fp']} flagged as {pos} "
                        f"(false positives). Validation at the same threshold: sensitivity "
                        f"{_fmt(r['validation_at_threshold']['sensitivity'])}, specificity "
                        f"{_fmt(r['validation_at_threshold']['specificity'])}."))
    stability = describe_stability(r["threshold"], r["split"])
    if stability:
        blocks.append(("p", stability))
    return blocks


def _view_blocks(r: dict) -> list[tuple]:
    views = r.get("per_view")
    if not views:
        return []
    keys = [k for k in next(iter(views.values())) if k not in ("n", "class_counts")]
    where = (f"at threshold {fmt_threshold(r['threshold']['value'])}" if r["threshold"]["value"] is not None
             else "by the most probable class")
    rows = [[view, str(v["n"]), ", ".join(f"{c} {n}" for c, n in v["class_counts"].items()),
             *[f"{_fmt(v[k]['value'])} ({_ci(v[k])})" if v[k]["value"] is not None else "undefined" for k in keys]]
            for view, v in views.items()]
    return [("h2", "Per view position"),
            ("p", f"The {r['split']} split mixes DICOM view positions (ViewPosition); a model can be good on PA "
                  f"and poor on AP. Metrics {where}, with 95 % bootstrap intervals:"),
            ("table", ["view", "images", "classes", *[METRIC_LABELS.get(k, k) for k in keys]], rows)]


def _calibration_blocks(r: dict) -> list[tuple]:
    cal = r.get("calibration")
    if not cal:
        return []
    rows = [[stage, _fmt(cal[stage]["ece"]), _fmt(cal[stage]["brier"]), _fmt(cal[stage]["log_loss"])]
            for stage in ("before", "after") if stage in cal]
    rows[-1][0] = "after" if "before" in cal else "as output"
    how = {"none": "The model outputs its raw probabilities (no calibration).",
           "unknown": "The model ends in calibration layers."}.get(
        cal["method"], f"The model ends in {cal['method']} calibration fitted on the {cal['fitted_on'] or 'val'} split.")
    return [("h2", "Calibration"), ("p", how + f" Measured on the {r['split']} split (lower is better):"),
            ("table", ["probabilities", "ECE", "Brier", "log loss"], rows)]


def _split_blocks(r: dict) -> list[tuple]:
    rows = r.get("splits") or []
    if len(rows) < 2:
        return []
    keys = [k for k in ("roc_auc", "accuracy", "sensitivity", "specificity") if k in rows[0]["intervals"]]
    header = ["split", "how it was made", "images", *[METRIC_LABELS.get(k, k) for k in keys], "ECE"]
    flagged = any("flagged" in row for row in rows)
    table = []
    for row in rows:
        cells = [row["split"], row["origin"], str(row["n"])]
        for key in keys:
            ci = row["intervals"].get(key) or {}
            cells.append("n/a" if ci.get("value") is None else
                         f"{_fmt(ci['value'])} ({_fmt(ci['low'])}-{_fmt(ci['high'])})" if ci.get("low") is not None
                         else _fmt(ci["value"]))
        cells.append(_fmt(row["ece"]))
        if flagged:
            cells.append(f"{100 * row['flagged']:.1f} %" if "flagged" in row else "-")
        table.append(cells)
    return [("h2", "Every split, side by side"),
            ("p", "At the same validation-chosen threshold, with 95 % bootstrap intervals. The validation row is "
                  "optimistic (the threshold and the calibration were fitted on it); a split held out by time, by "
                  "source or from another site shows what a new hospital should expect."),
            ("table", header + (["flagged by the guard"] if flagged else []), table)]


def _guard_blocks(r: dict) -> list[tuple]:
    guard = r.get("guard")
    if not guard:
        return []
    if not guard.get("threshold"):
        return [("h2", "Out-of-distribution guard"), ("p", f"Not fitted: {guard.get('reason')}")]
    rows = [[name, f"{100 * guard[f'{name}_flagged']:.1f} %"] for name in ("val", r["split"])
            if f"{name}_flagged" in guard]
    return [("h2", "Out-of-distribution guard"),
            ("p", f"{guard['method']} ({guard['components']} components) fitted on the train split; images scoring "
                  f"above {guard['threshold']:.3f}, the {guard['quantile']} quantile of the validation scores, are "
                  "flagged as outside what the model was trained on (`guard.npz`, which predict and export use). "
                  "A split from another site or batch that is flagged far more often than validation is shifted."),
            ("table", ["split", "flagged"], rows[:1] if r["split"] == "val" else rows)]


FIGURES = (("curves", "Training curves: loss, accuracy and validation AUC per epoch"),
           ("roc", "ROC curve with the operating points"), ("pr", "Precision-recall curve"),
           ("confusion", "Confusion matrix: counts and fraction of each true class"),
           ("calibration", "Reliability diagram: predicted probability vs observed frequency"),
           ("histograms", "Predicted probabilities per true class"),
           ("gallery", "Most confident right and wrong cases of each class"))


def _figure_blocks(r: dict) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Figures")]
    for name, caption in FIGURES:
        if name in r["plots"]:
            blocks.append(("img", r["plots"][name], caption))
    for name, why in r["plots"].get("skipped", {}).items():
        blocks.append(("p", f"The {name} plot is left out: {why}."))
    return blocks


def _provenance_blocks(r: dict) -> list[tuple]:
    d = r["data"]
    counts = d.get("counts") or {}
    split_rows = [[s, *[str(v) for v in c.values()]] for s, c in counts.items()]
    head = ["split", *next(iter(counts.values())).keys()] if counts else []
    blocks: list[tuple] = [("h2", "Dataset")]
    blocks.append(("p", f"`{d['dir']}` (fingerprint {str(d.get('fingerprint'))[:12]}), transform "
                        f"{', '.join(f'{k}={v}' for k, v in (d.get('transform') or {}).items())}."
                        + {True: " This is the dataset the model was trained on.",
                           False: " **This is not the dataset the run was trained on**: its test split may overlap "
                                  "the training data, which only you can rule out.",
                           None: ""}[d.get("same_as_training")]))
    if split_rows:
        blocks.append(("table", head, split_rows))
    if d.get("excluded"):
        blocks.append(("p", f"{d['excluded']} pool images that share a patient or duplicate group with a given "
                            "split were left out of train and val (listed in the dataset's manifest.json)."))
    for warning in d.get("warnings") or []:
        blocks.append(("p", f"**Warning from the dataset:** {warning}"))
    blocks.append(("h2", "Model"))
    mdl = r["model"]
    text = f"`{mdl['path']}` ({mdl['kind']}, input {'x'.join(map(str, mdl['input_shape']))}, " \
           f"{mdl['size_bytes'] / 1e6:.1f} MB)."
    if r.get("run") and r["run"].get("ensemble"):
        ens = r["run"]["ensemble"]
        text += (f" An ensemble of {len(ens['members'])} runs ({', '.join(ens['models'])}; seeds "
                 f"{', '.join(str(x) for x in ens['seeds'])}), combined as the {ens['combine']}: "
                 + ", ".join(f"`{m}`" for m in ens["members"]) + ".")
    elif r.get("run"):
        cfg, res = r["run"]["config"], r["run"]["resolved"]
        text += (f" Trained as `{cfg['model']}` for {cfg['epochs']} epochs on {res['workers']} worker(s) "
                 f"({res['device']}, {res['precision']}), global batch {res['global_batch']}, learning rate "
                 f"{res['scaled_lr']:g}, weights {res['weights']}.")
    blocks.append(("p", text))
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            head, rows = block[1], block[2]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in a paragraph, HTML-escaped."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bits = part.split("**")
            out.append("".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bits)))
    return "".join(out)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:90%}")


def render_html(blocks: list[tuple], folder: Path) -> str:
    """A standalone page: figures as base64 data URIs, inline CSS, no link to anything outside itself."""
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="{png_data_uri(folder / block[1])}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    title = html.escape(blocks[0][1]) if blocks else "cxrscale report"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
