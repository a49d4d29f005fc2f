#!/usr/bin/env bash
# OpenMPI for Horovod's MPI controller: what `mpirun` (the MPI operator's MPIJob, launch.kubernetes) and
# `launch.slurm --launcher srun` start workers with. Gloo (horovodrun) needs none of it.
#
#   bash launch/install_mpi.sh          # make install runs it before launch/install_horovod.sh
#
# If mpirun and mpicxx are on PATH already, nothing is done. Otherwise, as root on Debian/Ubuntu, Debian's
# OpenMPI is installed (openmpi-bin, libopenmpi-dev); anywhere else the script says how and exits 0, and
# Horovod is built with Gloo only. Set CXR_NO_MPI=1 to skip it. launch/install_horovod.sh builds Horovod
# with MPI as well as Gloo whenever mpicxx is on PATH.
set -euo pipefail

say() { echo "install_mpi: $*"; }
PACKAGES=(openmpi-bin libopenmpi-dev)

if [[ ${CXR_NO_MPI:-0} == 1 ]]; then
    say "CXR_NO_MPI=1: not installing MPI (Horovod gets Gloo only)"
    exit 0
fi
if command -v mpirun >/dev/null && command -v mpicxx >/dev/null; then
    say "$(mpirun --version 2>/dev/null | head -1) already installed"
    exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    say "no MPI here (mpirun/mpicxx not on PATH), and this is not root on a Debian-like system: Horovod is built"
    say "with Gloo only. For mpirun and srun --mpi launches install OpenMPI (e.g. sudo apt-get install"
    say "${PACKAGES[*]}, or your cluster's module), then run make install again."
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
say "installing Debian's OpenMPI (${PACKAGES[*]})"
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; } ||
    { echo "install_mpi: error: apt-get could not install ${PACKAGES[*]}; install them, or set CXR_NO_MPI=1" >&2
      exit 1; }
say "$(mpirun --version | head -1) installed"
