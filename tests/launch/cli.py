"""Running the launch CLIs: in-process (fast; shares the Horovod build probe's cache) or as a real command."""
from __future__ import annotations

import os
import subprocess
from typing import Callable, Sequence

from cxrscale.cli import run_cli
from tests.conftest import PYTHON, REPO


def run_main(main: Callable, argv: Sequence[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m launch.X ARGV`, run in this process."""
    try:
        run_cli(main, list(argv))
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def run_module(module: str, *args: str, cwd=REPO, env: dict | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=full_env,
                          timeout=timeout)
