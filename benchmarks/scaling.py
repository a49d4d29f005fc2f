"""python -m benchmarks.scaling: a performance model of Horovod data-parallel training, calibrated on this
machine and validated against published scaling numbers.

Model, per training step on N workers with b images each (every time in seconds):
  t_compute   = b x F_train / (P x f)      P peak FLOP/s of the device, f its achieved fraction; or a measured
                                           t_compute = b / (single-device images/s)
  F_train     = 3 x F_forward              all layers train (backward ~ 2 x forward)
              = F_forward + 2 x F_head     frozen base: the whole forward runs, only the head back-propagates
  G           = trainable parameters x 4 bytes (2 with fp16 compression)
  n_buffers   = ceil(G / fusion)           Horovod's tensor fusion buffer (HOROVOD_FUSION_THRESHOLD): 128 MB since
                                           Horovod 0.21 (the 0.28 installed here), 64 MB before
  B           = e x (intra-node bandwidth if N <= gpus_per_node else inter-node bandwidth), e the link efficiency
  t_allreduce = 2(N-1)/N x G / B + 2(N-1) x alpha x n_buffers            (ring allreduce)
  exposed     = max(0, t_allreduce - overlap x t_backward),  t_backward = 2/3 x t_compute
  jitter      = cv x E[max of N standard normals] x t_compute   the step waits for the slowest of N workers,
                                                               each worker's compute varying by cv
  cycle       = cycle_time / 2             the last gradients wait on average half of Horovod's background cycle
                                           (HOROVOD_CYCLE_TIME: 1 ms since 0.21, 5 ms before) for the next tick
  overhead    = o                          the per-step framework cost of N > 1 workers (negotiation, the
                                           synchronising allreduce of the optimizer state, launch gaps)
  step(N)     = t_compute + exposed + jitter + cycle + overhead     (all but t_compute are 0 for N = 1)
  images/s = N b / step;  efficiency = t_compute / step;  speed-up = N x efficiency.
So step(1) == t_compute exactly; with infinite bandwidth, zero latency, jitter, cycle and overhead the
efficiency is 1 at every N.

Constants:
  FLOPs: 2 FLOPs per multiply-add. VGG16 15.5 G multiply-adds at 224 px = 31.0 GFLOP forward, ResNet50 4.1 G =
    8.2 GFLOP, ResNet-101 7.8 G, Inception V3 5.7 G at 299 px (benchmarks/train.py's TensorFlow profiler counts
    30.8 and 7.7 GFLOP for the thesis's VGG16 and ResNet50).
  link efficiency e = 0.9: NCCL reaches 12.2 of 12.5 GB/s on a 100 Gb/s NIC (NVIDIA/nccl-tests#29) and 233 of
    300 GB/s over NVLink on 8 A100s (NVIDIA/nccl#1048); 0.9 sits between. alpha and f are per profile
    (benchmarks/profiles.json, each with its source); the fusion buffer and cycle time are Horovod's
    documented defaults of the version each published run used.
  Three free constants, fitted by least squares on published cases: overlap (in [0, 1]), cv and o. The
    report's error table is leave-one-out: every case is predicted by the constants fitted on all the
    others, so no case's error is judged on a fit that saw it. The thesis predictions use the constants
    fitted on every case, with an interval from the spread of the leave-one-out fits.

Calibration: `horovodrun -np 2 --gloo` times float32 allreduces of 1 KB .. 256 MB; a least-squares fit of
t(s) = a + s x 2(N-1)/N / B on relative residuals gives this machine's Gloo bandwidth B and latency a, used as
the profile "this machine (Gloo, loopback)" (one CPU core per worker). Its a is mostly Horovod's background
cycle (HOROVOD_CYCLE_TIME, 1 ms since 0.21), not Gloo: treat that profile's alpha as an upper bound.

Under tf.distribute (`distributed.train --backend tf`, MultiWorkerMirroredStrategy): the report's section
"Under tf.distribute" (TF_DISTRIBUTE_TERMS) says which terms carry over and which do not; the model is fitted
and validated on Horovod runs only.

Limits: input pipelines and clock throttling are not modelled apart from what cv and o absorb; the DGX-2 runs
lose more than any single set of constants explains (see the leave-one-out table). Every published case ran
Horovod before 0.21 (5 ms cycle) with steps of 0.1-0.5 s: o (about 5 ms) is applied unchanged to today's
profiles, so steps far shorter than those (the thesis's models on an A100) are predicted pessimistically,
which the leave-one-out interval does not show. The batch size of the
published 128/512-GPU runs is not stated with the chart: 64 per GPU is assumed, as in the 16-GPU table; with 32
(horovod/horovod#425) the VGG-16 predictions drop by about 30 pp. Ring latency grows as 2(N-1) alpha while NCCL
switches to trees at scale, so large-N predictions for small models are pessimistic.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import optimize as sciopt
from scipy import stats

from benchmarks.common import DEFAULT_RESULTS, HOROVODRUN, REPO, checks_table, machine, markdown_table, report
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli
from cxrscale.console import setup_logging
from cxrscale.files import read_json

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.

PROFILES_FILE = Path(__file__).with_name("profiles.json")
FUSION_MB = 128  # Horovod >= 0.21 (changelog, PR #2468); 64 MB in the 2017-2020 runs validated below
BACKWARD_SHARE = 2 / 3
LINK_EFFICIENCY = 0.9
WORKERS = [2**k for k in range(10)]  # 1 .. 512
CYCLE_MS = 1.0  # HOROVOD_CYCLE_TIME default since Horovod 0.21; 5 ms before
MACHINE = "this machine (Gloo, loopback)"


@dataclass(frozen=True)
class Workload:
    name: str
    forward_gflops: float  # per image, 2 FLOPs per multiply-add
    trainable_params: int
    head_gflops: float | None = None  # set when the base is frozen: only the head back-propagates
    batch: int = 32  # per worker, the thesis's default

    def train_flops(self) -> float:
        frozen = self.head_gflops is not None
        return 1e9 * (self.forward_gflops + 2 * self.head_gflops if frozen else 3 * self.forward_gflops)


# The thesis's models (distributed/model/builders.py): trainable parameters exclude BatchNorm moving statistics.
THESIS = (Workload("VGG16, frozen base (224 px)", 31.0, 25_693_186, head_gflops=2 * 25_693_186 / 1e9),
          Workload("ResNet50, all layers (224 px)", 8.2, 26_158_081),
          Workload("ResNet50, frozen base (224 px)", 8.2, 2_623_489, head_gflops=2 * 2_623_489 / 1e9))


# --- the model (pure functions) -------------------------------------------------------------------------

def gradient_bytes(params: float, compression: str | None = None) -> float:
    return params * (2 if compression == "fp16" else 4)


def compute_time(workload: Workload, profile: dict) -> float:
    return workload.batch * workload.train_flops() / (profile["peak_tflops"] * 1e12 * profile["achieved_fraction"])


def fusion_buffers(grad_bytes: float, fusion_mb: float = FUSION_MB) -> int:
    return max(1, math.ceil(grad_bytes / (fusion_mb * 2**20)))


def allreduce_time(grad_bytes: float, n: int, bandwidth_gbs: float, latency_us: float,
                   fusion_mb: float = FUSION_MB) -> float:
    """Ring allreduce of `grad_bytes` over n workers: bandwidth term plus 2(n-1) latency steps per fusion buffer."""
    if n == 1:
        return 0.0
    return (2 * (n - 1) / n * grad_bytes / (bandwidth_gbs * 1e9)
            + 2 * (n - 1) * latency_us * 1e-6 * fusion_buffers(grad_bytes, fusion_mb))


def link_gbs(profile: dict, n: int) -> float:
    """Effective bottleneck bandwidth: intra-node while the workers fit in one node, else the network."""
    raw = profile["intra_node_gbs"] if n <= profile["gpus_per_node"] else profile["inter_node_gbs"]
    if raw is None:
        raise ValueError(f"profile {profile['name']!r} has no inter-node network for {n} workers")
    return raw * profile.get("link_efficiency", LINK_EFFICIENCY)


@dataclass(frozen=True)
class Constants:
    """The model's three free constants (module docstring)."""

    overlap: float = 0.0       # share of the backward pass that hides communication
    jitter_cv: float = 0.0     # relative spread of one worker's compute time per step
    overhead_ms: float = 0.0   # per-step framework cost with more than one worker


@functools.lru_cache(maxsize=None)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1; 0.564 for 2; about sqrt(2 ln n) for large n)."""
    if n <= 1:
        return 0.0
    x = np.linspace(-10.0, 10.0, 20001)
    density = n * stats.norm.pdf(x) * stats.norm.cdf(x) ** (n - 1)
    return float(np.sum(x * density) * (x[1] - x[0]))


def scale(t_compute: float, grad_bytes: float, n: int, batch: int, profile: dict,
          constants: Constants | None = None) -> dict:
    """Step time, throughput and efficiency of n workers (the module docstring's formula)."""
    c = fitted_all() if constants is None else constants
    t_allreduce = allreduce_time(grad_bytes, n, link_gbs(profile, n), profile["latency_us"],
                                 profile.get("fusion_mb", FUSION_MB))
    exposed = max(0.0, t_allreduce - c.overlap * BACKWARD_SHARE * t_compute)
    many = n > 1
    jitter = c.jitter_cv * expected_max_normal(n) * t_compute
    cycle = profile.get("cycle_ms", CYCLE_MS) * 1e-3 / 2 if many else 0.0
    overhead = c.overhead_ms * 1e-3 if many else 0.0
    step = t_compute + exposed + jitter + cycle + overhead
    return {"workers": n, "compute_s": t_compute, "allreduce_s": t_allreduce, "exposed_comm_s": exposed,
            "jitter_s": jitter, "cycle_s": cycle, "overhead_s": overhead,
            "step_s": step, "images_per_second": n * batch / step, "efficiency": t_compute / step,
            "speedup": n * t_compute / step}


def predict(workload: Workload, profile: dict, constants: Constants | None = None) -> list[dict]:
    t_compute = compute_time(workload, profile)
    ns = [n for n in WORKERS if n <= profile["gpus_per_node"] or profile.get("inter_node_gbs")]
    return [{"profile": profile["name"], "workload": workload.name,
             **scale(t_compute, gradient_bytes(workload.trainable_params), n, workload.batch, profile, constants)}
            for n in ns]


def fit_allreduce(sizes: Sequence[float], seconds: Sequence[float], workers: int = 2) -> dict:
    """Least squares t(s) = a + s x 2(N-1)/N / B on relative residuals (1 KB counts as much as 256 MB)."""
    s, t = np.asarray(sizes, float), np.asarray(seconds, float)
    ring = 2 * (workers - 1) / workers
    design = np.column_stack([np.ones_like(s), ring * s]) / t[:, None]
    (a, inverse_b), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if inverse_b <= 0:
        raise RuntimeError(f"allreduce times do not grow with size (slope {inverse_b:.3g} s/B): no bandwidth to fit")
    fitted = a + ring * s * inverse_b
    return {"workers": workers, "latency_s": float(a), "bandwidth_gbs": float(1 / inverse_b / 1e9),
            "rms_relative_residual": float(np.sqrt(np.mean(((t - fitted) / t) ** 2))), "fitted_s": fitted.tolist()}


def load_profiles(path: Path) -> list[dict]:
    profiles = read_json(path, "profiles file").get("profiles")
    keys = {"name", "peak_tflops", "achieved_fraction", "gpus_per_node", "intra_node_gbs", "inter_node_gbs",
            "latency_us"}
    if not profiles or any(not isinstance(p, dict) or keys - p.keys() for p in profiles):
        raise CxrError(f"{path}: expected {{\"profiles\": [{{{', '.join(sorted(keys))}}}, ...]}}")
    return profiles


# --- validation against published numbers ---------------------------------------------------------------

HVD16 = ("Horovod README before PR #44 (Oct 2017, in that PR's diff): 4 servers x 4 Pascal GPUs, RoCE 25 Gbit/s, "
         "RDMA Horovod with NCCL, batch 64 per GPU")
HVD128 = "Horovod README, early 2018 (128-GPU chart): 32 servers x 4 Pascal GPUs, RoCE 25 Gbit/s"
HVD512 = ("Horovod README / docs/benchmarks.rst since PR #266 (2018): 128 servers x 4 Pascal GPUs, RoCE 25 Gbit/s "
          "(Sergeev & Del Balso, arXiv:1802.05799)")
NV = ("NVIDIA DeepLearningExamples TensorFlow/Classification/ConvNets/resnet50v1.5/README.md (20.06-tf1 container, "
      "XLA): weak scaling")
NVX = ("NVIDIA DeepLearningExamples TensorFlow/Classification/ConvNets/resnext101-32x4d/README.md (20.06-tf1 "
       "container, XLA): weak scaling")
# Horovod's defaults in the version each run used: 2017-2018 Horovod and the 20.06 NGC container's 0.19 fused
# into 64 MB buffers every 5 ms (HOROVOD_FUSION_THRESHOLD, HOROVOD_CYCLE_TIME; 128 MB and 1 ms since 0.21).
PRE_021 = {"fusion_mb": 64, "cycle_ms": 5.0}
# (case, source, profile, parameters, batch per GPU, single-GPU images/s at that batch, GPUs, published efficiency)
_CASES = [(f"{net}, {n} GPUs", src, "pascal-25g-roce", params, 64, ips, n, eff)
          for n, src, effs in ((16, HVD16, (2022.6 / (16 * 134.4), 1746.2 / (16 * 119.4), 1787.4 / (16 * 130.9))),
                               (128, HVD128, (0.90, 0.90, 0.79)), (512, HVD512, (0.90, 0.90, 0.68)))
          for (net, params, ips), eff in zip((("Inception V3", 23.8e6, 134.4), ("ResNet-101", 44.5e6, 119.4),
                                              ("VGG-16", 138e6, 130.9)), effs)]
_CASES += [(f"{net} {prec}, {hw}", src, profile, params, batch, ips, n, speedup / n)
           for net, src, params, table in (
               ("ResNet-50", NV, 25.6e6, (
                   ("FP32", "DGX-1 8x V100", "100 Gb InfiniBand", 128, 412, 8, 7.69),
                   ("AMP", "DGX-1 8x V100", "100 Gb InfiniBand", 256, 1270, 8, 7.48),
                   ("FP32", "DGX-2 16x V100", "16x V100 NVSwitch", 128, 432, 16, 15.05),
                   ("AMP", "DGX-2 16x V100", "16x V100 NVSwitch", 256, 1300, 16, 13.27),
                   ("TF32", "DGX A100 8x A100", "8x A100 NVLink", 256, 909, 8, 7.70),
                   ("AMP", "DGX A100 8x A100", "8x A100 NVLink", 256, 2375, 8, 7.32))),
               ("ResNeXt101-32x4d", NVX, 44.18e6, (
                   ("FP32", "DGX-1 8x V100", "100 Gb InfiniBand", 64, 166, 8, 7.29),
                   ("AMP", "DGX-1 8x V100", "100 Gb InfiniBand", 128, 566, 8, 7.35),
                   ("FP32", "DGX-2 16x V100", "16x V100 NVSwitch", 64, 170, 16, 14.70),
                   ("AMP", "DGX-2 16x V100", "16x V100 NVSwitch", 128, 572, 16, 13.55),
                   ("TF32", "DGX A100 8x A100", "8x A100 NVLink", 128, 371, 8, 7.69),
                   ("AMP", "DGX A100 8x A100", "8x A100 NVLink", 256, 1132, 8, 7.51))))
           for prec, hw, profile, batch, ips, n, speedup in table]
CASES = [dict(zip(("case", "source", "profile", "params", "batch", "single_images_per_second", "workers",
                   "published"), c), horovod=PRE_021) for c in _CASES]
DEFAULT_PROFILES = {p["name"]: p for p in load_profiles(PROFILES_FILE)}


def case_efficiency(case: dict, constants: Constants, profiles: dict[str, dict] = DEFAULT_PROFILES) -> float:
    """The model's efficiency for a published case: compute time from its published single-GPU rate, Horovod's
    defaults of the version it ran."""
    return scale(case["batch"] / case["single_images_per_second"], gradient_bytes(case["params"]),
                 case["workers"], case["batch"], {**profiles[case["profile"]], **case.get("horovod", {})},
                 constants)["efficiency"]


BOUNDS = ([0.0, 0.0, 0.0], [1.0, 0.2, 100.0])  # overlap, jitter cv, overhead ms


def fit_constants(cases: Sequence[dict], profiles: dict[str, dict] = DEFAULT_PROFILES) -> Constants:
    """Least squares on the efficiency errors (in points) of `cases`, within BOUNDS; raises if it fails."""
    def residuals(v):
        c = Constants(*v)
        return [100 * (case_efficiency(case, c, profiles) - case["published"]) for case in cases]

    result = sciopt.least_squares(residuals, x0=[0.5, 0.01, 5.0], bounds=BOUNDS, x_scale=[0.5, 0.01, 5.0])
    if not result.success:
        raise RuntimeError(f"fitting the scaling model's constants failed: {result.message}")
    return Constants(*map(float, result.x))


def leave_one_out(cases: Sequence[dict] = CASES, profiles: dict[str, dict] = DEFAULT_PROFILES) -> list[dict]:
    """Every case predicted by the constants fitted on all the other cases."""
    rows = []
    for i, case in enumerate(cases):
        constants = fit_constants([c for j, c in enumerate(cases) if j != i], profiles)
        predicted = case_efficiency(case, constants, profiles)
        rows.append({**case, "predicted": predicted, "error_pp": 100 * (predicted - case["published"]),
                     "relative_error": (predicted - case["published"]) / case["published"],
                     "constants": asdict(constants)})
    return rows


def validate(cases: Sequence[dict] = CASES, constants: Constants | None = None,
             profiles: dict[str, dict] = DEFAULT_PROFILES) -> list[dict]:
    """Every published case next to the model's efficiency with the given (default: all-case) constants."""
    c = fitted_all() if constants is None else constants
    rows = []
    for case in cases:
        predicted = case_efficiency(case, c, profiles)
        rows.append({**case, "predicted": predicted, "error_pp": 100 * (predicted - case["published"]),
                     "relative_error": (predicted - case["published"]) / case["published"]})
    return rows


@functools.lru_cache(maxsize=1)
def fitted_all() -> Constants:
    """The constants fitted on every published case: what the predictions use."""
    return fit_constants(CASES)


# --- calibration on this machine -------------------------------------------------------------------------

def child_allreduce(sizes: list[int], reps: int, warmup: int) -> dict | None:
    """Runs under horovodrun: median time of float32 allreduces per size, and matmul FLOP/s per worker."""
    from distributed.model.kerasenv import keras  # noqa: F401 (picks Keras before TensorFlow loads)
    import tensorflow as tf
    import horovod.tensorflow as hvd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    seconds = []
    for size in sizes:
        x = tf.ones((size // 4,), tf.float32)
        times = []
        for i in range(warmup + reps):
            start = time.perf_counter()
            total = hvd.allreduce(x, op=hvd.Sum)[:1].numpy()[0]
            times.append(time.perf_counter() - start)
            if total != hvd.size():
                raise RuntimeError(f"allreduce of ones gave {total}, not {hvd.size()}")
        seconds.append(statistics.median(times[warmup:]))
    a = tf.random.normal((1024, 1024))
    tf.linalg.matmul(a, a).numpy()
    hvd.allreduce(tf.zeros(1))  # both workers start the matmuls together: FLOP/s of one core while both run
    start = time.perf_counter()
    for _ in range(10):
        c = tf.linalg.matmul(a, a)
    c.numpy()
    gflops = 10 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
    conv = conv_training_gflops(tf)
    if hvd.rank() != 0:
        return None
    return {"workers": hvd.size(), "bytes": sizes, "seconds": seconds, "reps": reps, "warmup": warmup,
            "matmul_gflops_per_worker": gflops, "conv_training_gflops_per_worker": conv,
            "achieved_fraction": conv / gflops}


def conv_training_gflops(tf) -> float:
    """FLOP/s of a training step (forward and both gradients) of a ResNet-style 3x3 convolution, 64 -> 64
    channels on 8 images of 56 x 56: the share of matmul FLOP/s that CNN training reaches on this CPU."""
    x = tf.random.normal((8, 56, 56, 64))
    w = tf.Variable(tf.random.normal((3, 3, 64, 64), stddev=0.05))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, w, 1, "SAME")
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, w])

    [g.numpy() for g in step()]  # trace and warm up
    flops = 3 * 2 * 8 * 56 * 56 * 64 * 64 * 9  # forward, input gradient, weight gradient
    start = time.perf_counter()
    for _ in range(5):
        grads = step()
    [g.numpy() for g in grads]
    return 5 * flops / (time.perf_counter() - start) / 1e9


def run_allreduce(sizes: Sequence[int], reps: int, warmup: int = 2, workers: int = 2, timeout: float = 1800,
                  log: Path | None = None) -> dict:
    """`horovodrun -np workers --gloo` the allreduce child; its rank 0 prints JSON on its last stdout line."""
    cmd = [HOROVODRUN, "-np", str(workers), "--gloo", sys.executable, "-m", "benchmarks.scaling", "--child",
           "allreduce", "--sizes", ",".join(map(str, sizes)), "--reps", str(reps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1"))
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if "{" in line]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"allreduce benchmark failed ({proc.returncode}):\n{tail}")
    return json.loads(lines[-1][lines[-1].index("{"):])  # horovodrun prefixes "[0]<stdout>:"


def machine_profile(calibration: dict) -> dict:
    fit, n = calibration["fit"], calibration["workers"]
    return {"name": MACHINE, "device": f"{machine().get('cpu_model', 'CPU')}, one core per worker, fp32",
            "peak_tflops": calibration["matmul_gflops_per_worker"] / 1e3,
            "achieved_fraction": round(calibration["achieved_fraction"], 3),
            "gpus_per_node": n, "intra_node_gbs": fit["bandwidth_gbs"], "inter_node_gbs": None,
            "latency_us": max(fit["latency_s"], 0.0) / (2 * (n - 1)) * 1e6, "link_efficiency": 1.0,
            "cycle_ms": CYCLE_MS,
            "source": "calibrated here: fitted Gloo bandwidth and latency a = 2(N-1) alpha, matmul FLOP/s per worker, "
                      "achieved fraction = a convolution training step's FLOP/s / matmul FLOP/s, both measured"}


# --- suite protocol ---------------------------------------------------------------------------------------

def run_suite(quick: bool, work: Path, profiles_file: Path | None = None) -> dict:
    sizes = [1024 * 4**k for k in range(9 if quick else 10)]  # 1 KB .. 64 MB (quick) or 256 MB
    calibration = run_allreduce(sizes, reps=5 if quick else 10, log=Path(work) / "horovodrun-allreduce.log")
    return assemble(calibration, load_profiles(profiles_file or PROFILES_FILE), quick)


def assemble(calibration: dict, profiles: list[dict], quick: bool = False) -> dict:
    """Fit the calibration, add this machine's profile, fit the constants (all cases and leave-one-out),
    predict every workload on every profile with its interval, validate."""
    calibration = {**calibration, "fit": fit_allreduce(calibration["bytes"], calibration["seconds"],
                                                       calibration["workers"])}
    profiles = [*profiles, machine_profile(calibration)]
    loo = leave_one_out()
    spread = [Constants(**r["constants"]) for r in loo]
    predictions = []
    for w in THESIS:
        for p in profiles:
            rows = predict(w, p)
            bounds = [predict(w, p, c) for c in spread]
            for i, row in enumerate(rows):
                effs = [row["efficiency"], *(b[i]["efficiency"] for b in bounds)]
                predictions.append({**row, "efficiency_low": min(effs), "efficiency_high": max(effs)})
    batch32 = [{**c, "batch": 32} if c["workers"] >= 128 else c for c in CASES]
    return {"quick": quick, "calibration": calibration, "profiles": profiles,
            "constants": {"fusion_mb": FUSION_MB, "cycle_ms": CYCLE_MS, "backward_share": BACKWARD_SHARE,
                          "link_efficiency": LINK_EFFICIENCY, "fitted_on_all_cases": asdict(fitted_all()),
                          "cases": len(CASES)},
            "workloads": [asdict(w) for w in THESIS], "predictions": predictions,
            "leave_one_out": loo, "validation": validate(),
            # horovod/horovod#425: the maintainers say 32 images per worker; the 16-GPU table says 64
            "validation_batch32_at_scale": validate(batch32)}


def _check(name: str, measured: float, goal: str, ok: bool) -> dict:
    return {"name": name, "goal": goal, "measured": round(measured, 4), "status": "met" if ok else "NOT MET"}


def summarise(results: dict) -> tuple[list[dict], str]:
    cal, fit, loo = results["calibration"], results["calibration"]["fit"], results["leave_one_out"]
    errors = [abs(v["error_pp"]) for v in loo]
    checks = [_check("calibration fit RMS relative residual", fit["rms_relative_residual"], "<= 0.25",
                     fit["rms_relative_residual"] <= 0.25),
              _check("leave-one-out max abs error (pp)", max(errors), "<= 5 pp", max(errors) <= 5)]
    const = results["constants"]
    c = const["fitted_on_all_cases"]
    md = ["Model: step = t_compute + max(0, t_allreduce - overlap x 2/3 t_compute) + cv x E[max of N normals] x "
          "t_compute + cycle/2 + o; ring allreduce in Horovod's fusion buffers (formula and sources in "
          f"`benchmarks/scaling.py`). Link efficiency {const['link_efficiency']}. Constants fitted by least squares "
          f"on all {const['cases']} published cases: **overlap {c['overlap']:.2f}, cv {c['jitter_cv']:.3f}, "
          f"o {c['overhead_ms']:.1f} ms**; the errors below are leave-one-out (each case predicted by a fit on the "
          "others), and the intervals of the predictions are the range over those fits.",
          f"\n### Calibration: `horovodrun -np {cal['workers']} --gloo`, float32 allreduce (median of {cal['reps']})\n",
          markdown_table(["size", "measured ms", "fit ms"],
                         [[_size(s), f"{1e3 * t:.3f}", f"{1e3 * f:.3f}"]
                          for s, t, f in zip(cal["bytes"], cal["seconds"], fit["fitted_s"])]),
          f"\nFit t = a + s x 2(N-1)/N / B: **B = {fit['bandwidth_gbs']:.2f} GB/s, "
          f"a = {1e6 * fit['latency_s']:.0f} us**, RMS relative residual {100 * fit['rms_relative_residual']:.0f} %. "
          f"Per worker: matmul {cal['matmul_gflops_per_worker']:.0f} GFLOP/s, a convolution training step "
          f"{cal['conv_training_gflops_per_worker']:.0f} GFLOP/s (achieved fraction "
          f"{cal['achieved_fraction']:.2f}, both measured in this run). The small-size floor is Horovod's "
          "background cycle (1 ms) plus scheduling on this shared machine, not Gloo's own latency.",
          "\n### Hardware profiles\n",
          markdown_table(["profile", "device", "peak TFLOP/s x achieved", "GPUs/node", "intra GB/s", "inter GB/s",
                          "alpha us"],
                         [[p["name"], p.get("device", ""), f"{p['peak_tflops']:.3g} x {p['achieved_fraction']}",
                           p["gpus_per_node"], f"{p['intra_node_gbs']:.3g}",
                           "-" if p["inter_node_gbs"] is None else f"{p['inter_node_gbs']:.3g}",
                           f"{p['latency_us']:.3g}"] for p in results["profiles"]])]
    names = [p["name"] for p in results["profiles"]]
    for w in results["workloads"]:
        at = {(r["profile"], r["workers"]): r for r in results["predictions"] if r["workload"] == w["name"]}
        md += [f"\n### {w['name']}: efficiency [leave-one-out range] (images/s), {w['batch']} images per worker, "
               f"{w['trainable_params'] / 1e6:.1f} M parameters reduced\n",
               markdown_table(["N", *names], [[n, *(_efficiency(at[p, n]) if (p, n) in at else "-" for p in names)]
                                              for n in WORKERS])]
    in_sample = {v["case"]: v for v in results["validation"]}
    md += ["\n### Validation: leave-one-out error against published scaling efficiency\n",
           markdown_table(["case", "published", "predicted (fit without it)", "error pp", "in-sample error pp",
                           "constants of that fit (overlap, cv, o ms)"],
                          [[v["case"], f"{100 * v['published']:.1f} %", f"{100 * v['predicted']:.1f} %",
                            f"{v['error_pp']:+.1f}", f"{in_sample[v['case']]['error_pp']:+.1f}",
                            f"{v['constants']['overlap']:.2f}, {v['constants']['jitter_cv']:.3f}, "
                            f"{v['constants']['overhead_ms']:.1f}"] for v in loo]),
           f"\nLeave-one-out: max abs error {max(errors):.1f} pp, mean abs {statistics.mean(errors):.1f} pp, "
           f"mean signed {statistics.mean(v['error_pp'] for v in loo):+.1f} pp; "
           f"{sum(e > 5 for e in errors)} of {len(errors)} cases beyond 5 pp"
           + (" (" + ", ".join(v["case"] for v in loo if abs(v["error_pp"]) > 5) + ")" if max(errors) > 5 else "")
           + ". If the 128/512-GPU runs used 32 images per GPU (as the maintainers said in horovod/horovod#425; "
           "the 16-GPU table says 64 and 64 is assumed above), the all-case fit gives "
           + ", ".join(f"{v['case']} {100 * v['predicted']:.0f} % ({v['error_pp']:+.0f} pp)"
                       for v in results["validation_batch32_at_scale"] if v["workers"] >= 128 and "VGG" in v["case"])
           + ".\n\nSources: "
           + "; ".join(f"[{i + 1}] {s}" for i, s in enumerate(dict.fromkeys(v["source"] for v in loo))),
           "\n### Under tf.distribute (`distributed.train --backend tf`)\n",
           "The model above is Horovod's. For MultiWorkerMirroredStrategy, term by term (from tf.distribute's "
           "code; not fitted here):\n",
           markdown_table(["term", "under tf.distribute", "why"], [list(row) for row in TF_DISTRIBUTE_TERMS]),
           "\n" + checks_table(checks)]
    return checks, "\n".join(md)


# Which of the model's terms hold for `--backend tf` (tf.distribute's MultiWorkerMirroredStrategy), from its
# code in the TensorFlow installed here (cross_device_ops, cross_device_utils.group_by_size) and its
# CommunicationOptions; not fitted or measured by this suite (benchmarks.train measures both backends).
TF_DISTRIBUTE_TERMS = [
    ("t_compute, F_train", "carry over", "the same model, batch and kernels"),
    ("ring all-reduce 2(N-1)/N x G / B", "carries over",
     "RING collectives on CPU (over gRPC instead of Gloo: B and alpha need their own calibration), NCCL on GPUs "
     "(the library Horovod's GPU build uses, so a GPU profile's B and alpha hold)"),
    ("n_buffers (Horovod's fusion buffer)", "replaced",
     "gradients go in packs of CommunicationOptions(bytes_per_pack); the default 0 puts every gradient in one "
     "pack: n_buffers = 1"),
    ("overlap", "does not carry over by default",
     "with one pack the all-reduce waits for the last gradient, so overlap = 0 and the whole t_allreduce is "
     "exposed; bytes_per_pack > 0 lets earlier packs start as their gradients are ready, in graph order"),
    ("cycle (HOROVOD_CYCLE_TIME)", "does not carry over",
     "no background negotiation thread: the collectives are ops in the step's graph, cycle = 0"),
    ("jitter cv", "carries over", "every step still waits for the slowest worker"),
    ("overhead o", "different value",
     "tf.distribute's own per-step cost (its collective launch, no negotiation): fit it on tf runs before use"),
]


def _efficiency(row: dict) -> str:
    return (f"{100 * row['efficiency']:.0f} % [{100 * row['efficiency_low']:.0f}-{100 * row['efficiency_high']:.0f}]"
            f" ({_rate(row)})")


def _rate(row: dict) -> str:
    return f"{row['images_per_second']:,.0f}" if row["images_per_second"] >= 100 else f"{row['images_per_second']:.2g}"


def _size(n: float) -> str:
    return next(f"{n / 2**k:g} {u}" for k, u in ((30, "GB"), (20, "MB"), (10, "KB"), (0, "B")) if n >= 2**k or k == 0)


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from cxrscale.figures import STYLE, save_figure

    out_dir = Path(out_dir)
    paths = []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(results["workloads"]), figsize=(15, 4.8), sharey=True)
        for ax, w in zip(axes, results["workloads"]):
            for i, p in enumerate(results["profiles"]):
                rows = [r for r in results["predictions"] if r["workload"] == w["name"] and r["profile"] == p["name"]]
                ax.plot([r["workers"] for r in rows], [100 * r["efficiency"] for r in rows], "o-", ms=3.5,
                        color=f"C{i}", label=p["name"])
                ax.fill_between([r["workers"] for r in rows], [100 * r["efficiency_low"] for r in rows],
                                [100 * r["efficiency_high"] for r in rows], color=f"C{i}", alpha=0.15, lw=0)
            ax.set(title=w["name"], xlabel="workers N", ylim=(0, 105))
            ax.set_xscale("log", base=2)
            ax.set_xticks(WORKERS, [str(n) for n in WORKERS])
        axes[0].set_ylabel("scaling efficiency (%)")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(results["profiles"]),
                   bbox_to_anchor=(0.5, -0.08))
        c = results["constants"]["fitted_on_all_cases"]
        fig.suptitle(f"Predicted Horovod scaling (overlap {c['overlap']:.2f}, cv {c['jitter_cv']:.3f}, "
                     f"o {c['overhead_ms']:.1f} ms)")
        paths.append(save_figure(fig, out_dir / "scaling-efficiency.png"))

        cal, fit = results["calibration"], results["calibration"]["fit"]
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        ax.loglog(cal["bytes"], cal["seconds"], "o", label="measured (median)")
        s = np.geomspace(min(cal["bytes"]), max(cal["bytes"]), 100)
        ring = 2 * (cal["workers"] - 1) / cal["workers"]
        ax.loglog(s, fit["latency_s"] + ring * s / (fit["bandwidth_gbs"] * 1e9), "-",
                  label=f"fit: a = {1e6 * fit['latency_s']:.0f} us, B = {fit['bandwidth_gbs']:.2f} GB/s")
        ax.set(xlabel="allreduce size (bytes, float32)", ylabel="time per allreduce (s)",
               title=f"Gloo allreduce on this machine, {cal['workers']} workers")
        ax.legend()
        paths.append(save_figure(fig, out_dir / "scaling-calibration.png"))

        val = results["leave_one_out"]
        fig, ax = plt.subplots(figsize=(8.0, 0.38 * len(val) + 1.4))
        y = np.arange(len(val))[::-1]
        published, model = [100 * v["published"] for v in val], [100 * v["predicted"] for v in val]
        ax.hlines(y, published, model, color="grey", lw=1.5)
        ax.plot(published, y, "o", color="C0", label="published")
        ax.plot(model, y, "x", color="C3", ms=8, mew=2, label="model, fitted without the case")
        ax.set_yticks(y, [v["case"] for v in val])
        ax.set(xlabel="scaling efficiency (%)", xlim=(60, 102),
               title=f"Leave-one-out validation: max |error| {max(abs(v['error_pp']) for v in val):.1f} pp")
        ax.legend(loc="lower left")
        paths.append(save_figure(fig, out_dir / "scaling-validation.png"))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python -m benchmarks.scaling --quick\n"
                                       "  python -m benchmarks.scaling --profiles my-cluster.json --out /tmp/scaling")
    p.add_argument("--quick", action="store_true", help="calibrate up to 64 MB with 5 repetitions (default 256 MB, 10)")
    p.add_argument("--profiles", type=Path, default=None,
                   help=f"JSON file of hardware profiles to predict for (default {PROFILES_FILE.name}; format there)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="folder for the results and plots")
    p.add_argument("--child", choices=("allreduce",), help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        result = child_allreduce([int(s) for s in args.sizes.split(",")], args.reps, args.warmup)
        if result is not None:
            print(json.dumps(result))
        return 0
    setup_logging()
    if args.profiles is not None:
        load_profiles(args.profiles)  # a bad file fails before the calibration runs
    with tempfile.TemporaryDirectory(prefix="cxr-bench-scaling-") as work:
        results = run_suite(args.quick, Path(work), args.profiles)
    report(args.out, "scaling", results, summarise)
    for path in plots(results, args.out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
