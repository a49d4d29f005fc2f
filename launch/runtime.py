"""How every entry point of the toolkit runs: the user-error type and exit codes, the rank-aware CLI runner,
logging and the quiet console, Ray start-up, atomic writes, and provenance. No TensorFlow.

It lives in `launch` (the stage that starts entry points) rather than in any stage it serves, and every
stage (preprocessing, distributed, optimize, benchmarks, launch) imports from here, so a user mistake looks
the same everywhere: one line naming the thing and the fix, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
USER_ERROR_EXIT = 2
_UMASK = os.umask(0)
os.umask(_UMASK)


class CxrError(Exception):
    """A user's mistake (bad path, bad flag, unusable data). The CLI prints its message and exits 2."""


# Libraries whose Python loggers narrate routine work (absl: "Sharding callback duration" every epoch;
# tensorflow: "Assets written to", twice through its own handler; tf2onnx: every conversion step): warnings only,
# unless CXR_VERBOSE=1.
CHATTY_LOGGERS = {"absl": logging.WARNING, "tensorflow": logging.ERROR, "h5py": logging.WARNING,
                  "tf2onnx": logging.WARNING}


def verbose() -> bool:
    """CXR_VERBOSE=1: show the libraries' own start-up and progress messages too."""
    return os.environ.get("CXR_VERBOSE", "") not in ("", "0")


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for the whole toolkit; safe to call more than once."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    root.setLevel(level)
    if not verbose():
        for name, floor in CHATTY_LOGGERS.items():
            logging.getLogger(name).setLevel(max(floor, level))


def launcher_rank() -> int:
    """This process's rank as its launcher (horovodrun, mpirun, Slurm) set it, readable before Horovod is
    initialised; 0 for a plain process."""
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a CLI `main`, turning a `CxrError` into one line on stderr and exit status 2, and Ctrl-C into
    exit status 130. Under a launcher only rank 0 prints, so N workers report one mistake once."""
    speak = launcher_rank() == 0
    try:
        code = main(argv)
    except CxrError as err:
        if speak:
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except KeyboardInterrupt:
        if speak:
            print("interrupted: what was finished is kept; re-run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        where = disk_full(err)
        if where is None:
            raise
        print(f"error: no space left on the device{f' writing {where}' if where else ''}: free some space (or "
              "write elsewhere) and re-run; what was complete is kept and what was being written was removed, so "
              "the re-run continues from there (training: with --resume once a checkpoint exists)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    raise SystemExit(code or 0)


_NO_SPACE = ("No space left on device", "Disk quota exceeded")


def disk_full(err: BaseException) -> str | None:
    """For an error that is a full disk or quota (an OSError, or TensorFlow's or Ray's error quoting one):
    the folder it was writing ('' when it names none), else None. An atomic write's temporary name is cut
    off, so the folder named is the user's."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and getattr(current, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return _user_folder(str(current.filename or ""))
        text = str(current)
        if any(marker in text for marker in _NO_SPACE) and not isinstance(getattr(current, "cause", None),
                                                                         BaseException):
            # the first path quoted whose top folder exists
            paths = [p for p in re.findall(r"/[^\s;:'\"]+", text) if Path(*Path(p).parts[:2]).exists()]
            return _user_folder(paths[0] if paths else "")
        # Ray's RayTaskError keeps the task's own exception in .cause
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None


def _user_folder(path: str) -> str:
    """`path` up to its first hidden (temporary) component, e.g. RUN/checkpoints for RUN/checkpoints/.best.tmp/x."""
    if not path:
        return ""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.startswith(".") and i > 0:
            return str(Path(*parts[:i]))
    return path


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one `error: ...` line and exit status 2, like every other user
    mistake in the toolkit (argparse's own adds its usage lines), printed by rank 0 only under a launcher.
    Every entry point's parser is one, so every entry point answers `--version`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line(),
                          help="print the toolkit's version and exit")

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n" if launcher_rank() == 0 else None)


def version_line() -> str:
    """`cxrscale X.Y.Z`: launch.__version__, the one place the version is set (setup.cfg reads it too)."""
    from launch import __version__

    return f"cxrscale {__version__}"


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


# TensorFlow's native chatter: its start-up lines, logged before absl::InitializeLog(), where abseil ignores
# TF_CPP_MIN_LOG_LEVEL (abseil/abseil-cpp#1718), the TFLite calibrator's printf per quantized model and the
# interpreter's note on its first allocation. The
# only way to keep them off the console is to catch the process's native stderr while TensorFlow loads,
# probes for devices or quantizes, and to pass on everything else.
_START_UP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_executor|cuda_dnn|cuda_fft"
    r"|cuda_blas|gpu_device)\.cc:\d+\] .*"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow .*"
    r"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)$")


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Hold back TensorFlow's native chatter (`is_start_up_noise`) written to file descriptor 2 inside the
    block (unless CXR_VERBOSE=1); every other line is written to stderr afterwards, in order."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines()
                    if not _START_UP_NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def is_start_up_noise(line: str) -> bool:
    """Whether a line of a child process's stderr is one of TensorFlow's native start-up lines."""
    return bool(_START_UP_NOISE.match(line.rstrip("\n")))


def run_quietly(cmd: Sequence[str], env: dict | None = None, keep: Callable[[str], bool] | None = None) -> int:
    """Run `cmd` with this process's stdin and stdout, passing its stderr on line by line without
    TensorFlow's start-up lines (horovodrun's own process imports TensorFlow) nor those `keep` refuses (it
    sees every line); returns its exit status."""
    proc = subprocess.Popen(list(cmd), env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    assert proc.stderr is not None
    for line in proc.stderr:
        kept = keep(line) if keep else True
        if verbose() or (kept and not is_start_up_noise(line)):
            sys.stderr.write(line)
            sys.stderr.flush()
    return proc.wait()


@contextlib.contextmanager
def start_ray(address: str | None, num_cpus: int | None, *, py_modules: Sequence[str] = (),
              log_to_driver: bool = True) -> Iterator[None]:
    """Join the Ray cluster at `address`, or start a private one on this machine with `num_cpus` CPUs (all
    by default) whose every server listens on 127.0.0.1; shut it down on exit if this call started it.
    `py_modules` are shipped to a cluster's workers (they may not have this checkout)."""
    single = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    previous = os.environ.get(single)
    if not address:
        os.environ[single] = "0"  # single-machine mode, for Ray and the servers it starts; read when Ray is imported
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver,
                         runtime_env={"py_modules": list(py_modules)} if py_modules else None)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=log_to_driver, logging_level=logging.ERROR,
                         object_store_memory=256 * 1024 * 1024)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise CxrError(f"could not start or reach Ray{f' at --address {address}' if address else ''}: "
                           f"{err}") from None
        if address:
            logging.getLogger("cxrscale").info(
                "joined the Ray cluster at %s (--address %s): %d nodes, %g CPUs", ray.get_runtime_context().gcs_address,
                address, len([n for n in ray.nodes() if n.get("Alive")]), ray.cluster_resources().get("CPU", 0))
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        if not address and previous is None:  # not left behind: a `ray start --address` run from this
            os.environ.pop(single, None)       # process afterwards would refuse to join a cluster
        elif not address:
            os.environ[single] = previous


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one step.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        raise _naming(err, path) from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _naming(err: OSError, path: Path) -> OSError:
    """`err` with the file it was writing named, when it names none (a failed write() does not)."""
    if err.filename:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path)) if err.errno else err


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it takes `path`'s place (an old `path` is
    moved aside first and removed last), on failure it is removed and `path` is left as it was."""
    path = Path(path)
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(err, path) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON file, raising `CxrError` naming `what` and the path when it is missing or broken."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CxrError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CxrError(f"{what} is not valid JSON: {path} ({err})") from None


def read_options_file(path: str | os.PathLike, option: str) -> Any:
    """A JSON or YAML file a user passed with `option` (YAML for .yaml/.yml), raising `CxrError` naming the
    option and the path when it is unreadable or malformed."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CxrError(f"{option} {path} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as err:  # noqa: BLE001 - JSON and YAML raise different types
        raise CxrError(f"{option} {path} is not valid {file.suffix.lstrip('.') or 'JSON'}: {err}") from None


def read_numeric_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """A CSV of numbers (a run's history.csv) as one dict per row; empty cells are NaN, a missing file no
    rows."""
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                for row in csv.DictReader(fh)]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def check_writable_dir(path: Path, option: str) -> None:
    """Create `path` if needed and prove it is writable, else raise a `CxrError` naming `option`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CxrError(f"{option} {path} is not writable: {err.strerror or err}") from None
