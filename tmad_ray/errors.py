"""The one base of the failures a user can act on.

A ``UserError`` is printed by ``tmad-ray`` (and ``tune.py``) as one line, ``error: <what is wrong and
what to do>``, with exit status ``exit_code`` (2: bad input, the default; 1: a service or download
that failed and may work on a second try). A full or read-only volume is the user's too (``NoSpace``,
exit 2). Anything else is a bug: one line too, naming the root cause (unwrapped from Ray's task and
Train errors, ``cause_chain``), with the whole traceback in a log file whose path is printed (or on
the screen with ``--debug`` / ``TMAD_RAY_DEBUG=1``).
"""

from __future__ import annotations

import os


class UserError(Exception):
    exit_code = 2


class NotFound(UserError, FileNotFoundError):
    """A file or directory the user pointed at is missing, or is not what it should be."""


class NoSpace(UserError):
    """A volume is full (or read-only) where tmad_ray writes: the user's environment, not a bug."""


def cause_chain(e: BaseException) -> list[BaseException]:
    """``e`` and what it wraps, down to the exception that started it all: through a failed Ray task's
    ``cause``, a Train run's per-worker failures (the lowest rank's), a Train controller's failure and
    ``raise ... from``. It stops at a ``UserError``: that one was written for the user."""
    chain = [e]
    while not isinstance(e, UserError):
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            nxt = failures[min(failures)]
        else:
            nxt = getattr(e, "controller_failure", None) or getattr(e, "cause", None) or e.__cause__
        if not isinstance(nxt, BaseException) or any(nxt is c for c in chain):
            break
        chain.append(nxt)
        e = nxt
    return chain


def environment_problem(e: BaseException) -> NoSpace | None:
    """A full or read-only volume as one line naming the path, its free space and the fix; else None."""
    import errno
    import shutil

    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return None
    path = e.filename or "?"
    free = ""
    probe = str(path)
    while probe and probe not in ("/", "."):
        try:
            free = f", {shutil.disk_usage(probe).free / 2**30:.1f} GiB free there"
            break
        except OSError:
            probe = os.path.dirname(probe)
    what = "read-only" if e.errno == errno.EROFS else "full (or over quota)"
    return NoSpace(f"cannot write {path}: the volume is {what}{free}; free space there or point the "
                   "storage.* key that names it at another volume")
