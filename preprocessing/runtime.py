"""Toolkit-wide plumbing shared by every stage: the user-error type, logging, atomic writes, CLI exit codes.

Every stage (preprocessing, distributed, optimize, benchmarks, launch) imports from here, so a user mistake
looks the same everywhere: one line naming the thing and the fix, exit status 2, no traceback.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
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


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for the whole toolkit; safe to call more than once."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    root.setLevel(level)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a CLI `main`, turning a `CxrError` into one line on stderr and exit status 2."""
    try:
        code = main(argv)
    except CxrError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except KeyboardInterrupt:
        print("interrupted: what was finished is kept; re-run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)


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
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
    """The toolkit's git commit, or "unknown" outside a checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def check_writable_dir(path: Path, option: str) -> None:
    """Create `path` if needed and prove it is writable, else raise a `CxrError` naming `option`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CxrError(f"{option} {path} is not writable: {err.strerror or err}") from None
