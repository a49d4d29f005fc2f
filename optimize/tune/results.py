"""What a finished search leaves: results.csv, the best config, the AUC-vs-parameter plot and
report.md, all from the trials' own run folders."""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

from distributed.training.config import TrainConfig
from cxrscale.files import read_numeric_csv, write_text_atomic

from cxrscale.figures import plt, save_figure, styled
from optimize.tune.space import METRIC, Param

log = logging.getLogger("cxrscale.tune")

# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------

def trial_status(result, run_dir: Path, epochs: int, max_epochs: int, search: str) -> str:
    if result.error is not None:
        return "error"
    if (run_dir / "train_summary.json").exists():
        return "completed" if epochs >= max_epochs else f"early stopping at epoch {epochs}"
    return f"stopped by ASHA at epoch {epochs}" if search == "asha" else f"incomplete ({epochs} epochs)"


def collect(results, space: dict[str, Param], trials_dir: Path, max_epochs: int, search: str) -> list[dict]:
    """One row per trial: its parameters, best validation AUC and where it happened, its status. Sorted by
    best validation AUC, best first (trials without one last)."""
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        run_dir = trials_dir / trial_id
        history = read_numeric_csv(run_dir / "history.csv")
        frame = result.metrics_dataframe
        reported = [] if frame is None or METRIC not in frame else [
            {"epoch": int(e), METRIC: float(a), "val_loss": float(v)}
            for e, a, v in zip(frame["epoch"], frame[METRIC], frame.get("val_loss", frame[METRIC]))]
        scored = [r for r in reported if not math.isnan(r[METRIC])]
        best = max(scored, key=lambda r: r[METRIC]) if scored else None
        row = {"trial": trial_id,
               **{name: result.config.get(name) for name, p in space.items() if p.searched},
               "best_val_auc": best[METRIC] if best else None, "best_epoch": best["epoch"] if best else None,
               "val_loss_at_best": best["val_loss"] if best else None, "epochs": len(reported),
               "status": trial_status(result, run_dir, len(reported), max_epochs, search),
               "seconds": round(sum(r.get("seconds", 0.0) for r in history), 1),
               "run_dir": str(run_dir)}
        if result.error is not None:
            row["error"] = str(result.error).strip().splitlines()[-1][:300]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["best_val_auc"] is None, -(r["best_val_auc"] or 0.0), r["trial"]))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def results_table(rows: list[dict], names: list[str]) -> str:
    """The Markdown table of all trials, best first."""
    head = ["rank", "trial", *names, "best val AUC", "at epoch", "val loss", "epochs", "status", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows, 1):
        cells = [str(i), row["trial"], *[_fmt(row.get(n)) for n in names], _fmt(row["best_val_auc"]),
                 _fmt(row["best_epoch"]), _fmt(row["val_loss_at_best"]), str(row["epochs"]), row["status"],
                 f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def best_config(base: dict[str, Any], best_row: dict, space: dict[str, Param]) -> dict[str, Any]:
    """The options of the best trial as `distributed.train --config` reads them (no output, no resume)."""
    config = {**base, **{name: best_row[name] for name, p in space.items() if p.searched}}
    config = {k: v for k, v in config.items() if k not in ("output", "resume")}
    TrainConfig(**config).validate()
    return config


def plot_auc_vs_params(rows: list[dict], space: dict[str, Param], path: Path) -> Path | None:
    """One panel per searched parameter: best validation AUC of each trial against its value (log axis
    for log-uniform parameters, one column per category for choices), ASHA-stopped trials hollow."""
    names = [n for n, p in space.items() if p.searched]
    scored = [r for r in rows if r["best_val_auc"] is not None]
    if not names or not scored:
        return None

    @styled
    def draw() -> Path:
        cols = min(3, len(names))
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            param = space[name]
            values = [r[name] for r in scored]
            aucs = [r["best_val_auc"] for r in scored]
            done = ["ASHA" not in r["status"] for r in scored]
            if param.kind in ("loguniform", "uniform", "randint"):
                xs = [float(v) for v in values]
                if param.kind == "loguniform":
                    ax.set_xscale("log")
            else:  # choices, in their declared order, one column each
                labels = list(dict.fromkeys([str(v) for v in param.args] + [str(v) for v in values]))
                xs = [labels.index(str(v)) for v in values]
                ax.set_xticks(range(len(labels)), labels)
                ax.set_xlim(-0.5, len(labels) - 0.5)
            for x, y, full in zip(xs, aucs, done):
                ax.scatter([x], [y], s=36, color="#1f77b4", facecolors="#1f77b4" if full else "none")
            ax.set_xlabel(name)
            ax.set_ylabel("best val AUC")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        stopped = any("ASHA" in r["status"] for r in scored)
        fig.suptitle("Best validation AUC of each trial against each hyper-parameter"
                     + (" (hollow: stopped early by ASHA)" if stopped else ""))
        return save_figure(fig, path)

    return draw()


def write_report(output: Path, rows: list[dict], space: dict[str, Param], settings: dict[str, Any],
                 plot: Path | None) -> None:
    names = [n for n, p in space.items() if p.searched]
    best = rows[0] if rows and rows[0]["best_val_auc"] is not None else None
    lines = [f"# Hyper-parameter search: {settings['model']} on {settings['data']}", "",
             f"- search: **{settings['search']}**, {len(rows)} trials, up to {settings['max_epochs']} epochs each, "
             f"{settings['workers']} Horovod worker(s) per trial, seed {settings['seed']}",
             f"- space: {settings['space_source']}"]
    lines += [f"  - `{p.name}`: {p.kind} {list(p.args)}" + (f", grid {list(p.grid)}" if p.grid else "")
              for p in space.values()]
    lines += ["- ranked by the best validation AUC a trial reached (the test split is never used here)", ""]
    if best:
        lines += [f"**Best: trial `{best['trial']}`, val AUC {best['best_val_auc']:.4f} at epoch "
                  f"{best['best_epoch']}.** Its run folder is `{best['run_dir']}`; retrain it, or train the full "
                  "schedule, with", "", "```",
                  f"python -m distributed.train --config {output / 'best_config.json'} --output runs/NAME", "```",
                  ""]
    lines += [results_table(rows, names), ""]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["## Failed trials", ""] + [f"- `{r['trial']}`: {r['error']}" for r in errors] + [""]
    if plot:
        lines += [f"![validation AUC against each hyper-parameter]({plot.name})", ""]
    write_text_atomic(output / "report.md", "\n".join(lines))
