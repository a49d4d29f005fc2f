"""The install: the hash-pinned lock is what the venv holds, every imported package is declared, and the built
wheel carries its package data and the `cxrscale` command into a fresh venv, outside the checkout."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cxrscale import __version__
from tests.conftest import PYTHON, REPO

PACKAGES = ("cxrscale", "preprocessing", "distributed", "optimize", "launch", "benchmarks", "tests")


def lock_pins() -> dict[str, tuple[str, int]]:
    """requirements.txt: {canonical name: (version, number of hashes)}."""
    pins, name = {}, None
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^ \\]+)", line)
        if match:
            name = canonicalize_name(match[1])
            pins[name] = (match[2], 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            pins[name] = (pins[name][0], pins[name][1] + 1)
    return pins


def direct_requirements() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.in").read_text().splitlines()]
    return {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}


def test_the_lock_pins_every_package_with_hashes_and_the_venv_holds_exactly_it():
    pins, direct = lock_pins(), direct_requirements()
    assert len(pins) > len(direct) + 20  # TensorFlow's own dependencies are in it too
    assert all(hashes >= 1 for _, hashes in pins.values()), [n for n, (_, h) in pins.items() if not h]
    for name, requirement in direct.items():  # generated from requirements.in, and not stale
        assert name in pins and requirement.specifier.contains(pins[name][0]), (name, pins.get(name))
    # the venv's own site-packages only: an imported setuptools appends its _vendor folder (with its own
    # packaging and wheel) to sys.path
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)}
    wrong = {n: (v, installed.get(n)) for n, (v, _) in pins.items() if installed.get(n) != v}
    assert not wrong, f"the venv differs from requirements.txt (run make install): {wrong}"
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet --require-hashes --no-deps -r requirements.txt" in makefile
    assert "pip-compile --quiet --generate-hashes" in makefile  # make lock regenerates it


def test_every_imported_third_party_package_is_declared():
    """Each module the toolkit or its tests import from outside the standard library comes from a package in
    requirements.in (Horovod, built from source, aside), and the toolkit's own ones are in setup.cfg too."""
    to_dist = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        imported.setdefault(top, set()).add(package)
    direct = set(direct_requirements())
    setup = (REPO / "setup.cfg").read_text()
    declared = {canonicalize_name(Requirement(line.strip()).name)
                for line in setup.split("install_requires =")[1].split("\n\n")[0].splitlines()[1:]
                if line.strip() and not line.strip().startswith("#")}
    missing = {}
    for module, users in sorted(imported.items()):
        dists = {canonicalize_name(d) for d in to_dist.get(module, [])}
        if dists & {"horovod"}:
            continue
        if not dists & direct:
            missing[module] = ("not in requirements.in", sorted(dists))
        elif users - {"tests"} and not dists & (declared | {"pytest"}):
            missing[module] = ("not in setup.cfg install_requires", sorted(dists))
    assert not missing, missing


@pytest.mark.slow
def test_the_wheel_runs_in_a_fresh_venv_outside_the_checkout(tmp_path):
    """Build the wheel, install it (and the Horovod wheel make install built) into a new venv, and run an entry
    point that reads package data from a folder that is not the checkout. The third-party stack is lent from
    this venv (a .pth line, no download), so what is tested is the wheel itself."""
    source, dist = tmp_path / "source", tmp_path / "dist"  # a copy: setuptools builds inside its source tree
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(source)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("cxrscale-*.whl")
    assert wheel.name.startswith(f"cxrscale-{__version__}-")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    fresh = venv / "bin" / "python"
    site = subprocess.run([str(fresh), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    key = (Path(sys.prefix) / ".horovod-build-key").read_text().strip()
    (horovod,) = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrscale" / "wheels" /
                  key).glob("horovod-*.whl")
    subprocess.run([str(fresh), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel),
                    str(horovod)], check=True, capture_output=True, timeout=300)
    Path(site, "lent-stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after: pip saw an empty venv
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    where = subprocess.run([str(fresh), "-c", "import benchmarks, launch; print(benchmarks.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert where.startswith(site), where
    version = subprocess.run([str(venv / "bin" / "cxrscale"), "--version"], capture_output=True, text=True,
                             env=env, cwd=elsewhere)
    assert version.returncode == 0 and version.stdout.strip() == f"cxrscale {__version__}"
    result = subprocess.run([str(fresh), "-m", "benchmarks.scaling", "--quick", "--out", str(tmp_path / "results")],
                            cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "results").glob("scaling-*.json")) and list((tmp_path / "results").glob("scaling-*.png"))
    assert not (elsewhere / "benchmarks").exists()
