"""python -m benchmarks.scaling: a performance model of Horovod data-parallel training, calibrated on this
machine and validated against published scaling numbers.

Model, per training step on N workers with b images each (every time in seconds):
  t_compute   = b x F_train / (P x f)      P peak FLOP/s of the device, f its achieved fraction; or a measured
                                           t_compute = b / (single-device images/s)
  F_train     = 3 x F_forward              all layers train (backward ~ 2 x forward)
              = F_forward + 2 x F_head     frozen base: the whole forward runs, only the head back-propagates
  G           = trainable parameters x 4 bytes (2 with fp16 compression)
  n_buffers   = ceil(G / fusion)           Horovod's tensor fusion buffer (HOROVOD_FUSION_THRESHOLD): 128 MB since
                                           Horovod 0.21 (the 0.28 installed here), 64 MB before (profile fusion_mb)
  B           = e x (intra-node bandwidth if N <= gpus_per_node else inter-node bandwidth), e the link efficiency
  t_allreduce = 2(N-1)/N x G / B + 2(N-1) x alpha x n_buffers            (ring allreduce; 0 for N = 1)
  exposed     = max(0, t_allreduce - overlap x t_backward),  t_backward = 2/3 x t_compute
  step(N)     = t_compute + exposed;  images/s = N b / step;  efficiency = t_compute / step;  speed-up = N x eff.
So step(1) == t_compute exactly, and infinite bandwidth with zero latency gives efficiency 1 at every N.

Constants (none is tuned per case):
  FLOPs: 2 FLOPs per multiply-add. VGG16 15.5 G multiply-adds at 224 px = 31.0 GFLOP forward, ResNet50 4.1 G =
    8.2 GFLOP, ResNet-101 7.8 G, Inception V3 5.7 G at 299 px (benchmarks/train.py's TensorFlow profiler counts
    30.8 and 7.7 GFLOP for the thesis's VGG16 and ResNet50).
  link efficiency e = 0.9: NCCL reaches 12.2 of 12.5 GB/s on a 100 Gb/s NIC (NVIDIA/nccl-tests#29) and 233 of
    300 GB/s over NVLink on 8 A100s (NVIDIA/nccl#1048); 0.9 sits between. alpha and f are per profile
    (benchmarks/profiles.json, each with its source).
  overlap: fitted on ONE published case, VGG-16 on 16 GPUs over 25 Gbit RoCE (CALIBRATION_CASE), and used
    unchanged everywhere else. VGG-16 is the case where communication is large enough to pin it down;
    in principle it is below 1 because the first layers' gradients are ready only at the very end of backward.

Calibration: `horovodrun -np 2 --gloo` times float32 allreduces of 1 KB .. 256 MB; a least-squares fit of
t(s) = a + s x 2(N-1)/N / B on relative residuals gives this machine's Gloo bandwidth B and latency a, used as
the profile "this machine (Gloo, loopback)" (one CPU core per worker). Its a is mostly Horovod's background
cycle (HOROVOD_CYCLE_TIME, 1 ms since 0.21), not Gloo: treat that profile's alpha as an upper bound.

Limits: the model only knows communication. Losses from input pipelines, stragglers or clock throttling are
missing, so it is optimistic for compute-bound networks (see the validation table). The batch size of the
published 128/512-GPU runs is not stated with the chart: 64 per GPU is assumed, as in the 16-GPU table; with 32
(horovod/horovod#425) the VGG-16 predictions drop by about 30 pp. Ring latency grows as 2(N-1) alpha while NCCL
switches to trees at scale, so large-N predictions for small models are pessimistic.
"""
from __future__ import annotations

import argparse
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

from benchmarks.common import DEFAULT_RESULTS, checks_table, machine, markdown_table, report
from launch.runtime import CxrError, OneLineParser, read_json, run_cli, setup_logging

# The toolkit's TensorFlow-heavy modules are imported inside the functions that use them, not here: a
# suite's driver process times and measures its children, and must not carry TensorFlow itself.

REPO = Path(__file__).resolve().parents[1]
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")
PROFILES_FILE = Path(__file__).with_name("profiles.json")
FUSION_MB = 128  # Horovod >= 0.21 (changelog, PR #2468); 64 MB in the 2017-2020 runs validated below
BACKWARD_SHARE = 2 / 3
LINK_EFFICIENCY = 0.9
WORKERS = [2**k for k in range(10)]  # 1 .. 512
MACHINE = "this machine (Gloo, loopback)"
MACHINE_ACHIEVED = 0.7  # benchmarks/train.py measured 0.68-0.89 of matmul FLOP/s for fp32 ResNet50 / VGG16 here


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


def scale(t_compute: float, grad_bytes: float, n: int, batch: int, profile: dict, overlap: float | None = None) -> dict:
    """Step time, throughput and efficiency of n workers (the module docstring's formula)."""
    overlap = profile.get("overlap", OVERLAP) if overlap is None else overlap
    t_allreduce = allreduce_time(grad_bytes, n, link_gbs(profile, n), profile["latency_us"],
                                 profile.get("fusion_mb", FUSION_MB))
    exposed = max(0.0, t_allreduce - overlap * BACKWARD_SHARE * t_compute)
    step = t_compute + exposed
    return {"workers": n, "compute_s": t_compute, "allreduce_s": t_allreduce, "exposed_comm_s": exposed,
            "step_s": step, "images_per_second": n * batch / step, "efficiency": t_compute / step,
            "speedup": n * t_compute / step}


def predict(workload: Workload, profile: dict, overlap: float | None = None) -> list[dict]:
    t_compute = compute_time(workload, profile)
    ns = [n for n in WORKERS if n <= profile["gpus_per_node"] or profile.get("inter_node_gbs")]
    return [{"profile": profile["name"], "workload": workload.name,
             **scale(t_compute, gradient_bytes(workload.trainable_params), n, workload.batch, profile, overlap)}
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
NV = ("NVIDIA DeepLearningExamples TensorFlow/Classification/ConvNets/resnet50v1.5/README.md (20.06 container, "
      "XLA): weak scaling")
# (case, source, profile, parameters, batch per GPU, single-GPU images/s at that batch, GPUs, published efficiency)
_CASES = [(f"{net}, {n} GPUs", src, "pascal-25g-roce", params, 64, ips, n, eff)
          for n, src, effs in ((16, HVD16, (2022.6 / (16 * 134.4), 1746.2 / (16 * 119.4), 1787.4 / (16 * 130.9))),
                               (128, HVD128, (0.90, 0.90, 0.79)), (512, HVD512, (0.90, 0.90, 0.68)))
          for (net, params, ips), eff in zip((("Inception V3", 23.8e6, 134.4), ("ResNet-101", 44.5e6, 119.4),
                                              ("VGG-16", 138e6, 130.9)), effs)]
_CASES += [(f"ResNet-50 {prec}, {hw}", NV, profile, 25.6e6, batch, ips, n, speedup / n)
           for prec, hw, profile, batch, ips, n, speedup in (
               ("FP32", "DGX-1 8x V100", "100 Gb InfiniBand", 128, 412, 8, 7.69),
               ("AMP", "DGX-1 8x V100", "100 Gb InfiniBand", 256, 1270, 8, 7.48),
               ("FP32", "DGX-2 16x V100", "16x V100 NVSwitch", 128, 432, 16, 15.05),
               ("AMP", "DGX-2 16x V100", "16x V100 NVSwitch", 256, 1300, 16, 13.27),
               ("TF32", "DGX A100 8x A100", "8x A100 NVLink", 256, 909, 8, 7.70),
               ("AMP", "DGX A100 8x A100", "8x A100 NVLink", 256, 2375, 8, 7.32))]
CASES = [dict(zip(("case", "source", "profile", "params", "batch", "single_images_per_second", "workers",
                   "published"), c)) for c in _CASES]
CALIBRATION_CASE = "VGG-16, 16 GPUs"
DEFAULT_PROFILES = {p["name"]: p for p in load_profiles(PROFILES_FILE)}


def overlap_from(case: dict, profile: dict) -> float:
    """The overlap at which the model reproduces `case` exactly, clamped to [0, 1]."""
    t_compute = case["batch"] / case["single_images_per_second"]
    t_allreduce = scale(t_compute, gradient_bytes(case["params"]), case["workers"], case["batch"], profile,
                        overlap=0.0)["allreduce_s"]
    exposed = t_compute * (1 / case["published"] - 1)
    return min(1.0, max(0.0, (t_allreduce - exposed) / (BACKWARD_SHARE * t_compute)))


_calibration = next(c for c in CASES if c["case"] == CALIBRATION_CASE)
OVERLAP = overlap_from(_calibration, DEFAULT_PROFILES[_calibration["profile"]])


def validate(cases: Sequence[dict] = CASES, profiles: dict[str, dict] = DEFAULT_PROFILES,
             overlap: float | None = None) -> list[dict]:
    """Every published case next to the model's efficiency (compute time from the published single-GPU rate)."""
    rows = []
    for c in cases:
        model = scale(c["batch"] / c["single_images_per_second"], gradient_bytes(c["params"]), c["workers"],
                      c["batch"], profiles[c["profile"]], overlap)["efficiency"]
        rows.append({**c, "predicted": model, "error_pp": 100 * (model - c["published"]),
                     "relative_error": (model - c["published"]) / c["published"],
                     "calibration": c["case"] == CALIBRATION_CASE})
    return rows


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
    if hvd.rank() != 0:
        return None
    return {"workers": hvd.size(), "bytes": sizes, "seconds": seconds, "reps": reps, "warmup": warmup,
            "matmul_gflops_per_worker": gflops}


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
            "peak_tflops": calibration["matmul_gflops_per_worker"] / 1e3, "achieved_fraction": MACHINE_ACHIEVED,
            "gpus_per_node": n, "intra_node_gbs": fit["bandwidth_gbs"], "inter_node_gbs": None,
            "latency_us": max(fit["latency_s"], 0.0) / (2 * (n - 1)) * 1e6, "link_efficiency": 1.0,
            "source": "calibrated here: fitted Gloo bandwidth and latency a = 2(N-1) alpha, matmul FLOP/s per worker"}


# --- suite protocol ---------------------------------------------------------------------------------------

def run_suite(quick: bool, work: Path, profiles_file: Path | None = None) -> dict:
    sizes = [1024 * 4**k for k in range(9 if quick else 10)]  # 1 KB .. 64 MB (quick) or 256 MB
    calibration = run_allreduce(sizes, reps=5 if quick else 10, log=Path(work) / "horovodrun-allreduce.log")
    return assemble(calibration, load_profiles(profiles_file or PROFILES_FILE), quick)


def assemble(calibration: dict, profiles: list[dict], quick: bool = False) -> dict:
    """Fit the calibration, add this machine's profile, predict every workload on every profile, validate."""
    calibration = {**calibration, "fit": fit_allreduce(calibration["bytes"], calibration["seconds"],
                                                       calibration["workers"])}
    profiles = [*profiles, machine_profile(calibration)]
    return {"quick": quick, "calibration": calibration, "profiles": profiles,
            "constants": {"fusion_mb": FUSION_MB, "backward_share": BACKWARD_SHARE,
                          "link_efficiency": LINK_EFFICIENCY, "overlap": OVERLAP,
                          "overlap_fitted_on": CALIBRATION_CASE, "machine_achieved_fraction": MACHINE_ACHIEVED},
            "workloads": [asdict(w) for w in THESIS],
            "predictions": [row for w in THESIS for p in profiles for row in predict(w, p)],
            "validation": validate(),
            # horovod/horovod#425: the maintainers say 32 images per worker; the 16-GPU table says 64
            "validation_batch32_at_scale": validate([{**c, "batch": 32} if c["workers"] >= 128 else c for c in CASES])}


def _check(name: str, measured: float, goal: str, ok: bool) -> dict:
    return {"name": name, "goal": goal, "measured": round(measured, 4), "status": "met" if ok else "NOT MET"}


def summarise(results: dict) -> tuple[list[dict], str]:
    cal, fit, val = results["calibration"], results["calibration"]["fit"], results["validation"]
    errors = [abs(v["error_pp"]) for v in val]
    checks = [_check("calibrated Gloo bandwidth > 0", fit["bandwidth_gbs"], "> 0 GB/s", fit["bandwidth_gbs"] > 0),
              _check("calibration fit RMS relative residual", fit["rms_relative_residual"], "<= 0.25",
                     fit["rms_relative_residual"] <= 0.25),
              _check("validation max abs error (pp)", max(errors), "<= 10 pp", max(errors) <= 10)]
    const = results["constants"]
    md = [f"Model: step = t_compute + max(0, t_allreduce - overlap x 2/3 t_compute), ring allreduce with "
          f"{const['fusion_mb']:g} MB fusion buffers unless a profile says otherwise (formula and sources in "
          "`benchmarks/scaling.py`). "
          f"Link efficiency {const['link_efficiency']}; overlap {const['overlap']:.3f}, fitted on the one case "
          f"\"{const['overlap_fitted_on']}\" and used unchanged for all others.",
          f"\n### Calibration: `horovodrun -np {cal['workers']} --gloo`, float32 allreduce (median of {cal['reps']})\n",
          markdown_table(["size", "measured ms", "fit ms"],
                         [[_size(s), f"{1e3 * t:.3f}", f"{1e3 * f:.3f}"]
                          for s, t, f in zip(cal["bytes"], cal["seconds"], fit["fitted_s"])]),
          f"\nFit t = a + s x 2(N-1)/N / B: **B = {fit['bandwidth_gbs']:.2f} GB/s, "
          f"a = {1e6 * fit['latency_s']:.0f} us**, RMS relative residual {100 * fit['rms_relative_residual']:.0f} %. "
          f"Matmul per worker {cal['matmul_gflops_per_worker']:.0f} GFLOP/s. The small-size floor is Horovod's background cycle "
          "(1 ms) plus scheduling on this shared machine, not Gloo's own latency.",
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
        md += [f"\n### {w['name']}: efficiency (images/s), {w['batch']} images per worker, "
               f"{w['trainable_params'] / 1e6:.1f} M parameters reduced\n",
               markdown_table(["N", *names], [[n, *(f"{100 * at[p, n]['efficiency']:.0f} % ({_rate(at[p, n])})"
                                                  if (p, n) in at else "-" for p in names)] for n in WORKERS])]
    outside = [abs(v["error_pp"]) for v in val if not v["calibration"]]
    md += ["\n### Validation against published scaling efficiency\n",
           markdown_table(["case", "published", "model", "error pp", "relative"],
                          [[v["case"] + (" (overlap fitted here)" if v["calibration"] else ""),
                            f"{100 * v['published']:.1f} %", f"{100 * v['predicted']:.1f} %", f"{v['error_pp']:+.1f}",
                            f"{100 * v['relative_error']:+.1f} %"] for v in val]),
           "\nIf the 128/512-GPU runs used 32 images per GPU (as the maintainers said in horovod/horovod#425; the "
           "16-GPU table says 64 and 64 is assumed above), the model gives "
           + ", ".join(f"{v['case']} {100 * v['predicted']:.0f} % ({v['error_pp']:+.0f} pp)"
                       for v in results["validation_batch32_at_scale"] if v["workers"] >= 128 and "VGG" in v["case"])
           + " at the same per-image speed.",
           f"\nMax abs error {max(errors):.1f} pp; without the fitted case max {max(outside):.1f} pp, mean abs "
           f"{statistics.mean(outside):.1f} pp; mean signed {statistics.mean(v['error_pp'] for v in val):+.1f} pp: "
           "the model sees only communication, so compute-bound runs (Inception, ResNet) come out optimistic.\n\n"
           "Sources: " + "; ".join(f"[{i + 1}] {s}" for i, s in enumerate(dict.fromkeys(v["source"] for v in val))),
           "\n" + checks_table(checks)]
    return checks, "\n".join(md)


def _rate(row: dict) -> str:
    return f"{row['images_per_second']:,.0f}" if row["images_per_second"] >= 100 else f"{row['images_per_second']:.2g}"


def _size(n: float) -> str:
    return next(f"{n / 2**k:g} {u}" for k, u in ((30, "GB"), (20, "MB"), (10, "KB"), (0, "B")) if n >= 2**k or k == 0)


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from launch.figures import STYLE, save_figure

    out_dir = Path(out_dir)
    paths = []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(results["workloads"]), figsize=(15, 4.8), sharey=True)
        for ax, w in zip(axes, results["workloads"]):
            for i, p in enumerate(results["profiles"]):
                rows = [r for r in results["predictions"] if r["workload"] == w["name"] and r["profile"] == p["name"]]
                ax.plot([r["workers"] for r in rows], [100 * r["efficiency"] for r in rows], "o-", ms=3.5,
                        color=f"C{i}", label=p["name"])
            ax.set(title=w["name"], xlabel="workers N", ylim=(0, 105))
            ax.set_xscale("log", base=2)
            ax.set_xticks(WORKERS, [str(n) for n in WORKERS])
        axes[0].set_ylabel("scaling efficiency (%)")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(results["profiles"]),
                   bbox_to_anchor=(0.5, -0.08))
        fig.suptitle(f"Predicted Horovod scaling (ring allreduce, overlap {results['constants']['overlap']:.2f})")
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

        val = results["validation"]
        fig, ax = plt.subplots(figsize=(8.0, 0.38 * len(val) + 1.4))
        y = np.arange(len(val))[::-1]
        published, model = [100 * v["published"] for v in val], [100 * v["predicted"] for v in val]
        ax.hlines(y, published, model, color="grey", lw=1.5)
        ax.plot(published, y, "o", color="C0", label="published")
        ax.plot(model, y, "x", color="C3", ms=8, mew=2, label="model")
        ax.set_yticks(y, [v["case"] + (" (overlap fitted)" if v["calibration"] else "") for v in val])
        ax.set(xlabel="scaling efficiency (%)", xlim=(60, 102),
               title=f"Validation: max |error| {max(abs(v['error_pp']) for v in val):.1f} pp")
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
