"""Running the CLIs: in-process (fast: no interpreter or TensorFlow start-up, and the Horovod build probe's
cache is shared) or as a real command."""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
from typing import Callable, Sequence

from cxrscale.cli import run_cli
from cxrscale.console import LOG_FORMAT
from tests.conftest import PYTHON, REPO

# Entry points that set no process-wide TensorFlow state (thread pools, precision policy, Horovod), so their
# main can run in the test's process as `python -m` runs it; each in-process call saves TensorFlow's start-up
# (about 5 s on 2 cores). Every entry point still runs as its own command in tests/cxrscale/test_runtime.py.
IN_PROCESS = frozenset({"distributed.evaluate", "distributed.predict", "distributed.ensemble", "distributed.adapt",
                        "optimize.export", "benchmarks.members"})


def exit_status(main: Callable, argv: Sequence[str]) -> int:
    """The exit status `python -m MODULE ARGV` would end with: `main` under `run_cli`, in this process."""
    try:
        run_cli(main, list(argv))
    except SystemExit as done:
        return 0 if done.code is None else done.code if isinstance(done.code, int) else 1
    return 0


def run_main(main: Callable, argv: Sequence[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m launch.X ARGV`, run in this process."""
    code = exit_status(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_module(module: str, *args: str, cwd=REPO, env: dict | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def run_in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` for a module of IN_PROCESS, run in this process under `run_cli` as its
    __main__ does: stdout, stderr and the log captured, returned as the CompletedProcess a subprocess gives."""
    if module not in IN_PROCESS:
        raise ValueError(f"{module} sets process-wide state: run it as a command (run_module)")
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = [handler]  # what setup_logging's basicConfig would have given a fresh process
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = exit_status(main, args)
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())
