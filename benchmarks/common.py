"""Shared plumbing of the benchmark suites: machine description, child-process measurements, result files."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence

from cxrscale.errors import CxrError
from cxrscale.files import write_json_atomic, write_text_atomic
from cxrscale.provenance import git_commit, library_versions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")  # the venv's own, beside its python
SUITES = ("preprocess", "input", "train", "optimize", "complexity", "scaling", "robustness", "serving", "trust",
          "faults", "shift", "split")


class Suite(Protocol):
    """What every suite module `benchmarks.<name>` (one of SUITES) provides, for `python -m benchmarks` and
    for its own `main`:

    run_suite(quick, work) -> results: measure, with `work` as the scratch folder for what it prepares and
        trains (reused across invocations); `quick` for small inputs. The results are plain JSON data.
    summarise(results) -> (checks, markdown): the suite's targets as `check(...)` rows (met / NOT MET) and
        its Markdown section (tables, what each number means). Pure: no measuring, no files.
    plots(results, out_dir) -> [paths] (optional): its figures, written into out_dir.
    """

    def run_suite(self, quick: bool, work: Path) -> dict: ...

    def summarise(self, results: dict) -> tuple[list[dict], str]: ...


def load_suite(name: str) -> Suite:
    """The suite module `benchmarks.<name>`, checked to provide the contract."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    missing = [f for f in ("run_suite", "summarise") if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"benchmarks.{name} lacks {', '.join(missing)}: not a suite (see benchmarks.common.Suite)")
    return module  # type: ignore[return-value]


def model_setups() -> dict[str, tuple[int, list[str]]]:
    """Every model of the zoo with the image side and extra distributed.train flags it is benchmarked with
    (its registry entry): {name: (size, flags)}."""
    from distributed.model.zoo import model_names, model_spec  # no TensorFlow

    return {name: (model_spec(name).benchmark_size, list(model_spec(name).benchmark_args)) for name in model_names()}
DEFAULT_SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: Linux's VmHWM. Not getrusage's ru_maxrss, which Linux
    keeps across execve: a child started by a large process would report its parent's size (a child of a
    600 MiB driver reads 614 MiB there against 13 MiB here)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs (macOS: bytes, 1024 x too big)


class StolenCpu:
    """`with StolenCpu() as stolen: ...`, then `stolen.share`: the share of this machine's CPU time its
    hypervisor gave to other guests while the block ran (Linux's steal time; 0 where it is not reported). A
    virtual machine's speed drifts with it, so a timing is read beside it."""

    share = 0.0

    @staticmethod
    def _times() -> tuple[float, float]:
        import psutil

        times = psutil.cpu_times()
        return getattr(times, "steal", 0.0), sum(times)

    def __enter__(self) -> "StolenCpu":
        self._start = self._times()
        return self

    def __exit__(self, *exc) -> None:
        (steal0, total0), (steal1, total1) = self._start, self._times()
        self.share = (steal1 - steal0) / (total1 - total0) if total1 > total0 else 0.0


def machine() -> dict[str, Any]:
    import psutil

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "processor": platform.processor() or platform.machine()}
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        info["cpu_model"] = model
    except (OSError, StopIteration):
        pass
    return info


BENCH_PACKAGES = ("tensorflow", "tf-keras", "ray", "opencv-python-headless", "numpy", "horovod",
                  "tensorflow-model-optimization")


def run_command(cmd: Sequence[str], timeout: float = 7200) -> subprocess.CompletedProcess:
    """Run a toolkit command from the repository (TensorFlow's start-up chatter off), capturing its output;
    a failure raises RuntimeError with the last lines of its stderr."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed ({proc.returncode}):\n{tail}")
    return proc


def run_child(module: str, args: Sequence[str], timeout: float = 1800) -> dict:
    """Run `python -m module args` in a fresh process (so its peak RSS is its own) and parse the JSON
    it prints on its last stdout line."""
    proc = run_command([sys.executable, "-m", module, *args], timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:,.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, suite: str, results: dict, markdown: str) -> tuple[Path, Path]:
    """Write `<suite>-<timestamp>.json` (every raw figure, machine, versions, commit) and `.md`."""
    results = {"suite": suite, "created": dt.datetime.now().isoformat(timespec="seconds"),
               "machine": machine(), "versions": library_versions(BENCH_PACKAGES), "git_commit": git_commit(),
               **results}
    name = f"{suite}-{stamp()}"
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_json_atomic(json_path, results)
    header = (f"# Benchmark: {suite}\n\n{results['created']}, commit {results['git_commit']}, "
              f"{results['machine'].get('cpu_model', results['machine']['processor'])}, "
              f"{results['machine']['cpus']} CPUs, {results['machine']['memory_gib']} GiB\n\n")
    write_text_atomic(md_path, header + markdown + "\n")
    return json_path, md_path


def report(out_dir: Path, suite: str, results: dict, summarise) -> None:
    """Add `summarise(results)`'s target checks to the results, write the JSON + Markdown into `out_dir` (made
    if need be), print the table."""
    checks, markdown = summarise(results)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    results["checks"] = checks
    json_path, md_path = write_results(out_dir, suite, results, markdown)
    print(markdown)
    print(f"\nwritten: {json_path} and {md_path}")


OPERATORS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def check(name: str, measured: float | None, op: str, goal: float) -> dict:
    """One target of a suite: {name, measured, goal, status}; a missing measurement is not met."""
    met = measured is not None and OPERATORS[op](measured, goal)
    return {"name": name, "measured": measured, "goal": f"{op} {goal}", "status": "met" if met else "NOT MET"}


def checks_table(checks: Sequence[dict]) -> str:
    return markdown_table(["target", "measured", "goal", "status"],
                          [[c["name"], "" if c["measured"] is None else f"{c['measured']:.3f}", c["goal"], c["status"]]
                           for c in checks])


def comma_list(value: str, option: str, allowed) -> list[str]:
    """Items of a comma-separated option, each checked against `allowed`."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(items) - set(allowed))
    if unknown:
        raise CxrError(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def require_dir(path: Path, option: str, hint: str) -> Path:
    if not path.is_dir():
        raise CxrError(f"{option} {path} does not exist: {hint}")
    return path
