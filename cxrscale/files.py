"""Files written so that a crash leaves the old one or the new one, never half (`atomic_path`, `atomic_dir`),
and the readers that name the file and what is wrong with it when it is missing or broken."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from cxrscale.errors import CxrError

_UMASK = os.umask(0)  # read once: the process's umask, for atomic files' modes
os.umask(_UMASK)


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


def check_writable_dir(path: Path, option: str) -> None:
    """Create `path` if needed and prove it is writable, else raise a `CxrError` naming `option`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CxrError(f"{option} {path} is not writable: {err.strerror or err}") from None

