"""What every launcher shares: the toolkit entry points it may start, the `-- MODULE ARGS` tail, and the
pre-flight check of the prepared dataset against the number of workers.

A launcher only starts the toolkit's own entry points; the checks here read the same files and reuse the same
argument parser the entry point will, so a mistake shows before a job waits in a queue, not after.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from distributed.training.config import parse_config
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser
from cxrscale.files import read_json, write_text_atomic
from preprocessing import schema

# The entry points that run one process per worker under horovodrun / mpirun / srun.
ENTRY_POINTS = {
    "distributed.train": "data-parallel training",
    "optimize.prune_quantize": "pruning / quantization-aware fine-tuning of a trained run",
}
_PYTHON = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")

OK, INFO, WARNING, ERROR = "ok", "info", "warning", "error"
Check = tuple[str, str]  # (level, message)


@dataclass(frozen=True)
class EntryPoint:
    """One toolkit entry point and the arguments to pass it, e.g. distributed.train --data prepared/x."""

    module: str
    args: tuple[str, ...]

    def argv(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module, *self.args]


def split_tail(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """The launcher's own options and the command after the first `--` (None when there is no `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def with_tf_backend(entry: EntryPoint, launcher: str) -> EntryPoint:
    """`entry` (distributed.train) with --backend tf, as a launcher of tf.distribute workers starts it; a
    command asking for another backend is refused, naming `launcher`."""
    args = list(entry.args)
    if "--backend" not in args:
        return EntryPoint(entry.module, (*args, "--backend", "tf"))
    given = args[args.index("--backend") + 1:args.index("--backend") + 2]
    if given != ["tf"]:
        raise CxrError(f"{launcher} starts tf.distribute workers, but the command asks for --backend "
                       f"{' '.join(given) or '(nothing)'}: leave --backend out of the command after --")
    return entry


def parse_entry_point(tail: Sequence[str] | None, launcher: str) -> EntryPoint:
    """`distributed.train ARGS` or `python -m distributed.train ARGS` -> EntryPoint; anything else is refused.

    launcher: the command shown in the fix, e.g. "python -m launch.local --np 2".
    """
    choices = " or ".join(ENTRY_POINTS)
    example = f"{launcher} -- distributed.train --data prepared/sample --model cnn"
    if not tail:
        raise CxrError(f"no command to launch: end the options with -- and the entry point ({choices}), "
                       f"e.g. {example}")
    words = list(tail)
    if _PYTHON.match(words[0]):
        if len(words) < 2 or words[1] != "-m":
            raise CxrError(f"the command after -- must run a toolkit module with -m ({choices}), got "
                           f"{' '.join(words[:3])!r}; e.g. {example}")
        words = words[2:]
    elif words[0] == "-m":
        words = words[1:]
    module = words[0] if words else ""
    if module.endswith(".py"):  # distributed/train.py -> distributed.train
        module = module[:-3].replace("/", ".")
    if module not in ENTRY_POINTS:
        raise CxrError(f"{module or '(nothing)'!r} after -- is not an entry point that runs under horovodrun: "
                       f"use {choices}, e.g. {example}")
    return EntryPoint(module, tuple(words[1:]))


@dataclass(frozen=True)
class DataTarget:
    """The prepared dataset a launch will read, and the per-worker batch it will read it with."""

    path: Path
    batch_size: int
    source: str  # where the path came from, for messages: "--data", "--config F", "RUN/config.json"


def data_target(entry: EntryPoint) -> DataTarget:
    """Find the prepared dataset and per-worker batch in the entry point's own arguments.

    distributed.train: its own parser (with --config merged), so a bad flag is reported now, not on N workers.
    optimize.prune_quantize: --data, else the data of the run it compresses (RUN/config.json), as it does.
    """
    if entry.module == "distributed.train":
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                config = parse_config(list(entry.args))
        except SystemExit:
            lines = captured.getvalue().strip().splitlines() or ["invalid arguments"]
            raise CxrError(f"the arguments after -- are not valid for distributed.train: {lines[-1]}") from None
        except CxrError as err:
            raise CxrError(f"distributed.train: {err}") from None
        source = "--data" if "--data" in entry.args else "--config"
        return DataTarget(Path(config.data), config.batch_size, source)

    known = _loose_args(entry)
    if known.data:
        return DataTarget(Path(known.data), known.batch_size, "--data")
    if not known.run:
        raise CxrError("optimize.prune_quantize needs --run RUN (the training run folder to compress)")
    config = read_json(Path(known.run) / "config.json", "training run config").get("config", {})
    if not config.get("data"):
        raise CxrError(f"{Path(known.run) / 'config.json'} names no dataset (config.data): pass --data")
    return DataTarget(Path(config["data"]), known.batch_size, f"{Path(known.run) / 'config.json'}")


def loose_data_target(entry: EntryPoint) -> DataTarget | None:
    """Just --data and --batch-size, for checking the data even when other arguments are wrong."""
    known = _loose_args(entry)
    return DataTarget(Path(known.data), known.batch_size, "--data") if known.data else None


def _loose_args(entry: EntryPoint) -> argparse.Namespace:
    parser = OneLineParser(add_help=False)
    parser.add_argument("--run")
    parser.add_argument("--data")
    # both entry points' default per-worker batch
    parser.add_argument("--batch-size", type=lambda t: int(t) if t.isdigit() else 32, default=32)
    return parser.parse_known_args(list(entry.args))[0]


def data_checks(target: DataTarget, workers: int, fewer_workers: str, *, local: bool = True) -> list[Check]:
    """Check the prepared dataset against `workers` processes, as each worker will see it.

    fewer_workers: the launcher's fix for too many workers, e.g. "use --np 4" (formatted with {n}, the
    largest worker count the dataset supports). local=False: the dataset may live only on the cluster, so
    a missing folder is a warning instead of an error.
    """
    path = target.path
    if not local and not path.exists():
        return [(WARNING, f"{path} (from {target.source}) is not on this machine, so its shards were not "
                          f"checked: it must exist on the cluster with at least {workers} train shard files")]
    try:
        manifest = schema.read_manifest(path)
        train = schema.shard_paths(path, "train", manifest)
    except CxrError as err:
        return [(ERROR, f"{err} (from {target.source})")]
    problems = schema.worker_problems(path, manifest, workers, target.batch_size, fewer_workers)
    checks: list[Check] = [(ERROR, f"{problem} (from {target.source})") for problem in problems]
    if not problems:
        checks.append((OK, f"{path}: {len(train)} train shard files for {workers} workers"))
    return checks


def processes_per_node(gpus: int, explicit: int | None, gpus_option: str, explicit_option: str,
                       where: str = "node") -> int:
    """Worker processes per node (`where`, e.g. pod): one per GPU, or `explicit` (required on CPU nodes, at most one
    per GPU on GPU nodes). Raises CxrError naming the options."""
    if gpus < 0:
        raise CxrError(f"{gpus_option} must be >= 0, got {gpus}")
    if gpus == 0 and explicit is None:
        raise CxrError(f"{gpus_option} 0 (CPU {where}s) needs {explicit_option} N, the worker processes per {where}")
    count = explicit if explicit is not None else gpus
    if count < 1:
        raise CxrError(f"{explicit_option} must be at least 1, got {count}")
    if gpus and count > gpus:
        raise CxrError(f"{explicit_option} {count} is more than {gpus_option} {gpus}: workers would share a GPU; "
                       "use one worker per GPU")
    return count


def fatal(checks: Sequence[Check]) -> list[str]:
    return [message for level, message in checks if level == ERROR]


def print_checks(checks: Sequence[Check], title: str, stream: TextIO | None = None) -> None:
    """One line per check, errors and warnings labelled, under a title."""
    stream = stream or sys.stderr
    print(title, file=stream)
    for level, message in checks:
        print(f"  {level:<8}{message}", file=stream)
    stream.flush()


def stop_if_fatal(checks: Sequence[Check], what: str) -> None:
    """Raise one CxrError summing up the errors already printed, if there are any."""
    errors = fatal(checks)
    if errors:
        raise CxrError(f"{len(errors)} problem{'s' if len(errors) > 1 else ''} listed above: {what}")


def tail_usage(prog: str) -> str:
    return f"{prog} [options] -- {{{','.join(ENTRY_POINTS)}}} ARGS..."


def write_generated(path: str | Path, text: str, *, overwrite: bool, option: str = "--output") -> bool:
    """Write a generated file atomically. An identical existing file is left alone (returns False); a
    different one is replaced only with `overwrite`, since it may hold the user's own edits."""
    path = Path(path)
    if path.is_dir():
        raise CxrError(f"{option} {path} is a folder; give a file name")
    if path.exists():
        try:
            if path.read_text() == text:
                return False
        except (OSError, UnicodeDecodeError):
            pass
        if not overwrite:
            raise CxrError(f"{option} {path} already exists with other content (maybe your edits): add "
                           f"--overwrite to replace it, or choose another {option}")
    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise CxrError(f"{option} {path} cannot be written: {err.strerror or err}") from None
    return True


def elastic_range(min_np: int | None, max_np: int | None, workers: int, launcher: str, module: str,
                  workers_name: str = "workers") -> tuple[int, int] | None:
    """(min, max) workers of an elastic job, or None when neither --min-np nor --max-np is given; refuses a
    range that does not hold `workers` (named `workers_name` in the message, e.g. --np), a launcher other
    than horovodrun, and an entry point that is not distributed.train (the one with --elastic)."""
    if min_np is None and max_np is None:
        return None
    low, high = (1 if min_np is None else min_np), (workers if max_np is None else max_np)
    if not 1 <= low <= workers <= high:
        given = f"{workers_name} {workers}" if workers_name.startswith("--") else f"{workers} {workers_name}"
        raise CxrError(f"an elastic job needs 1 <= --min-np <= {workers_name} <= --max-np; got --min-np {low}, "
                       f"{given}, --max-np {high}")
    if launcher != "horovodrun":
        raise CxrError(f"--min-np/--max-np make a Horovod elastic job, which only horovodrun starts: add "
                       f"--launcher horovodrun (not {launcher})")
    if module != "distributed.train":
        raise CxrError(f"--min-np/--max-np make an elastic job, which distributed.train supports; {module} does not: "
                       "leave them out")
    return low, high


ELASTIC_COOLDOWN = ("10", "120")  # seconds a host whose worker failed stays out before it may rejoin

