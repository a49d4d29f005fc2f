"""The user-mistake type: a `CxrError` is printed as one `error:` line and exits with status 2 (see
`cxrscale.cli.run_cli`); a full disk is recognised and reported the same way, naming the folder."""
from __future__ import annotations

import errno
import re
from pathlib import Path

USER_ERROR_EXIT = 2


class CxrError(Exception):
    """A user's mistake (bad path, bad flag, unusable data). The CLI prints its message and exits 2."""


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

