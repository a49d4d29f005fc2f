"""The container images: the Dockerfile and the Apptainer definition lint clean, install exactly the lock through
the same `make install` as a checkout, and name the CUDA, cuDNN and version they must. Images cannot be built
here (no registry for base images), so what can be checked without building is checked."""
from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import subprocess
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from cxrscale import __version__
from tests.conftest import PYTHON, REPO

BIN = Path(PYTHON).parent
DEF_SECTIONS = {"arguments", "labels", "environment", "runscript", "test", "help", "post", "files", "setup",
                "startscript"}


def tool(name: str) -> str:
    found = BIN / name
    assert found.is_file(), f"{name} is not in {BIN}: run make install (requirements.txt holds {name}-py)"
    return str(found)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (REPO / "Dockerfile").read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def apptainer_sections() -> tuple[dict[str, str], dict[str, str]]:
    """(header keys, {section: body}) of launch/apptainer.def."""
    header, sections, current = {}, {}, None
    for line in (REPO / "launch" / "apptainer.def").read_text().splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match[1]
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
        elif re.match(r"^\w+:", line):
            key, value = line.split(":", 1)
            header[key.strip()] = value.strip()
    return header, sections


def test_dockerfile_and_scripts_lint_clean():
    docker = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert docker.returncode == 0 and not docker.stdout.strip(), docker.stdout + docker.stderr
    scripts = [REPO / "launch" / "install_horovod.sh", REPO / "launch" / "install_mpi.sh", REPO / ".ci" / "run"]
    shell = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True,
                           text=True)
    assert shell.returncode == 0, shell.stdout


def test_dockerfile_installs_the_lock_with_make_install_on_tensorflows_cuda():
    steps = dockerfile_instructions()
    runs = [args for op, args in steps if op == "RUN"]
    assert not any(re.search(r"\bpip3? install\b", r) for r in runs), "the image must install through make install"
    (install,) = [r for r in runs if "make install" in r]
    assert "VENV=/opt/cxrscale/.venv" in install and "PYTHON=python3.11" in install
    assert ("COPY", ". .") in steps and steps.index(("COPY", ". .")) < [a for _, a in steps].index(install)
    # make install is the locked install plus the shared Horovod script (the same lines a checkout runs)
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "pip install --quiet --require-hashes --no-deps -r requirements.txt" in recipe
    assert "bash launch/install_mpi.sh" in recipe and "bash launch/install_horovod.sh $(VENV)" in recipe
    env = " ".join(args for op, args in steps if op == "ENV")
    for option in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_MPI=1", "HOROVOD_WITH_GLOO=1"):
        assert option in env, option
    assert "openmpi-bin" in " ".join(runs) and "openssh-server" in " ".join(runs) and "/var/run/sshd" in " ".join(runs)
    # what the build context keeps: the lock and everything make install reads
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    for needed in ("requirements.txt", "Makefile", "setup.cfg", "pyproject.toml", "launch/install_horovod.sh",
                   "launch/install_mpi.sh", "benchmarks/profiles.json", "README.md", "LICENSE"):
        assert (REPO / needed).is_file() and not any(fnmatch.fnmatch(needed, p) for p in ignored), needed
    # the base image: CUDA and cuDNN within what TensorFlow's and-cuda extra asks for
    args = " ".join(a for op, a in steps if op == "ARG")
    cuda = re.search(r"CUDA_VERSION=(\d+\.\d+\.\d+)", args)[1]
    cudnn = re.search(r"CUDNN_VERSION=([\d.]+)-\d+", args)[1]
    froms = [a for op, a in steps if op == "FROM"]
    assert froms and all(f.startswith("nvidia/cuda:${CUDA_VERSION}-") for f in froms), froms
    assert all('"libcudnn9-cuda-12=${CUDNN_VERSION}"' in r for r in runs if "apt-get install" in r)
    wants = {Requirement(r).name: Requirement(r) for r in importlib.metadata.requires("tensorflow")
             if "and-cuda" in r}
    # The pip packages number CUDA 12.5's runtime 12.5.82 (what the 12.5.1 toolkit ships): compare major.minor.
    release = Version(cuda).release[:2]
    for spec in wants["nvidia-cuda-runtime-cu12"].specifier:
        bound = Version(spec.version).release[:2]
        assert {">=": release >= bound, "<": release < bound}[spec.operator], (cuda, str(spec))
    assert Version(cudnn) in wants["nvidia-cudnn-cu12"].specifier, (cudnn, str(wants["nvidia-cudnn-cu12"]))
    labels = " ".join(args for op, args in steps if op == "LABEL")
    assert f'org.opencontainers.image.version="{__version__}"' in labels


def test_apptainer_definition_is_built_from_the_docker_image():
    header, sections = apptainer_sections()
    assert set(sections) <= DEF_SECTIONS, set(sections) - DEF_SECTIONS
    arguments = dict(line.strip().split("=", 1) for line in sections["arguments"].splitlines() if "=" in line)
    assert header == {"Bootstrap": "{{ BOOTSTRAP }}", "From": "{{ IMAGE }}"}
    assert arguments == {"BOOTSTRAP": "docker-daemon", "IMAGE": f"cxrscale:{__version__}"}
    assert "post" not in sections, "the Docker image holds the install; the definition must not add to it"
    assert f"org.opencontainers.image.version {__version__}" in sections["labels"]
    for name in ("environment", "runscript", "test"):
        syntax = subprocess.run(["bash", "-n"], input=sections[name], capture_output=True, text=True)
        assert syntax.returncode == 0, (name, syntax.stderr)
        lint = subprocess.run([tool("shellcheck"), "--shell=sh", "-"], input=sections[name],
                              capture_output=True, text=True)
        assert lint.returncode == 0, (name, lint.stdout)
    assert "hvd.nccl_built()" in sections["test"] and "exec cxrscale" in sections["runscript"]


def test_the_docs_give_the_build_and_run_commands():
    doc = (REPO / "docs" / "containers.md").read_text()
    for command in (f"docker build --build-arg GIT_COMMIT=\"$(git rev-parse HEAD)\" -t cxrscale:{__version__} .",
                    "apptainer build cxrscale.sif launch/apptainer.def", "--container cxrscale.sif",
                    f"--image registry.example.com/cxrscale:{__version__}"):
        assert command in doc, command
