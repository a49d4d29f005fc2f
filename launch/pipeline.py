"""python -m launch.pipeline: a radiograph folder to a calibrated, evaluated model with one command.

    python -m launch.pipeline --recipe kermany-cpu --input ~/chest_xray --output runs/kermany --np 2
    python -m distributed.predict --run runs/kermany/final new_scans/

A recipe (a YAML file shipped in launch/recipes/, or a path) names every option of every stage. The stages
run the toolkit's own entry points, in order, each skipped when its output is complete and resumed when it
is partial, so re-running the same command after a crash or a lost node continues where it stopped:

  1. prepare    python -m preprocessing  -> OUT/prepared   (with OUT/salt, so benchmarks.robustness can
                                                             map the test split back to its files)
  2. train      horovodrun -np N python -m distributed.train (or, with backend tf, launch.local --backend tf),
                once per ensemble member -> OUT/members/NAME
  3. combine    python -m distributed.ensemble (two or more members; one member is copied) -> OUT/final,
                calibrated on the validation split
  4. evaluate   python -m distributed.evaluate --run OUT/final   -> OUT/final/eval (the operating threshold
                is chosen on validation; distributed.predict --run OUT/final uses it), OUT/final/model_card.md
                (rewritten at the end of every invocation, with the recipe and command)

Nothing in a recipe looks at the test split before the final evaluation: members, epochs (early stopping),
calibration and the threshold are all chosen on validation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from distributed.evaluation.model_card import write_model_card
from cxrscale import tracking
from launch.common import EntryPoint
from launch.local import horovodrun_command
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import atomic_dir, read_json, read_options_file, write_bytes_atomic, write_json_atomic

log = logging.getLogger("cxrscale.pipeline")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
STAGES = ("prepare", "train", "combine", "evaluate")
FINAL = "final"


@dataclass(frozen=True)
class Recipe:
    """A recipe file: options per stage, as the stages' own flags spell them (without the dashes; - or _)."""

    name: str
    description: str
    prepare: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    ensemble: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

    def member_names(self) -> list[str]:
        names = [str(m.get("name") or f"member{i}") for i, m in enumerate(self.members)]
        if len(set(names)) != len(names):
            raise CxrError(f"recipe {self.name}: member names must differ, got {names}")
        return names


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a YAML/JSON file; every key is checked."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise CxrError(f"--recipe {name_or_path}: no such recipe; shipped recipes: {', '.join(recipe_names())} "
                           "(or give a YAML file)")
    data = read_options_file(str(path), "--recipe")
    if not isinstance(data, dict):
        raise CxrError(f"--recipe {path} must hold a mapping of stages to options")
    known = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CxrError(f"--recipe {path}: unknown keys {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    for key in ("prepare", "train", "ensemble", "evaluate"):
        if not isinstance(data.get(key, {}), dict):
            raise CxrError(f"--recipe {path}: {key} must be a mapping of options")
    members = data.get("members", [{}])
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise CxrError(f"--recipe {path}: members must be a non-empty list of option mappings")
    recipe = Recipe(name=path.stem, description=str(data.get("description", "")),
                    prepare=dict(data.get("prepare", {})), train=dict(data.get("train", {})), members=members,
                    ensemble=dict(data.get("ensemble", {})), evaluate=dict(data.get("evaluate", {})))
    recipe.member_names()
    return recipe


def with_overrides(recipe: Recipe, settings: Sequence[str]) -> Recipe:
    """The recipe with `--set STAGE.OPTION=VALUE` overrides (VALUE read as YAML: 3, 0.5, true, text), for
    prepare, train (every member), ensemble and evaluate."""
    import yaml

    stages = {"prepare": dict(recipe.prepare), "train": dict(recipe.train), "ensemble": dict(recipe.ensemble),
              "evaluate": dict(recipe.evaluate)}
    for setting in settings:
        key, sep, value = setting.partition("=")
        stage, dot, option = key.partition(".")
        if not sep or not dot or stage not in stages or not option:
            raise CxrError(f"--set {setting!r}: expected STAGE.OPTION=VALUE with STAGE one of {', '.join(stages)}")
        stages[stage][option.replace("-", "_")] = yaml.safe_load(value)
    return dataclasses.replace(recipe, **stages)


def flags(options: dict[str, Any], skip: Sequence[str] = ()) -> list[str]:
    """{"batch_size": 32, "augment": True, "given_overlap": "exclude"} -> --batch-size 32 --augment
    --given-overlap exclude (False and None leave a flag out)."""
    out: list[str] = []
    for key, value in options.items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + str(key).replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


@dataclass(frozen=True)
class Plan:
    """Every command the pipeline runs, resolved from the recipe and the command line."""

    output: Path
    prepare: list[str]
    members: dict[str, list[str]]   # member name -> its distributed.train command (horovodrun ... when np > 1)
    combine: list[str] | None        # None: one member, copied to final/
    evaluate: list[str]


def plan(recipe: Recipe, input_path: Path, output: Path, np_: int, weights: str | None,
         python: str = sys.executable, tracking_uri: str | None = None,
         experiment: str = tracking.DEFAULT_EXPERIMENT) -> Plan:
    """Every stage's command; with `tracking_uri`, training and evaluation log to MLflow (each member is an
    MLflow run; the evaluation goes into the final run's, a single member's own)."""
    tracked = ["--tracking-uri", tracking_uri, "--experiment", experiment] if tracking_uri else []
    prepared, salt = output / "prepared", output / "salt"
    prepare_cmd = [python, "-m", "preprocessing", "--input", str(input_path), "--output", str(prepared),
                   "--salt-file", str(salt), *flags(recipe.prepare, skip=("input", "output", "salt_file"))]
    members = {}
    for name, member in zip(recipe.member_names(), recipe.members):
        options = {**recipe.train, **{k: v for k, v in member.items() if k != "name"}}
        if weights is not None:
            options["weights"] = weights
        args = ["--data", str(prepared), "--output", str(output / "members" / name),
                *flags(options, skip=("data", "output", "resume", "tracking_uri", "experiment")), *tracked]
        entry = EntryPoint("distributed.train", tuple(args))
        if np_ == 1:
            members[name] = entry.argv(python)
        elif options.get("backend") == "tf":  # tf.distribute workers, each with its TF_CONFIG
            members[name] = [python, "-m", "launch.local", "--backend", "tf", "--np", str(np_), "--",
                             "distributed.train", *args]
        else:
            members[name] = horovodrun_command(np_, [("localhost", np_)], entry, python=python, gloo=True)
    combine = None
    if len(members) > 1:
        combine = [python, "-m", "distributed.ensemble", "--runs",
                   *[str(output / "members" / n) for n in members], "--output", str(output / FINAL),
                   *flags(recipe.ensemble, skip=("runs", "output"))]
    evaluate = [python, "-m", "distributed.evaluate", "--run", str(output / FINAL),
                *flags(recipe.evaluate, skip=("run", "model", "output", "tracking_uri", "experiment")), *tracked]
    return Plan(output, prepare_cmd, members, combine, evaluate)


def _run(cmd: list[str], stage: str, log_file: Path) -> None:
    """Run one stage command; its output goes to OUT/logs/STAGE.log; a failure names the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("[%s] %s", stage, " ".join(cmd))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), PYTHONUNBUFFERED="1")
    with open(log_file, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log_file.read_text().strip().splitlines()[-1:]
        raise CxrError(f"stage {stage} failed (status {code}): {tail[0] if tail else ''} (whole output in "
                       f"{log_file}); fix it and run the same command again to resume")


def _copy_run(src: Path, dst: Path) -> None:
    """One member as the final run: its files (not its checkpoints), atomically."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints", "logs", "eval", "optimized"),
                        dirs_exist_ok=True)
        config = read_json(tmp / "config.json", "member run config")
        config["config"]["output"] = str(dst)
        write_json_atomic(tmp / "config.json", config)


def run_pipeline(recipe: Recipe, p: Plan, *, command: Sequence[str], settings: dict[str, Any]) -> dict[str, Any]:
    """Run the plan's stages in order, skipping finished ones; `settings` (the resolved recipe, --np,
    --weights, --input) must match those of an unfinished pipeline in the same folder."""
    out = p.output
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "pipeline.json"
    record = read_json(record_path, "pipeline record") if record_path.is_file() else {}
    if record and record.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(record.get("settings", {}))
                         if settings.get(k) != record.get("settings", {}).get(k))
        raise CxrError(f"--output {out} holds a pipeline run with other settings ({', '.join(changed)}); run the "
                       "same command to resume it, or choose another --output")
    record.update({"recipe": recipe.name, "description": recipe.description, "command": list(command),
                   "settings": settings, "stages": record.get("stages", {})})
    salt = out / "salt"
    if not salt.exists():
        write_bytes_atomic(salt, os.urandom(32))

    def stage(name: str, done: bool, commands: list[list[str]], after=None) -> None:
        entry = record["stages"].setdefault(name, {})
        if done:
            log.info("[%s] already done", name)
            return
        started = time.perf_counter()
        for cmd in commands:
            _run(cmd, name, out / "logs" / f"{name}.log")
        if after:
            after()
        entry.update(seconds=round(entry.get("seconds", 0) + time.perf_counter() - started, 1), commands=commands)
        write_json_atomic(record_path, record)

    clock = time.perf_counter()
    stage("prepare", (out / "prepared" / "manifest.json").is_file() and not (out / "prepared" / ".cxrscale-staging").exists(),
          [p.prepare])
    for name, cmd in p.members.items():
        run_dir = out / "members" / name
        resume = ["--resume"] if (run_dir / "checkpoints" / "latest.json").is_file() else []
        stage(f"train:{name}", (run_dir / "train_summary.json").is_file(), [cmd + resume])
    final = out / FINAL
    if p.combine:
        stage("combine", (final / "model" / "saved_model.pb").is_file(), [p.combine])
    else:
        [only] = list(p.members)
        stage("combine", (final / "model" / "saved_model.pb").is_file(), [],
              after=lambda: _copy_run(out / "members" / only, final))
    stage("evaluate", (final / "eval" / "metrics.json").is_file(), [p.evaluate])
    record["seconds_this_invocation"] = round(time.perf_counter() - clock, 1)
    metrics = read_json(final / "eval" / "metrics.json", "final evaluation")
    at = metrics.get("at_threshold") or {}
    record["final"] = {"run": str(final), "threshold": metrics["threshold"]["value"],
                       "test": {k: at.get(k) for k in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece")},
                       "calibration": metrics.get("calibration")}
    if metrics.get("findings"):  # a multi-label model: each finding's test ROC-AUC, and the macro one
        summary = metrics["findings"]
        record["final"]["test"] = {"macro_roc_auc": (summary.get("macro_roc_auc") or {}).get("value"),
                                   **{f"{row['finding']} roc_auc": row["intervals"]["roc_auc"]["value"]
                                      for row in summary["findings"] if row.get("measured")}}
    # every invocation: the card then matches the last evaluation and says how the pipeline made the model
    record["final"]["model_card"] = str(write_model_card(final / "eval" / "metrics.json", pipeline=record))
    write_json_atomic(record_path, record)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m launch.pipeline", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] + f"\nshipped recipes: {', '.join(recipe_names())}\n\nexamples:\n"
               "  python -m launch.pipeline --recipe sample --input data/sample --output runs/demo --np 2\n"
               "  python -m launch.pipeline --recipe kermany-cpu --input ~/chest_xray --output runs/kermany --np 2\n"
               "  python -m launch.pipeline --recipe kermany-gpu --input /shared/chest_xray --output /shared/runs/k "
               "--np 8 --tracking-uri http://mlflow.example.org:5000")
    parser.add_argument("--recipe", required=True, help=f"a shipped recipe ({', '.join(recipe_names())}) or a YAML file")
    parser.add_argument("--input", required=True, help="radiographs: Kermany layout, class folders or a CSV")
    parser.add_argument("--output", required=True, help="the pipeline's folder (prepared/, members/, final/)")
    parser.add_argument("--np", type=int, default=1, help="workers for each training (default 1)")
    parser.add_argument("--backend", choices=("horovod", "tf"),
                        help="how the workers train together: horovod (horovodrun) or tf (tf.distribute, started by "
                             "launch.local --backend tf); default: the recipe's train.backend, else horovod")
    parser.add_argument("--weights", help="override every member's --weights (e.g. none where ImageNet weights "
                                          "cannot be downloaded)")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.OPTION=VALUE",
                        help="override a recipe option, e.g. --set train.epochs=3 (repeatable)")
    tracking.add_arguments(parser, "every training and the final evaluation")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    if args.np < 1:
        raise CxrError(f"--np must be at least 1, got {args.np}")
    if not Path(args.input).exists():
        raise CxrError(f"--input {args.input} does not exist")
    recipe = with_overrides(load_recipe(args.recipe), args.set + ([f"train.backend={args.backend}"]
                                                                    if args.backend else []))
    p = plan(recipe, Path(args.input), Path(args.output), args.np, args.weights, tracking_uri=args.tracking_uri,
             experiment=args.experiment)
    if args.dry_run:
        for cmd in [p.prepare, *p.members.values(), *([p.combine] if p.combine else []), p.evaluate]:
            print(" ".join(cmd))
        return 0
    settings = {"recipe": dataclasses.asdict(recipe), "np": args.np, "weights": args.weights,
                "input": str(Path(args.input).resolve())}
    record = run_pipeline(recipe, p, command=[sys.executable, "-m", "launch.pipeline", *(argv or sys.argv[1:])],
                          settings=json.loads(json.dumps(settings)))
    final = record["final"]
    test = final["test"]
    chosen = ("a threshold per finding" if final["threshold"] is None
              else f"threshold {final['threshold']:.4f}") + " chosen on validation"
    print(f"final model: {final['run']} ({chosen}); test split: "
          + ", ".join(f"{k} {v:.3f}" for k, v in test.items() if v is not None)
          + f"; report: {Path(final['run']) / 'eval' / 'report.html'}")
    print(json.dumps({"seconds": record["seconds_this_invocation"]}))
    return 0


if __name__ == "__main__":
    run_cli(main)
