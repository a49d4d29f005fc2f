"""Every launch CLI answers --help with real examples."""
from __future__ import annotations

import pytest

from tests.launch.cli import run_module


@pytest.mark.parametrize("module", ["launch.hostfile", "launch.local", "launch.slurm", "launch.kubernetes",
                                    "launch.ray", "launch.pipeline"])
def test_help(module):
    result = run_module(module, "--help")
    assert result.returncode == 0, result.stderr
    assert f"python -m {module}" in result.stdout and "examples:" in result.stdout
