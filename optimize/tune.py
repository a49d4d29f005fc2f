"""python -m optimize.tune: hyper-parameter search with Ray Tune over `distributed.train`.

    python -m optimize.tune --data prepared/kermany --model cnn --search asha --trials 16 --max-epochs 10

Every trial is a real `python -m distributed.train` run (under `horovodrun -np W` when --workers-per-trial
W > 1) in its own run folder, `OUTPUT/trials/<trial id>/`: the same code, checkpoints and exported model as
any training run. The trial function follows the run's history.csv and reports each finished epoch to Tune
(val_auc, val_loss, ...) with a small Tune checkpoint that records the epoch; Tune's schedulers (ASHA) stop
weak trials on those reports. A re-run of the same command resumes an interrupted search with
`Tuner.restore`, and each unfinished trial continues from its own last training checkpoint.

Writes OUTPUT/results.csv and report.md (every trial, sorted by best validation AUC), best_config.json
(accepted by `distributed.train --config`), auc_vs_params.png, summary.json, and Tune's own state in
OUTPUT/tune/.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from distributed.training.config import MODELS, TrainConfig, load_config_file
from preprocessing import schema
from launch.runtime import (CxrError, read_json, read_numeric_csv, read_options_file, start_ray,
                            run_cli, setup_logging, write_json_atomic, write_text_atomic)

log = logging.getLogger("cxrscale.tune")

SEARCHES = ("grid", "random", "asha")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
METRIC = "val_auc"
# Set by the search itself, not searchable: the data, the model and the epoch budget are flags, the
# folder and resumption belong to the trial.
NOT_TUNABLE = ("data", "output", "model", "epochs", "resume")

# Per-model default spaces. Each parameter names the distribution random search and ASHA draw from, and
# the values grid search tries. lr is per worker (distributed.train scales it by the worker count).
# fine_tune_from is how much of a pretrained backbone trains: from the last block, the last two, or all
# of it (null).
_COMMON = {
    "dropout": {"uniform": [0.1, 0.6], "grid": [0.3]},
    "l2": {"loguniform": [1e-6, 1e-3], "grid": [1e-4]},
    "augment": {"choice": [False, True], "grid": [False, True]},
}
DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "cnn": {"lr": {"loguniform": [1e-4, 3e-3], "grid": [3e-4, 1e-3]},
            "batch_size": {"choice": [16, 32, 64], "grid": [32]}, **_COMMON},
    "vgg16": {"lr": {"loguniform": [1e-5, 1e-3], "grid": [3e-5, 1e-4]},
              "batch_size": {"choice": [16, 32], "grid": [32]}, **_COMMON,
              "fine_tune_from": {"choice": ["block5_conv1", "block4_conv1", None], "grid": ["block5_conv1"]}},
    "resnet50": {"lr": {"loguniform": [1e-5, 1e-3], "grid": [3e-5, 1e-4]},
                 "batch_size": {"choice": [16, 32], "grid": [32]}, **_COMMON,
                 "fine_tune_from": {"choice": ["conv5_block1_1_conv", "conv4_block1_1_conv", None],
                                    "grid": ["conv5_block1_1_conv"]}},
}


# ---------------------------------------------------------------------------------------------------------
# The search space: declared as plain data, turned into Tune domains
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One searchable option. kind is a distribution name or 'constant'; args its bounds, its choices, or
    (value,) for a constant; grid the values grid search tries (None: it has none)."""

    name: str
    kind: str
    args: tuple
    grid: tuple | None = None

    def candidates(self) -> list[Any]:
        """Values worth validating before any trial starts: bounds, choices, grid points."""
        return list(self.args) + list(self.grid or ())

    def domain(self, search: str):
        """The Tune value for `search`: a grid_search, a sampling domain, or the constant itself."""
        from ray import tune

        if self.kind == "constant":
            return self.args[0]
        if search == "grid":
            return tune.grid_search(list(self.grid))
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        return tune.choice(list(self.args))

    @property
    def searched(self) -> bool:
        return self.kind != "constant"


_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(name: str, value: Any, where: str) -> None:
    """Values must have the type the TrainConfig field has (e.g. batch_size an integer)."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    allowed: tuple = ()
    for part in str(field.type).split("|"):
        part = part.strip()
        allowed += (type(None),) if part == "None" else _FIELD_TYPES.get(part, (object,))
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, allowed):
        raise CxrError(f"{where}: {name} = {value!r} must be {field.type}")


def parse_space(data: dict[str, Any], where: str) -> dict[str, Param]:
    """Validate a declared space: {name: {"loguniform": [lo, hi], "grid": [...]}} or {name: value}.

    Names are TrainConfig fields (the options of distributed.train, with underscores). Distributions:
    loguniform [lo, hi] (0 < lo < hi), uniform [lo, hi], randint [lo, hi) (integers), choice [values].
    `grid` alone is allowed (random search then picks among its values). Anything else is a constant.
    """
    if not isinstance(data, dict) or not data:
        raise CxrError(f"{where} must be a non-empty mapping of option names to distributions or values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    params: dict[str, Param] = {}
    for name, spec in data.items():
        here = f"{where}: {name}"
        if name in NOT_TUNABLE:
            raise CxrError(f"{here} cannot be searched: data, model and epochs are flags of optimize.tune "
                           "(--data, --model, --max-epochs), output and resume belong to each trial")
        if name not in known:
            raise CxrError(f"{here} is not an option of distributed.train (use field names such as lr, "
                           "batch_size, dropout, l2, augment, fine_tune_from)")
        if not isinstance(spec, dict):
            params[name] = Param(name, "constant", (spec,))
            _check_type(name, spec, where)
            continue
        unknown = sorted(set(spec) - set(DISTRIBUTIONS) - {"grid"})
        kinds = [k for k in DISTRIBUTIONS if k in spec]
        if unknown or len(kinds) > 1 or not (kinds or "grid" in spec):
            raise CxrError(f"{here} must have one of {', '.join(DISTRIBUTIONS)} and/or grid, got "
                           f"{', '.join(sorted(spec)) or 'nothing'}")
        grid = spec.get("grid")
        if grid is not None and (not isinstance(grid, list) or not grid):
            raise CxrError(f"{here}: grid must be a non-empty list of values")
        kind = kinds[0] if kinds else "choice"
        args = spec[kind] if kinds else grid
        if not isinstance(args, list) or not args:
            raise CxrError(f"{here}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("loguniform", "uniform", "randint"):
            numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            if len(args) != 2 or not numeric or not args[0] < args[1]:
                raise CxrError(f"{here}: {kind} needs [low, high] with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise CxrError(f"{here}: loguniform bounds must be positive, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise CxrError(f"{here}: randint bounds must be integers, got {args!r}")
        param = Param(name, kind, tuple(args), tuple(grid) if grid is not None else None)
        for value in param.candidates():
            _check_type(name, value, where)
        params[name] = param
    return params


def load_space(path: str | None, model: str) -> tuple[dict[str, Param], str]:
    """The declared space from --space FILE (JSON or YAML), else the model's default."""
    if not path:
        return parse_space(DEFAULT_SPACES[model], f"the default {model} space"), f"default ({model})"
    data = read_options_file(path, "--space")
    return parse_space(data, f"--space {path}"), str(path)


def check_space(space: dict[str, Param], search: str, base: dict[str, Any]) -> None:
    """Refuse, before Ray starts, a space no trial could train with: grid search over a parameter that has
    no grid values, or a value distributed.train's own checks reject."""
    if search == "grid":
        missing = [p.name for p in space.values() if p.searched and p.grid is None]
        if missing:
            raise CxrError(f"--search grid: {', '.join(missing)} declare(s) a distribution but no grid values; "
                           "add \"grid\": [...] to the space, or use --search random or asha")
    for param in space.values():
        for value in param.candidates():
            values = {**base, **{p.name: p.candidates()[0] for p in space.values()}, param.name: value}
            try:
                TrainConfig(**values).validate()
            except CxrError as err:
                raise CxrError(f"search space: {param.name} = {value!r} is not a valid training option "
                               f"({err})") from None


def load_points(path: str | None, space: dict[str, Param], search: str) -> list[dict[str, Any]]:
    """--points-to-evaluate: configurations Tune tries before drawing (keys among the searched options)."""
    if not path:
        return []
    if search == "grid":
        raise CxrError("--points-to-evaluate is for --search random or asha; grid search tries the grid")
    points = read_options_file(path, "--points-to-evaluate")
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise CxrError(f"--points-to-evaluate {path} must be a list of non-empty mappings")
    for point in points:
        for name, value in point.items():
            if name not in space:
                raise CxrError(f"--points-to-evaluate {path}: {name} is not a searched option "
                               f"(searched: {', '.join(space)})")
            _check_type(name, value, f"--points-to-evaluate {path}")
    return points


def param_space(space: dict[str, Param], search: str) -> dict[str, Any]:
    return {name: param.domain(search) for name, param in space.items()}


# ---------------------------------------------------------------------------------------------------------
# One trial: a distributed.train run followed epoch by epoch
# ---------------------------------------------------------------------------------------------------------

def trial_command(config_file: Path, workers: int) -> list[str]:
    """The training command of a trial: the toolkit's own entry point, under horovodrun on this node for
    W > 1 (built by launch.local, as a user would start it)."""
    from launch.common import EntryPoint
    from launch.local import horovodrun_command, horovodrun_path

    train = EntryPoint("distributed.train", ("--config", str(config_file)))
    if workers <= 1:
        return train.argv(sys.executable)
    runner = horovodrun_path(sys.executable)
    if runner is None:
        raise RuntimeError("horovodrun was not found next to the Python interpreter or on PATH")
    return horovodrun_command(workers, [("localhost", workers)], train, runner=runner, python=sys.executable)


def die_with_parent():
    """A preexec_fn for a child that must get SIGTERM when the thread that started it dies: Ray kills a
    trial's actor when a scheduler stops the trial, and its training run must not outlive it. prctl is
    looked up here, in the parent: between fork and exec the child must not load libraries. None where
    there is no prctl (not Linux); run_trial's finally clause still stops the child there."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_trial(params: dict[str, Any], settings: dict[str, Any]) -> None:
    """Tune's function trainable. Trains `params` over `settings["base"]` with distributed.train in
    `settings["trials_dir"]/<trial id>/` and reports every finished epoch's history row to Tune."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(settings["trials_dir"]) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    reported = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            reported = int(json.loads((Path(folder) / "progress.json").read_text())["epoch"])

    finished = (run_dir / "train_summary.json").exists()
    proc = None
    if not finished:
        resume = (run_dir / "checkpoints" / "latest.json").exists()
        config = {**settings["base"], **params, "output": str(run_dir), "resume": resume}
        config_file = run_dir / "trial_config.json"
        write_json_atomic(config_file, config)
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=str(settings["threads_per_worker"]))
        with open(run_dir / "train.log", "ab") as out:
            proc = subprocess.Popen(trial_command(config_file, settings["workers"]), stdout=out,
                                    stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
    try:
        while True:
            code = None if proc is None else proc.poll()
            for row in read_numeric_csv(run_dir / "history.csv"):
                epoch = int(row["epoch"])
                if epoch <= reported or (epoch >= settings["max_epochs"] and code is None and proc is not None):
                    # The last epoch is reported once the run has exported its model: ASHA stops a trial
                    # as soon as it reports max_t epochs, and that must not cut the export short.
                    continue
                with tempfile.TemporaryDirectory() as folder:
                    write_json_atomic(Path(folder) / "progress.json", {"epoch": epoch})
                    metrics = {k: v for k, v in row.items() if k != "epoch"}
                    tune.report({**metrics, "epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(folder))
                reported = epoch
            if proc is None or code is not None:
                break
            time.sleep(1.0)
    finally:
        if proc is not None:
            _stop(proc)
    if proc is not None and proc.returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"distributed.train exited with status {proc.returncode} in {run_dir}:\n"
                           + "\n".join(tail))


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
    from distributed.evaluation.plots import plt, save_figure, styled

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


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m optimize.tune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyper-parameter search with Ray Tune: grid, random, or random with ASHA early stopping. "
                    "Each trial is a distributed.train run (Horovod data-parallel with --workers-per-trial > 1). "
                    "Re-run the same command to resume an interrupted search.",
        epilog="examples:\n"
               "  python -m optimize.tune --data prepared/sample --model cnn --search grid --max-epochs 3\n"
               "  python -m optimize.tune --data prepared/kermany --model cnn --search asha --trials 16 "
               "--max-epochs 10\n"
               "  python -m optimize.tune --data prepared/kermany --model resnet50 --weights imagenet --search random "
               "--trials 8 --space space.yaml --workers-per-trial 4 --gpus-per-trial 4 --address auto\n"
               "  python -m distributed.train --config runs/tune-kermany/best_config.json --output runs/best\n\n"
               "a space file (JSON or YAML) maps distributed.train options (field names) to a distribution\n"
               "and/or grid values, or to a constant:\n"
               '  {"lr": {"loguniform": [1e-4, 1e-2], "grid": [3e-4, 1e-3]}, "batch_size": {"choice": [16, 32]},\n'
               '   "dropout": {"uniform": [0.1, 0.5]}, "augment": {"grid": [false, true]}, "l2": 1e-4}')
    p.add_argument("--data", required=True, help="prepared dataset folder (from python -m preprocessing)")
    p.add_argument("--model", choices=MODELS, default="cnn", help="architecture (default cnn)")
    p.add_argument("--search", choices=SEARCHES, default="random",
                   help="grid: every combination of the grid values; random: --trials draws from the "
                        "distributions; asha: random draws, weak trials stopped early (default random)")
    p.add_argument("--trials", type=int, default=None,
                   help="random/asha: number of trials (default 8); grid: repeats of the whole grid (default 1)")
    p.add_argument("--space", help="JSON/YAML search space (default: the model's built-in space, see "
                                   "report.md)")
    p.add_argument("--max-epochs", type=int, default=10, help="epochs per trial, ASHA's budget (default 10)")
    p.add_argument("--grace-period", type=int, default=1, help="asha: epochs before a trial can be stopped "
                                                               "(default 1)")
    p.add_argument("--reduction-factor", type=float, default=2,
                   help="asha: keep the best 1/factor of trials at each rung (default 2)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="Horovod workers per trial, on the trial's node (default 1)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs Ray reserves per trial "
                                                                      "(default: one per worker)")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs Ray reserves per trial (default 0)")
    p.add_argument("--points-to-evaluate", metavar="FILE",
                   help="random/asha: JSON/YAML list of configurations (mappings of searched options) to try "
                        "first, e.g. the thesis's settings; the remaining trials are drawn")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials running at once (default 0: as many as the reserved resources allow)")
    p.add_argument("--weights", default=None, help="as distributed.train --weights (e.g. none, imagenet, a file)")
    p.add_argument("--config", help="JSON/YAML of fixed distributed.train options every trial uses")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and of every trial (default 0)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (e.g. auto); default: a private Ray on this machine, listening "
                        "on 127.0.0.1 only")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private Ray (default: all)")
    p.add_argument("--output", default=None, help="search folder (default runs/tune-<data folder name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over when OUTPUT holds a search with other settings")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results")
    return p


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Param]]:
    data = Path(args.data)
    manifest = schema.read_manifest(data)  # a missing or wrong-version dataset fails here, not in every trial
    checks = [(args.max_epochs >= 1, f"--max-epochs must be at least 1, got {args.max_epochs}"),
              (args.trials is None or args.trials >= 1, f"--trials must be at least 1, got {args.trials}"),
              (args.workers_per_trial >= 1, f"--workers-per-trial must be at least 1, got {args.workers_per_trial}"),
              (args.cpus_per_trial is None or args.cpus_per_trial > 0, "--cpus-per-trial must be positive"),
              (args.gpus_per_trial >= 0, "--gpus-per-trial must be >= 0"),
              (args.grace_period >= 1, "--grace-period must be at least 1"),
              (args.reduction_factor > 1, "--reduction-factor must be > 1"),
              (args.max_concurrent >= 0, "--max-concurrent must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise CxrError(message)
    fixed = load_config_file(args.config) if args.config else {}
    bad = sorted(set(fixed) & {"output", "resume", "model", "epochs"})
    if bad:
        raise CxrError(f"--config {args.config}: {', '.join(bad)} cannot be fixed here; use optimize.tune's flags")
    space, source = load_space(args.space, args.model)
    base = {**fixed, "data": str(data.resolve()), "model": args.model, "epochs": args.max_epochs,
            "seed": args.seed, **({"weights": args.weights} if args.weights else {})}
    fixed_in_space = {n: p.args[0] for n, p in space.items() if not p.searched}
    base.update(fixed_in_space)
    space = {n: p for n, p in space.items() if p.searched}
    check_space(space, args.search, base)
    batches = set(space["batch_size"].candidates()) if "batch_size" in space else {base.get("batch_size", 32)}
    if "batch_size" in space and space["batch_size"].kind == "randint":
        batches = {space["batch_size"].args[1] - 1}
    for batch in sorted(batches):
        problems = schema.worker_problems(data, manifest, args.workers_per_trial, batch,
                                          "use --workers-per-trial {n}")
        if problems:
            raise CxrError(f"batch_size {batch}: {problems[0]}")
    points = load_points(args.points_to_evaluate, space, args.search)
    cpus = args.cpus_per_trial or float(args.workers_per_trial)
    trials = args.trials or (1 if args.search == "grid" else max(8, len(points)))
    if len(points) > trials:
        raise CxrError(f"--points-to-evaluate gives {len(points)} configurations for --trials {trials}")
    output = Path(args.output) if args.output else Path("runs") / f"tune-{data.resolve().name}"
    settings = {"data": str(data.resolve()), "model": args.model, "search": args.search, "trials": trials,
                "max_epochs": args.max_epochs, "grace_period": args.grace_period,
                "reduction_factor": args.reduction_factor, "workers": args.workers_per_trial,
                "cpus_per_trial": cpus, "gpus_per_trial": args.gpus_per_trial, "seed": args.seed,
                "threads_per_worker": max(1, int(cpus // args.workers_per_trial)), "base": base,
                "max_concurrent": args.max_concurrent, "points_to_evaluate": points,
                "space": {n: dataclasses.asdict(p) for n, p in space.items()}, "space_source": source,
                "output": str(output.resolve()), "trials_dir": str((output / "trials").resolve())}
    return settings, space


SETTINGS_FILE = "search.json"
# Settings that may change between a search and its resumption without changing what it searches.
_RESUMABLE = ("space_source", "output", "trials_dir")


def prepare_output(output: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Create or check OUTPUT. Returns True when it holds a search to resume (same settings)."""
    saved_file = output / SETTINGS_FILE
    if saved_file.exists():
        saved = read_json(saved_file, "the saved search settings")
        changed = sorted(k for k in set(saved) | set(settings) if k not in _RESUMABLE
                         and json.dumps(saved.get(k), sort_keys=True, default=str)
                         != json.dumps(settings.get(k), sort_keys=True, default=str))
        if changed and not overwrite:
            raise CxrError(f"{output} holds a search with other settings ({', '.join(changed)}); re-run with the "
                           "same options to resume it, choose another --output, or pass --overwrite to start over")
        if changed:
            shutil.rmtree(output)
    elif output.exists() and any(output.iterdir()) and not overwrite:
        raise CxrError(f"{output} exists and is not a search folder; choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    resumable = (output / "tune").is_dir()
    write_json_atomic(saved_file, settings)
    return resumable


def run_search(settings: dict[str, Any], space: dict[str, Param], resume: bool, quiet: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from optimize.tune import run_trial as trial_fn  # by reference, also when this module is __main__

    trainable = tune.with_resources(tune.with_parameters(trial_fn, settings=settings),
                                    {"cpu": settings["cpus_per_trial"], "gpu": settings["gpus_per_trial"]})
    tune_dir = Path(settings["output"]) / "tune"
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        log.info("resuming the search in %s", tune_dir)
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = FIFOScheduler()
        if settings["search"] == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=settings["max_epochs"],
                                      grace_period=settings["grace_period"],
                                      reduction_factor=settings["reduction_factor"])
        tuner = tune.Tuner(
            trainable, param_space=param_space(space, settings["search"]),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=settings["trials"], scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=settings["seed"],
                                                 max_concurrent=settings["max_concurrent"],
                                                 points_to_evaluate=settings["points_to_evaluate"] or None),
                trial_dirname_creator=lambda trial: trial.trial_id, reuse_actors=False),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(Path(settings["output"])), verbose=0 if quiet else 1,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    settings, space = resolve_settings(args)
    output = Path(settings["output"])
    resume = prepare_output(output, settings, args.overwrite)
    started = time.perf_counter()
    with start_ray(args.address, args.num_cpus, log_to_driver=False):
        import ray

        address = ray.get_runtime_context().gcs_address
        results = run_search(settings, space, resume, args.quiet)
    rows = collect(results, space, Path(settings["trials_dir"]), settings["max_epochs"], settings["search"])
    write_results_csv(output / "results.csv", rows)
    plot = plot_auc_vs_params(rows, space, output / "auc_vs_params.png")
    write_report(output, rows, space, settings, plot)
    best = rows[0] if rows and rows[0]["best_val_auc"] is not None else None
    if best:
        write_json_atomic(output / "best_config.json", best_config(settings["base"], best, space))
    write_json_atomic(output / "summary.json", {
        "search": settings["search"], "trials": len(rows), "best_trial": best["trial"] if best else None,
        "best_val_auc": best["best_val_auc"] if best else None, "best_run_dir": best["run_dir"] if best else None,
        "errors": sum(1 for r in rows if r["status"] == "error"), "ray_address": address,
        "seconds": round(time.perf_counter() - started, 1)})
    print(results_table(rows, list(space)))
    print(f"\nreport: {output / 'report.md'}" + (f"\nbest config: {output / 'best_config.json'}" if best else ""))
    if not best:
        raise CxrError("no trial produced a validation AUC: see the trials' train.log files under "
                       f"{settings['trials_dir']}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    run_cli(main)
