"""The evaluation of a multi-label model as a radiologist reads it: finding by finding.

For each finding, over the test images where its label is known: prevalence, ROC-AUC and average precision
with stratified bootstrap intervals, and sensitivity and specificity at the finding's own threshold, chosen
on validation by the run's rule; a finding whose test split holds too few positive or negative images to
measure says so instead of a number. Across findings: the macro ROC-AUC (the mean over the measured
findings) and the micro ROC-AUC (every known image-finding pair pooled), with intervals from resampling
images. Also the report's blocks, the per-finding ROC and precision-recall figures and scores.csv; numpy,
scikit-learn and matplotlib only.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from cxrscale.errors import CxrError
from cxrscale.figures import save_figure, styled
from cxrscale.files import write_text_atomic
from distributed.evaluation.scores import threshold_stability
from distributed.model import metrics as m

MIN_CASES = 10   # positive and negative test images a finding needs before its figures are reported


def finding_summary(val_targets: np.ndarray, val_probs: np.ndarray, targets: np.ndarray, probs: np.ndarray,
                    findings: list[str], rule, *, split: str = "test", val_shifted: np.ndarray | None = None,
                    n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The per-finding table and the macro and micro AUC (see the module docstring). targets: (n, K) of 1, 0
    and -1 unknown; probs: (n, K); rule: a `scores.ThresholdRule`, applied to each finding's validation
    scores, or a list of them, one per finding (an adapted run: the site's fixed thresholds); val_shifted:
    (shifts, n_val, K) validation probabilities under the acquisition shifts, for the robust rule."""
    rules = _per_finding(rule, len(findings))
    rows, measured = [], []
    for k, name in enumerate(findings):
        seen, val_seen = targets[:, k] >= 0, val_targets[:, k] >= 0
        y, p = targets[seen, k].astype(int), probs[seen, k]
        positives, negatives = int(y.sum()), int(len(y) - y.sum())
        row: dict[str, Any] = {"finding": name, "n": int(len(y)), "positives": positives,
                               "unknown": int((~seen).sum()),
                               "prevalence": positives / len(y) if len(y) else None}
        try:
            row["threshold"] = rules[k].choose(val_targets[val_seen, k].astype(int), val_probs[val_seen, k],
                                               _column(val_shifted, val_seen, k))
            if len(set(map(str, rules))) > 1:  # an adapted run: the site's thresholds, the rest validation's
                row["threshold_rule"] = rules[k].describe()
        except CxrError as err:
            row["threshold"], row["threshold_undefined"] = None, str(err)
        if min(positives, negatives) < MIN_CASES:
            row["measured"] = False
            row["reason"] = (f"too few to measure: the {split} split has {positives} positive and {negatives} "
                             f"negative images of {name}, and at least {MIN_CASES} of each are needed")
            rows.append(row)
            continue
        fns = {"roc_auc": m.roc_auc, "average_precision": m.average_precision}
        if row["threshold"] is not None:
            t = row["threshold"]
            fns |= {"sensitivity": lambda a, b, t=t: m.sensitivity(a, b, t),
                    "specificity": lambda a, b, t=t: m.specificity(a, b, t)}
        row["measured"] = True
        row["intervals"] = m.bootstrap_intervals(fns, y, p, n_resamples=n_bootstrap, seed=seed)
        rows.append(row)
        measured.append(k)
    out: dict[str, Any] = {"findings": rows, "measured": [findings[k] for k in measured],
                           "min_cases": MIN_CASES,
                           "rule": " / ".join(dict.fromkeys(map(str, rules))),
                           "rule_description": "; ".join(dict.fromkeys(r.describe() for r in rules))}
    if measured:
        out["macro_roc_auc"] = _resampled(lambda t, q: m.macro_roc_auc(t, q), targets[:, measured],
                                          probs[:, measured], n_bootstrap, seed)
        out["micro_roc_auc"] = _resampled(m.micro_roc_auc, targets[:, measured], probs[:, measured], n_bootstrap,
                                          seed)
    return out


def _column(shifted: np.ndarray | None, rows: np.ndarray, k: int) -> np.ndarray | None:
    """Finding k's validation probabilities under each shift, on the images where its label is known."""
    return None if shifted is None else shifted[:, rows, k]


def _per_finding(rule, count: int) -> list:
    return list(rule) if isinstance(rule, (list, tuple)) else [rule] * count


def add_threshold_stability(summary: dict, val_targets: np.ndarray, val_probs: np.ndarray, targets: np.ndarray,
                            probs: np.ndarray, rule, *, val_shifted: np.ndarray | None = None,
                            n_bootstrap: int = 1000, seed: int = 0) -> None:
    """Each measured finding's `scores.threshold_stability` into its row of `summary` (finding_summary's): its
    rule chosen again on resamples of its known validation images, and its sensitivity and specificity on the
    split across those thresholds. A rare finding's validation positives are few, so its threshold moves the
    most. distributed.evaluate calls this, not finding_summary, which optimize.prune_quantize runs for every
    variant."""
    rules = _per_finding(rule, len(summary["findings"]))
    for k, row in enumerate(summary["findings"]):
        if not row["measured"] or row["threshold"] is None:
            continue
        seen, val_seen = targets[:, k] >= 0, val_targets[:, k] >= 0
        stability = threshold_stability(rules[k], val_targets[val_seen, k].astype(int), val_probs[val_seen, k],
                                        targets[seen, k].astype(int), probs[seen, k],
                                        shifted=_column(val_shifted, val_seen, k), n_resamples=n_bootstrap,
                                        seed=seed)
        if stability:
            row["stability"] = stability


def _resampled(fn, targets: np.ndarray, probs: np.ndarray, n: int, seed: int) -> dict[str, float | None]:
    """{"value", "low", "high"} of fn(targets, probs) with a percentile bootstrap over images (rows)."""
    value = fn(targets, probs)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        rows = rng.integers(0, len(targets), len(targets))
        try:
            draws.append(fn(targets[rows], probs[rows]))
        except m.MetricError:
            continue
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (None, None)
    return {"value": float(value), "low": None if low is None else float(low),
            "high": None if high is None else float(high)}


def write_finding_scores(path: Path, ids: list[str], targets: np.ndarray, probs: np.ndarray, findings: list[str],
                         thresholds: list[float | None]) -> None:
    """scores.csv: per image its id hash, and per finding its label (1, 0, or empty when unknown), probability
    and decision at the finding's threshold (empty when the finding has none)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", *[f"{kind}_{f}" for f in findings for kind in ("true", "p", "positive")]])
    for rid, y, p in zip(ids, targets, probs):
        cells = []
        for k, t in enumerate(thresholds):
            cells += ["" if y[k] < 0 else str(int(y[k])), f"{p[k]:.6f}", "" if t is None else str(int(p[k] >= t))]
        writer.writerow([rid, *cells])
    write_text_atomic(path, buf.getvalue())


@styled
def finding_curves(targets: np.ndarray, probs: np.ndarray, summary: dict, path, *, kind: str) -> Path:
    """One ROC (kind "roc") or precision-recall ("pr") curve per measured finding, on its known images."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, ax = plt.subplots(figsize=(6.4, 6.4))
    for i, row in enumerate(r for r in summary["findings"] if r["measured"]):
        k = [r["finding"] for r in summary["findings"]].index(row["finding"])
        seen = targets[:, k] >= 0
        y, p = targets[seen, k].astype(int), probs[seen, k]
        if kind == "roc":
            x, yy, _ = roc_curve(y, p)
            label = f"{row['finding']}, AUC {row['intervals']['roc_auc']['value']:.3f}"
        else:
            yy, x, _ = precision_recall_curve(y, p)
            label = f"{row['finding']}, AP {row['intervals']['average_precision']['value']:.3f} " \
                    f"(prevalence {row['prevalence']:.2f})"
        ax.plot(x, yy, color=f"C{i % 10}", lw=2, label=label)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC curve of each finding")
    else:
        ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall of each finding")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize="small")
    return save_figure(fig, path)


def _cell(interval: dict | None) -> str:
    if not interval or interval.get("value") is None:
        return "undefined"
    return f"{interval['value']:.3f} ({interval['low']:.3f}–{interval['high']:.3f})"


def finding_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-finding table the report and the model card show."""
    head = ["finding", "images (positive)", "prevalence", "ROC-AUC (95 % CI)", "average precision", "threshold",
            "sensitivity", "specificity"]
    rows = []
    for r in summary["findings"]:
        base = [r["finding"], f"{r['n']} ({r['positives']})",
                "" if r["prevalence"] is None else f"{r['prevalence']:.3f}"]
        if not r["measured"]:
            rows.append(base + ["too few to measure", "", "" if r["threshold"] is None else f"{r['threshold']:.3f}",
                                "", ""])
            continue
        iv = r["intervals"]
        stability = r.get("stability")
        threshold = "undefined" if r["threshold"] is None else f"{r['threshold']:.3f}" + (
            f" ({stability['low']:.3f}–{stability['high']:.3f})" if stability else "")
        rows.append(base + [_cell(iv["roc_auc"]), _cell(iv["average_precision"]), threshold,
                            _cell(iv.get("sensitivity")), _cell(iv.get("specificity"))])
    return head, rows


def summary_lines(summary: dict, split: str, n: int) -> list[str]:
    """Sentences before the table: the images, the macro and micro AUC, the thresholds' rule, and a line for
    each finding too rare in the split to measure."""
    rules = f"{summary['rule']}, which {summary['rule_description']}"
    if any("threshold_rule" in r for r in summary["findings"]):  # an adapted run: the site's, else validation's
        rules = "; ".join(f"{r['finding']} {r['threshold_rule']}" for r in summary["findings"])
    lines = [f"{n} images of the {split} split; each finding is measured on the images where its label is known. "
             f"Thresholds: one per finding, {rules}."]
    if summary.get("macro_roc_auc"):
        lines.append(f"**Macro ROC-AUC {_cell(summary['macro_roc_auc'])}** over the {len(summary['measured'])} "
                     f"measured findings; micro ROC-AUC {_cell(summary['micro_roc_auc'])} (every known "
                     "image-finding pair pooled, so the frequent findings weigh most).")
    stable = [r for r in summary["findings"] if r.get("stability")]
    if stable:
        spread = "; ".join(f"{r['finding']} " + ", ".join(
            f"{name} {at['low']:.3f}–{at['high']:.3f}" for name, at in r["stability"]["at_evaluated"].items()
            if name != "accuracy") for r in stable)
        lines.append(f"In brackets after each threshold: where it falls (95 %) when chosen again on "
                     f"{stable[0]['stability']['resamples']} bootstrap resamples of the validation split, how far "
                     f"the operating point rests on the images validation happened to draw. Across those "
                     f"thresholds the {split} split reads {spread}.")
    for r in summary["findings"]:
        if not r["measured"]:
            lines.append(f"**{r['finding']}: {r['reason']}.**")
    return lines


def report_blocks(results: dict) -> list[tuple]:
    """The multi-label evaluation's report, as `report.render_markdown` and `render_html` take it."""
    name = Path(results["run"]["dir"]).name if results.get("run") else Path(results["model"]["path"]).name
    summary = results["findings"]
    blocks: list[tuple] = [("h1", f"Evaluation of {name}: findings")]
    blocks += [("p", line) for line in summary_lines(summary, results["split"], results["n"])]
    head, rows = finding_table(summary)
    blocks.append(("table", head, rows))
    cal = results.get("calibration") or {}
    if cal.get("after"):
        text = (f"Calibration ({cal.get('method')}, a temperature per finding fitted on "
                f"{cal.get('fitted_on') or 'unknown'}): expected calibration error over every known image-finding "
                f"pair {cal['after']['ece']:.3f}")
        if cal.get("before"):
            text += f", {cal['before']['ece']:.3f} before it"
        blocks.append(("p", text + "."))
    guard = results.get("guard") or {}
    if guard.get("fitted"):
        blocks.append(("p", f"Out-of-distribution guard: it flags {guard.get(results['split'] + '_flagged', 0):.1%} "
                            f"of the {results['split']} images and {guard.get('val_flagged', 0):.1%} of validation."))
    blocks.append(("h2", "Figures"))
    for key, caption in (("roc", "ROC curve of each measured finding"),
                         ("pr", "Precision-recall curve of each measured finding")):
        if key in results.get("plots", {}):
            blocks.append(("img", results["plots"][key], caption))
    if results.get("gallery"):
        blocks.append(("h2", "Where the model looks, finding by finding"))
        blocks.append(("p", "Each finding's most confident true positive in the split, with the Grad-CAM of that "
                            "finding's output (Selvaraju et al. 2017): red is what raised its probability."))
        for pick in results["gallery"]:
            blocks.append(("img", pick["file"], f"{pick['finding']}: probability {pick['probability']:.3f}"))
    return blocks
