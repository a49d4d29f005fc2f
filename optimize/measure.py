"""Measure the optimize stage's model variants: file size (raw and gzip), stored weights (dtypes, int8 share,
sparsity), TFLite CPU latency and memory, and pick a variant from the accuracy-size trade-off.

All functions take paths or plain dicts ("rows", one per variant, e.g. {"variant": "int8", "gzip_bytes": ...,
"val_auc": ...}) and return JSON-ready values. TFLite files are read and run with LiteRT (`ai_edge_litert`),
not TensorFlow.
"""
from __future__ import annotations

import gc
import os
import tarfile
import time
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import psutil
from ai_edge_litert import schema_py_generated as schema_fb
from ai_edge_litert.tools import flatbuffer_utils
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from distributed.model.scoring import litert_interpreter, quantize_input
from cxrscale.figures import plt, save_figure, styled
from cxrscale.errors import CxrError
from cxrscale.console import quiet_tensorflow

_CHUNK = 1 << 20
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema_fb.TensorType).items() if not k.startswith("_")}
_UNDECODED = {"bfloat16", "int2", "int4", "uint4"}  # weight types numpy cannot read
_NUMERIC = _UNDECODED | {"float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                         "int64", "uint64"}
MIN_WEIGHT_ELEMENTS = 16


# ---------------------------------------------------------------------------------------------- size ---

class _GzipCounter:
    """A write-only sink that counts the bytes `gzip.compress(data, compresslevel=9)` would produce."""

    def __init__(self) -> None:
        self._z, self.n = zlib.compressobj(9, zlib.DEFLATED, 31), 0  # wbits 31: gzip container

    def write(self, data: bytes) -> int:
        self.n += len(self._z.compress(data))
        return len(data)

    def total(self) -> int:
        return self.n + len(self._z.flush())


def sizes(path: str | os.PathLike) -> dict:
    """{"bytes", "gzip_bytes"} of a model file, or of a SavedModel folder (all files summed; gzip of a
    deterministic tar: sorted names, mtime 0, no owners). gzip level 9 is what makes pruning's zeros show.
    Streams, so large models need no memory."""
    path = Path(path)
    gz = _GzipCounter()
    if path.is_file():
        with open(path, "rb") as fh:
            while block := fh.read(_CHUNK):
                gz.write(block)
        return {"bytes": path.stat().st_size, "gzip_bytes": gz.total()}
    if not path.is_dir():
        raise CxrError(f"model not found: {path}")
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            info = tarfile.TarInfo(p.relative_to(path).as_posix())
            info.size, info.mode, info.mtime = p.stat().st_size, 0o644, 0
            with open(p, "rb") as fh:
                tar.addfile(info, fh)
    return {"bytes": sum(p.stat().st_size for p in files), "gzip_bytes": gz.total()}


# ------------------------------------------------------------------------------------------- weights ---

def _read_tflite(path: Path):
    """The flatbuffer model object (`schema_py_generated.ModelT`) of a .tflite file."""
    if not path.is_file():
        raise CxrError(f"TFLite model not found: {path}")
    data = bytearray(path.read_bytes())
    if data[4:8] != b"TFL3":
        raise CxrError(f"{path} is not a TFLite model (no TFL3 identifier)")
    return flatbuffer_utils.read_model_from_bytearray(data)


def _zero_count(tensor, dtype: str, data, numel: int) -> int | None:
    """Exactly-zero elements of a constant tensor (quantized: value == zero point); None for dtypes numpy
    cannot decode. A TFLite-sparse tensor stores only its kept values: the rest are zero."""
    if dtype in _UNDECODED:
        return None
    values = np.frombuffer(bytes(data), dtype=np.dtype(dtype))
    q, zero = tensor.quantization, np.zeros(1)
    if q is not None and q.zeroPoint is not None and len(q.zeroPoint) and np.issubdtype(values.dtype, np.integer):
        zero = np.asarray(q.zeroPoint)
        if np.all(zero == zero[0]) or tensor.sparsity is not None:  # (sparse + per-channel: approximate)
            zero = zero[:1]
        else:  # per-channel zero points along quantizedDimension
            shape = [1] * len(tensor.shape)
            shape[q.quantizedDimension] = len(zero)
            values, zero = values.reshape(tensor.shape), zero.reshape(shape)
    return int(np.count_nonzero(values == zero)) + (numel - values.size)


def weight_report(tflite_path: str | os.PathLike) -> dict:
    """Dtypes, int8 share and sparsity of a TFLite model's stored weights, read from its flatbuffer.

    Weights are constant tensors (they have a non-empty buffer) of a float or integer type with >= 2 dims or
    >= 16 elements: kernels and biases, not scalars or shape/axis constants. A buffer shared by several
    tensors counts once. Returns {"weight_dtypes": {dtype: parameters}, "parameters", "int8_fraction",
    "sparsity" (fraction exactly zero; quantized: equal to the zero point), "per_tensor": the 20 largest as
    {name, dtype, shape, sparsity}}. Sparsity skips dtypes numpy cannot decode (int4, bfloat16).
    """
    model = _read_tflite(Path(tflite_path))
    dtypes: dict[str, int] = {}
    tensors, seen, zeros, decoded = [], set(), 0, 0
    for subgraph in model.subgraphs:
        for t in subgraph.tensors:
            data = model.buffers[t.buffer].data if t.buffer else None
            name = _TYPE_NAMES.get(t.type, str(t.type))
            shape = [int(d) for d in (t.shape if t.shape is not None else [])]
            numel = int(np.prod(shape, dtype=np.int64))
            if (data is None or len(data) == 0 or t.buffer in seen or t.isVariable or name not in _NUMERIC
                    or (len(shape) < 2 and numel < MIN_WEIGHT_ELEMENTS)):
                continue
            seen.add(t.buffer)
            dtypes[name] = dtypes.get(name, 0) + numel
            z = _zero_count(t, name, data, numel)
            if z is not None:
                zeros, decoded = zeros + z, decoded + numel
            tensors.append((numel, {"name": t.name.decode(errors="replace") if t.name else "", "dtype": name,
                                    "shape": shape, "sparsity": None if z is None else z / max(numel, 1)}))
    total = sum(dtypes.values())
    tensors.sort(key=lambda nt: -nt[0])
    return {"weight_dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])), "parameters": total,
            "int8_fraction": dtypes.get("int8", 0) / total if total else 0.0,
            "sparsity": zeros / decoded if decoded else None, "per_tensor": [t for _, t in tensors[:20]]}


# ------------------------------------------------------------------------------------------- latency ---

def latency(tflite_path: str | os.PathLike, input_shape: Sequence[int] | None = None, *,
            threads: Sequence[int] = (1, 2), warmup: int = 10, runs: int = 50, seed: int = 0) -> dict:
    """Batch-1 CPU latency of a TFLite model per thread count, and its peak memory.

    For each thread count a fresh interpreter runs `warmup` untimed then `runs` timed invokes (only `invoke`
    is timed, with perf_counter) on seeded random uint8 images of `input_shape` (H, W, C; default the
    model's). Returns {"threads": {"t": {"median_ms", "p90_ms", "mean_ms", "runs"}}, "peak_rss_delta_mb"}, the
thread counts as string keys (as JSON stores them, so fresh and reloaded results read alike).
    The memory figure is approximate: the largest rise of this process's RSS (MiB) above its value just
    before an interpreter was made, sampled after allocate_tensors and after every invoke. It includes the
    mapped model and one-time runtime set-up (XNNPACK), and misses what other code had already resident.
    """
    path = Path(tflite_path)
    if runs < 1 or warmup < 0 or not threads:
        raise CxrError(f"latency needs runs >= 1, warmup >= 0 and thread counts, got {runs}, {warmup}, {threads}")
    proc, rng = psutil.Process(), np.random.default_rng(seed)
    results, peak, images = {}, 0, None
    for t in threads:
        gc.collect()
        base = high = proc.memory_info().rss
        interpreter = litert_interpreter(path, num_threads=int(t))
        inp = interpreter.get_input_details()[0]
        shape = [1, *(int(d) for d in (input_shape or inp["shape"][1:]))]
        if list(inp["shape"]) != shape:
            interpreter.resize_tensor_input(inp["index"], shape)
        with quiet_tensorflow():  # the interpreter announces its XNNPACK delegate here
            interpreter.allocate_tensors()
        high = max(high, proc.memory_info().rss)
        if images is None:
            images = rng.integers(0, 256, size=(min(runs, 8), *shape), dtype=np.uint8)
        times = []
        for i in range(warmup + runs):
            interpreter.set_tensor(inp["index"], quantize_input(images[i % len(images)], inp))
            start = time.perf_counter()
            interpreter.invoke()
            elapsed = time.perf_counter() - start
            high = max(high, proc.memory_info().rss)
            if i >= warmup:
                times.append(elapsed * 1e3)
        del interpreter
        peak = max(peak, high - base)
        results[str(t)] = {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                           "mean_ms": float(np.mean(times)), "runs": runs}
    return {"threads": results, "peak_rss_delta_mb": peak / 2**20}


# --------------------------------------------------------------------------------------- trade-offs ---

def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v is None else float(v)


def pareto_front(rows: Sequence[dict], *, maximize: str, minimize: str) -> list[bool]:
    """For each row, whether no other row is at least as good on both keys and strictly better on one.
    Rows missing either value are never on the front (and dominate nothing)."""
    points = [(_value(r, maximize), _value(r, minimize)) for r in rows]
    valid = [p for p in points if None not in p]
    return [None not in (a, b) and not any(a2 >= a and b2 <= b and (a2 > a or b2 < b) for a2, b2 in valid)
            for a, b in points]


_NEAR, _FAR = 6, 16  # label offsets from their point, in points
_LABEL_OFFSETS = [(sx * d, sy * d) for d in (_NEAR, _FAR) for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1))]


def _box_distance(box, point) -> float:
    px, py = point
    return float(np.hypot(max(box.x0 - px, 0, px - box.x1), max(box.y0 - py, 0, py - box.y1)))


def _place_labels(ax, xs, ys, labels) -> None:
    """Annotate each point, trying small offsets until its label overlaps no earlier label, stays inside the
    axes and is nearer its own point than any other (unambiguous); far offsets get a thin leader line."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    placed = []
    for i in sorted(range(len(xs)), key=lambda i: (-ys[i], xs[i])):
        best = None
        for dx, dy in _LABEL_OFFSETS:
            text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                               ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top", fontsize=8.5,
                               arrowprops=None if abs(dx) == _NEAR else
                               {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4})
            box = text.get_window_extent(renderer)
            own = _box_distance(box, dots[i])
            others = [_box_distance(box, d) for j, d in enumerate(dots) if j != i]
            clash = (sum(box.overlaps(b) for b in placed) + (not frame.contains(box.x1, box.y1))
                     + (not frame.contains(box.x0, box.y0))
                     + sum(d < own for d in others) + 0.5 * sum(own <= d < own + 4 for d in others))
            if best is None or clash < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clash, text, box)
            else:
                text.remove()
            if clash == 0:
                break
        placed.append(best[2])


@styled
def tradeoff_plot(rows: Sequence[dict], path: str | os.PathLike, *, x: str, y: str = "auc",
                  label: str = "variant", xlabel: str, ylabel: str, title: str, log_x: bool = False) -> Path:
    """Scatter of `y` against `x` (one labelled point per row with both values), the Pareto front (max y,
    min x) drawn as a step line through its highlighted points; written as a PNG at `path`."""
    rows = [r for r in rows if _value(r, x) is not None and _value(r, y) is not None]
    if not rows:
        raise ValueError(f"no rows with both {x!r} and {y!r} to plot")
    xs, ys = [_value(r, x) for r in rows], [_value(r, y) for r in rows]
    front = pareto_front(rows, maximize=y, minimize=x)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ax.scatter(xs, ys, s=28, color="#7a7a7a", zorder=2)
    fx, fy = zip(*sorted((a, b) for a, b, f in zip(xs, ys, front) if f))
    ax.step(fx, fy, where="post", color="#1f6fb4", lw=1.4, zorder=1)
    ax.scatter(fx, fy, s=60, facecolor="#1f6fb4", edgecolor="white", lw=0.8, zorder=3, label="Pareto front")
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.margins(x=0.12, y=0.15)
    ax.legend(loc="lower right")
    fig.canvas.draw()  # fixes the limits, so label extents are final
    _place_labels(ax, xs, ys, [str(r.get(label, "")) for r in rows])
    return save_figure(fig, path)


def recommend(rows: Sequence[dict], *, baseline: str, metric: str = "val_auc", max_drop: float = 0.01,
              size_key: str = "gzip_bytes", label: str = "name") -> dict | None:
    """The smallest row (by `size_key`) whose `metric` is within `max_drop` of the baseline row's (the row
    whose `label` key, "name" by default, is `baseline`; it qualifies itself). Choose on validation metrics, never test ones, so the
    test set stays an unbiased estimate of the chosen variant. None when the baseline or its metric is
    missing; rows without the metric or size are skipped."""
    base = next((r for r in rows if r.get(label) == baseline), None)
    if base is None or _value(base, metric) is None:
        return None
    floor = _value(base, metric) - max_drop - 1e-12  # tolerance for float rounding of the difference
    ok = [r for r in rows if _value(r, metric) is not None and _value(r, size_key) is not None
          and _value(r, metric) >= floor]
    return min(ok, key=lambda r: (_value(r, size_key), -_value(r, metric)), default=None)
