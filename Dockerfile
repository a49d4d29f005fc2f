# syntax=docker/dockerfile:1
# cxrscale for NVIDIA GPU clusters (docs/containers.md):
#   - CUDA 12.5 and cuDNN 9.3, what TensorFlow 2.21 is built for (its `and-cuda` extra asks for CUDA runtime
#     >= 12.5.82, < 13 and cuDNN >= 9.3.0.75, < 10): the CUDA image, and cuDNN pinned from NVIDIA's apt archive
#     that image has configured (an older cuDNN minor makes TensorFlow refuse the GPU);
#   - the locked Python stack, exactly requirements.txt with its hashes, installed by `make install`, which also
#     builds Horovod 0.28.1 with NCCL, Gloo and MPI through launch/install_horovod.sh, as on any machine;
#   - OpenMPI and sshd, for the MPI operator's MPIJob that launch.kubernetes writes (mpirun over ssh).
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t cxrscale:0.2.0 .
#   docker run --rm --gpus all cxrscale:0.2.0 cxrscale --version
#
# The Apptainer image for Slurm is built from this one (launch/apptainer.def).

ARG CUDA_VERSION=12.5.1
ARG UBUNTU=ubuntu22.04
ARG CUDNN_VERSION=9.3.0.75-1

# --- build: compilers, CUDA headers and NCCL for Horovod's build -------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
ARG CUDNN_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# Python 3.11 (TensorFlow 2.21 + Horovod 0.28.1; Ubuntu 22.04 has 3.10) from the deadsnakes archive. The
# distribution's own package versions are what the pinned base image's archive holds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ make \
        openmpi-bin libopenmpi-dev "libcudnn9-cuda-12=${CUDNN_VERSION}" "libcudnn9-dev-cuda-12=${CUDNN_VERSION}" \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cxrscale
COPY . .

# NCCL for GPU allreduce, MPI for mpirun/srun, Gloo for horovodrun and elastic jobs; compute capabilities
# Volta to Hopper. The build machine has no GPU driver: CUDA's stub libcuda links Horovod, then goes again.
ENV HOROVOD_GPU_OPERATIONS=NCCL \
    HOROVOD_NCCL_LINK=SHARED \
    HOROVOD_CUDA_HOME=/usr/local/cuda \
    HOROVOD_BUILD_CUDA_CC_LIST=70,75,80,86,89,90 \
    HOROVOD_WITH_MPI=1 \
    HOROVOD_WITH_GLOO=1
RUN ldconfig /usr/local/cuda/targets/x86_64-linux/lib/stubs \
    && make install PYTHON=python3.11 VENV=/opt/cxrscale/.venv \
    && ldconfig \
    && rm -rf /root/.cache/pip

# --- runtime: the CUDA libraries and NCCL of the image, cuDNN, OpenMPI, sshd, and the built venv ------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
ARG CUDNN_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="cxrscale" \
      org.opencontainers.image.description="Train, evaluate, compress and serve chest X-ray classifiers on GPU clusters" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}"

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv openmpi-bin openssh-server \
        openssh-client "libcudnn9-cuda-12=${CUDNN_VERSION}" \
    && apt-mark hold libcudnn9-cuda-12 \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

# sshd for the MPIJob's worker pods (the operator mounts the keys in /root/.ssh); no host-key prompts
# between pods, as in Horovod's own images.
RUN mkdir -p /var/run/sshd \
    && sed -i 's/[ #]\(.*StrictHostKeyChecking \).*/ \1no/g' /etc/ssh/ssh_config \
    && echo "    UserKnownHostsFile /dev/null" >> /etc/ssh/ssh_config \
    && sed -i 's/#\(StrictModes \).*/\1no/g' /etc/ssh/sshd_config

COPY --from=build /opt/cxrscale /opt/cxrscale
ENV PATH=/opt/cxrscale/.venv/bin:${PATH} \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CXR_GIT_COMMIT=${GIT_COMMIT}
WORKDIR /workspace
CMD ["cxrscale", "--help"]
