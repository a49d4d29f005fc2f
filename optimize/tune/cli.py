"""The command line of `python -m optimize.tune` and the search itself (Ray Tune's Tuner, resumable)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from distributed.model.zoo import model_names
from distributed.training.config import load_config_file
from cxrscale import tracking
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, config_from
from cxrscale.console import setup_logging
from cxrscale.files import read_json, write_json_atomic
from cxrscale.ray_cluster import start_ray
from preprocessing import schema

from optimize.tune.results import (best_config, collect, plot_auc_vs_params, results_table, write_report,
                                   write_results_csv)
from optimize.tune.space import METRIC, Param, SEARCHES, check_space, load_points, load_space, param_space

log = logging.getLogger("cxrscale.tune")

# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
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
               "  python -m distributed.train --config runs/tune-kermany/best_config.json --output runs/best\n"
               "  python -m optimize.tune --data prepared/sample --search grid --max-epochs 2 --tracking-uri "
               "http://127.0.0.1:5000\n\n"
               "a space file (JSON or YAML) maps distributed.train options (field names) to a distribution\n"
               "and/or grid values, or to a constant:\n"
               '  {"lr": {"loguniform": [1e-4, 1e-2], "grid": [3e-4, 1e-3]}, "batch_size": {"choice": [16, 32]},\n'
               '   "dropout": {"uniform": [0.1, 0.5]}, "augment": {"grid": [false, true]}, "l2": 1e-4}')
    p.add_argument("--data", required=True, help="prepared dataset folder (from python -m preprocessing)")
    p.add_argument("--model", choices=model_names(), default="cnn", help="architecture (default cnn)")
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
    p.add_argument("--max-failures", type=int, default=2,
                   help="times a trial is retried when its training dies (a lost node, a killed process); it goes "
                        "on from its own last checkpoint (default 2)")
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
    tracking.add_arguments(p, "every trial (Ray Tune's MLflow integration, one run per trial)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results")
    return p


@dataclass(frozen=True)
class TuneConfig:
    """Every option of `python -m optimize.tune` (see `build_parser`), as `parse_config` builds it."""

    data: str
    model: str = "cnn"
    search: str = "random"
    trials: int | None = None
    space: str | None = None
    max_epochs: int = 10
    grace_period: int = 1
    reduction_factor: int = 2
    workers_per_trial: int = 1
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0
    points_to_evaluate: str | None = None
    max_concurrent: int = 0
    max_failures: int = 2
    weights: str | None = None
    config: str | None = None
    seed: int = 0
    address: str | None = None
    num_cpus: int | None = None
    output: str | None = None
    overwrite: bool = False
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    quiet: bool = False


def parse_config(argv: Sequence[str] | None = None) -> TuneConfig:
    return config_from(TuneConfig, build_parser().parse_args(argv))


def resolve_settings(config: TuneConfig) -> tuple[dict[str, Any], dict[str, Param]]:
    data = Path(config.data)
    manifest = schema.read_manifest(data)  # a missing or wrong-version dataset fails here, not in every trial
    checks = [(config.max_epochs >= 1, f"--max-epochs must be at least 1, got {config.max_epochs}"),
              (config.trials is None or config.trials >= 1, f"--trials must be at least 1, got {config.trials}"),
              (config.workers_per_trial >= 1,
               f"--workers-per-trial must be at least 1, got {config.workers_per_trial}"),
              (config.cpus_per_trial is None or config.cpus_per_trial > 0, "--cpus-per-trial must be positive"),
              (config.gpus_per_trial >= 0, "--gpus-per-trial must be >= 0"),
              (config.grace_period >= 1, "--grace-period must be at least 1"),
              (config.reduction_factor > 1, "--reduction-factor must be > 1"),
              (config.max_concurrent >= 0, "--max-concurrent must be >= 0"),
              (config.max_failures >= 0, f"--max-failures must be >= 0, got {config.max_failures}")]
    for ok, message in checks:
        if not ok:
            raise CxrError(message)
    fixed = load_config_file(config.config) if config.config else {}
    bad = sorted(set(fixed) & {"output", "resume", "model", "epochs"})
    if bad:
        raise CxrError(f"--config {config.config}: {', '.join(bad)} cannot be fixed here; use optimize.tune's flags")
    space, source = load_space(config.space, config.model)
    base = {**fixed, "data": str(data.resolve()), "model": config.model, "epochs": config.max_epochs,
            "seed": config.seed, **({"weights": config.weights} if config.weights else {})}
    fixed_in_space = {n: p.args[0] for n, p in space.items() if not p.searched}
    base.update(fixed_in_space)
    space = {n: p for n, p in space.items() if p.searched}
    check_space(space, config.search, base)
    batches = set(space["batch_size"].candidates()) if "batch_size" in space else {base.get("batch_size", 32)}
    if "batch_size" in space and space["batch_size"].kind == "randint":
        batches = {space["batch_size"].args[1] - 1}
    for batch in sorted(batches):
        problems = schema.worker_problems(data, manifest, config.workers_per_trial, batch,
                                          "use --workers-per-trial {n}")
        if problems:
            raise CxrError(f"batch_size {batch}: {problems[0]}")
    points = load_points(config.points_to_evaluate, space, config.search)
    cpus = config.cpus_per_trial or float(config.workers_per_trial)
    trials = config.trials or (1 if config.search == "grid" else max(8, len(points)))
    if len(points) > trials:
        raise CxrError(f"--points-to-evaluate gives {len(points)} configurations for --trials {trials}")
    output = Path(config.output) if config.output else Path("runs") / f"tune-{data.resolve().name}"
    settings = {"data": str(data.resolve()), "model": config.model, "search": config.search, "trials": trials,
                "max_epochs": config.max_epochs, "grace_period": config.grace_period,
                "reduction_factor": config.reduction_factor, "workers": config.workers_per_trial,
                "cpus_per_trial": cpus, "gpus_per_trial": config.gpus_per_trial, "seed": config.seed,
                "threads_per_worker": max(1, int(cpus // config.workers_per_trial)), "base": base,
                "max_concurrent": config.max_concurrent, "points_to_evaluate": points,
                "max_failures": config.max_failures,
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


def run_search(settings: dict[str, Any], space: dict[str, Param], resume: bool, quiet: bool,
               callbacks: list | None = None):
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
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=callbacks or None,
                failure_config=tune.FailureConfig(max_failures=settings.get("max_failures", 0))))
    return tuner.fit()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    setup_logging(logging.WARNING if config.quiet else logging.INFO)
    settings, space = resolve_settings(config)
    output = Path(settings["output"])
    resume = prepare_output(output, settings, config.overwrite)
    started = time.perf_counter()
    with start_ray(config.address, config.num_cpus, log_to_driver=False):
        import ray

        address = ray.get_runtime_context().gcs_address
        tracked = []
        if config.tracking_uri:
            from optimize.tune.tracking import callbacks as tracking_callbacks

            tracked = tracking_callbacks(config.tracking_uri, config.experiment, settings,
                                         Path(settings["data"]) / schema.MANIFEST)
        results = run_search(settings, space, resume, config.quiet, tracked)
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

