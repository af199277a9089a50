"""The one base of the failures a user can act on.

A ``UserError`` is printed by ``tmad-ray`` (and ``tune.py``) as one line, ``error: <what is wrong and
what to do>``, with exit status ``exit_code`` (2: bad input, the default; 1: a service or download
that failed and may work on a second try). Anything else is a bug: one line too, with the hint to
run again with ``--debug`` (or ``TMAD_RAY_DEBUG=1``) for the traceback.
"""

from __future__ import annotations


class UserError(Exception):
    exit_code = 2


class NotFound(UserError, FileNotFoundError):
    """A file or directory the user pointed at is missing, or is not what it should be."""
