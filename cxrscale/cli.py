"""How every entry point runs: `run_cli` (a user mistake is one line and exit status 2, Ctrl-C exit 130, only
rank 0 speaks under a launcher) and `OneLineParser` (argparse with the same one-line errors and `--version`)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable, Sequence, TypeVar

from cxrscale import __version__
from cxrscale.errors import USER_ERROR_EXIT, CxrError, disk_full

def launcher_rank() -> int:
    """This process's rank as its launcher (horovodrun, mpirun, Slurm) set it, readable before Horovod is
    initialised; 0 for a plain process."""
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a CLI `main`, turning a `CxrError` into one line on stderr and exit status 2, and Ctrl-C into
    exit status 130. Under a launcher only rank 0 prints, so N workers report one mistake once."""
    speak = launcher_rank() == 0
    try:
        code = main(argv)
    except CxrError as err:
        if speak:
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except KeyboardInterrupt:
        if speak:
            print("interrupted: what was finished is kept; re-run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        where = disk_full(err)
        if where is None:
            raise
        print(f"error: no space left on the device{f' writing {where}' if where else ''}: free some space (or "
              "write elsewhere) and re-run; what was complete is kept and what was being written was removed, so "
              "the re-run continues from there (training: with --resume once a checkpoint exists)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    raise SystemExit(code or 0)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one `error: ...` line and exit status 2, like every other user
    mistake in the toolkit (argparse's own adds its usage lines), printed by rank 0 only under a launcher.
    Every entry point's parser is one, so every entry point answers `--version`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line(),
                          help="print the toolkit's version and exit")

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n" if launcher_rank() == 0 else None)


def version_line() -> str:
    """`cxrscale X.Y.Z`: cxrscale.__version__, the one place the version is set (setup.cfg reads it too)."""
    return f"cxrscale {__version__}"


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse



Config = TypeVar("Config")


def config_from(cls: type[Config], namespace: argparse.Namespace, **overrides) -> Config:
    """The frozen dataclass `cls` (an entry point's typed config, one field per flag) from its parser's
    `namespace`, lists made tuples, `overrides` applied. A flag without a field or a field without a flag is
    our bug, and fails loudly."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items()}
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(values) != names:
        raise TypeError(f"{cls.__name__} and its parser disagree: flags without a field "
                        f"{sorted(set(values) - names)}, fields without a flag {sorted(names - set(values))}")
    return cls(**values)
