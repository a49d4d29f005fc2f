"""What a run records about the code that made it: library versions and the git commit."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

def library_versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed version of each distribution ("not installed" when absent), for run records."""
    from importlib import metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str:
    """The toolkit's git commit: of the checkout, else CXR_GIT_COMMIT (the container image records the commit it
    was built from there), else "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    return os.environ.get("CXR_GIT_COMMIT", "").strip() or "unknown"


def code_version() -> str:
    """`git_commit()`, with "+edited" when tracked files differ from it: what a cached measurement names its
    code by, so that a figure made by other code is never reported as this code's."""
    commit = git_commit()
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        edited = out.returncode == 0 and bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        edited = False
    return commit + ("+edited" if edited else "")

