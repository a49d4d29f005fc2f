#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (TensorFlow + Gloo) into a virtualenv.
#
#   bash launch/install_horovod.sh [VENV_DIR]        # VENV_DIR defaults to .venv
#
# Horovod 0.28.1 has no wheels on PyPI, so it is compiled from its sdist against the
# TensorFlow already in the venv (install that first: make install). Needs a C++17
# compiler; CMake is taken from PATH, else from the venv (pip install cmake).
#
# Patch: against TF 2.21, horovod/tensorflow/xla_mpi_ops.cc does not compile (TF's XLA
# headers include highwayhash/farmhash headers TF does not ship), so that one source is
# dropped from horovod/tensorflow/CMakeLists.txt. Only Horovod's optional XLA ops
# (HOROVOD_ENABLE_XLA_OPS) are lost; the TensorFlow ops and Gloo work as usual.
#
# Cache: the built wheel is kept in ${XDG_CACHE_HOME:-~/.cache}/cxrscale/wheels/KEY/,
# where KEY names the Horovod, TensorFlow and Python versions plus a hash of the
# build-relevant HOROVOD_* variables, so a re-created venv installs in seconds and a
# TensorFlow or build-option change rebuilds. If the venv already has this exact build,
# the script prints one line and exits 0.
#
# GPU clusters: on a CUDA machine build the NCCL variant with e.g.
#   HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME=/usr/local/nccl bash launch/install_horovod.sh
# HOROVOD_GPU_*, HOROVOD_NCCL_*, HOROVOD_CUDA_HOME, HOROVOD_WITH[OUT]_* etc. are part of
# the cache key, so the NCCL and CPU wheels never get mixed up. Other knobs:
# HOROVOD_CMAKE=/path/to/cmake, MAKEFLAGS (default -j$(nproc)).
#
# MPI: when mpicxx is on PATH (launch/install_mpi.sh, which make install runs first, installs Debian's
# OpenMPI as root), Horovod is built with MPI as well as Gloo, for mpirun (launch.kubernetes) and
# srun --mpi (launch.slurm --launcher srun); HOROVOD_WITH_MPI=0 builds Gloo only, =1 insists on MPI.
set -euo pipefail

HOROVOD_VERSION=0.28.1
VENV=${1:-.venv}

die() { echo "install_horovod: error: $*" >&2; exit 1; }
say() { echo "install_horovod: $*"; }

[[ -x $VENV/bin/python ]] || die "no virtualenv at $VENV (no $VENV/bin/python); create it first, e.g. make install"
VENV=$(cd "$VENV" && pwd)
PY=$VENV/bin/python
TF_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("tensorflow"))' 2>/dev/null) ||
    die "tensorflow is not installed in $VENV; run make install"

# Build options: TensorFlow + Gloo, MPI when an MPI compiler is here; no PyTorch or MXNet unless
# HOROVOD_WITH_<X>=1.
export HOROVOD_WITH_TENSORFLOW=${HOROVOD_WITH_TENSORFLOW:-1} HOROVOD_WITH_GLOO=${HOROVOD_WITH_GLOO:-1}
if [[ -z ${HOROVOD_WITH_MPI:-} ]] && command -v mpicxx >/dev/null; then
    export HOROVOD_WITH_MPI=1
elif [[ ${HOROVOD_WITH_MPI:-} == 1 ]]; then
    command -v mpicxx >/dev/null || die "HOROVOD_WITH_MPI=1 but no mpicxx on PATH: install OpenMPI (bash launch/install_mpi.sh)"
else
    unset HOROVOD_WITH_MPI
fi
CONTROLLERS=Gloo
[[ ${HOROVOD_WITH_MPI:-} == 1 ]] && CONTROLLERS="Gloo, MPI"
NCCL=0
[[ ${HOROVOD_GPU_OPERATIONS:-${HOROVOD_GPU_ALLREDUCE:-}} == NCCL ]] && NCCL=1 CONTROLLERS="$CONTROLLERS, NCCL"
for fw in MPI PYTORCH MXNET; do
    with=HOROVOD_WITH_$fw
    [[ ${!with:-} == 1 ]] || export "HOROVOD_WITHOUT_$fw=1"
done

build_env=$(env | grep -E '^HOROVOD_(WITH|GPU|CPU|NCCL|CUDA|ROCM|BUILD|NVTX|DEBUG|ALLOW|LOCAL)' | sort)
py_tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
KEY=horovod-$HOROVOD_VERSION-tf$TF_VERSION-$py_tag-noxla-$(sha256sum <<<"$build_env" | cut -c1-12)
CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/cxrscale/wheels/$KEY
MARKER=$VENV/.horovod-build-key   # which cached build this venv has

# Fast path: this build is installed and imports with TensorFlow and Gloo (one Python
# process; `horovodrun --check-build`, run after an install below, takes ~20 s).
installed_ok() {
    [[ -f $MARKER && $(<"$MARKER") == "$KEY" && -x $VENV/bin/horovodrun ]] || return 1
    TF_CPP_MIN_LOG_LEVEL=3 "$PY" -c "import horovod, horovod.tensorflow as hvd
assert horovod.__version__.split('+')[0] == '$HOROVOD_VERSION', horovod.__version__
assert hvd.gloo_built()
assert hvd.mpi_built() == ('MPI' in '$CONTROLLERS')
assert bool(hvd.nccl_built()) == bool($NCCL)" >/dev/null 2>&1
}
if installed_ok; then
    say "horovod $HOROVOD_VERSION (TensorFlow $TF_VERSION, $CONTROLLERS) already installed in $VENV; nothing to do"
    exit 0
fi

shopt -s nullglob
wheels=("$CACHE_DIR"/horovod-*.whl)
if ((${#wheels[@]} == 0)); then
    say "building horovod $HOROVOD_VERSION against TensorFlow $TF_VERSION (takes a while; cache: $CACHE_DIR)"
    command -v "${CXX:-g++}" >/dev/null || die "no C++ compiler (${CXX:-g++}); e.g. apt-get install g++"
    if [[ -z ${HOROVOD_CMAKE:-} ]]; then
        if command -v cmake >/dev/null; then
            HOROVOD_CMAKE=$(command -v cmake)
        else
            [[ -x $VENV/bin/cmake ]] || "$PY" -m pip install --quiet cmake
            HOROVOD_CMAKE=$VENV/bin/cmake
        fi
    fi
    export HOROVOD_CMAKE
    export CMAKE_POLICY_VERSION_MINIMUM=3.5   # CMake >= 4 refuses bundled gloo's old cmake_minimum_required
    export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
    # --no-build-isolation builds against the venv's TF, so setup.py's own needs must be there.
    "$PY" -m pip install --quiet setuptools wheel packaging cloudpickle psutil pyyaml

    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src=$work/horovod-$HOROVOD_VERSION

    # Drop xla_mpi_ops.cc; fail loudly if the line is not exactly where we expect it.
    "$PY" - "$src/horovod/tensorflow/CMakeLists.txt" <<'EOF'
import pathlib, sys
path = pathlib.Path(sys.argv[1])
line = 'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n'
text = path.read_text()
if text.count(line) != 1:
    sys.exit(f"install_horovod: error: expected one line {line.strip()!r} in {path}; "
             "the horovod source changed, review the patch in launch/install_horovod.sh")
path.write_text(text.replace(line, ""))
EOF

    "$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$work/dist" "$src"
    built=("$work"/dist/horovod-*.whl)
    ((${#built[@]} == 1)) || die "pip wheel did not produce one horovod wheel in $work/dist"
    mkdir -p "$CACHE_DIR"
    name=$(basename "${built[0]}")
    cp "${built[0]}" "$CACHE_DIR/$name.partial" && mv "$CACHE_DIR/$name.partial" "$CACHE_DIR/$name"
    printf '%s\n' "$build_env" >"$CACHE_DIR/build-env.txt"
    wheels=("$CACHE_DIR/$name")
else
    say "installing cached wheel ${wheels[0]}"
fi

# Replace whatever horovod the venv has (same version would otherwise be "already satisfied").
"$PY" -m pip uninstall --quiet --yes horovod >/dev/null 2>&1 || true
"$PY" -m pip install --quiet "${wheels[0]}"
check=$(TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/horovodrun" --check-build 2>/dev/null) || true
for part in TensorFlow Gloo MPI NCCL; do
    if [[ $part == TensorFlow || $CONTROLLERS == *$part* ]] && ! grep -q "\[X\] $part" <<<"$check"; then
        die "horovod installed from ${wheels[0]}, but horovodrun --check-build does not list $part:
$check
(delete $CACHE_DIR to force a rebuild)"
    fi
done
echo "$KEY" >"$MARKER"
say "horovod $HOROVOD_VERSION (TensorFlow $TF_VERSION, $CONTROLLERS) installed in $VENV"
