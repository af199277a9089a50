"""Run a decoding function in a child process with a deadline.

FFmpeg can hang or crash (segfault) on a malformed file; either would stop a whole Ray Data
pipeline or a ``data check``. A ``Sandbox`` keeps one child process and calls module-level
functions in it: a ``BadVideo`` comes back as itself, a missed deadline or a dead child becomes
``BadVideo`` too (and the child is replaced), and any other exception is re-raised here as a
``RuntimeError`` with the child's traceback, since it is a bug or an environment problem
(a full disk, say), not a bad video.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback

from tmad_ray.data.clips import BadVideo, UnreadableVideo


def _serve(conn) -> None:
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(*args)))
        except UnreadableVideo as e:
            conn.send(("unreadable", str(e)))
        except BadVideo as e:
            conn.send(("bad", str(e)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Sandbox:
    def __init__(self):
        self.proc = None
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a multithreaded process (Ray workers are)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _restart(self) -> int | None:
        self.proc.kill()
        self.proc.join(5)
        code = self.proc.exitcode
        self.conn.close()
        self._start()
        return code

    def call(self, fn, *args, timeout: float):
        """``fn(*args)`` in the child; ``fn`` must be importable by name (module level)."""
        self.conn.send((fn, args))
        if not self.conn.poll(timeout):
            self._restart()
            raise BadVideo(f"decoder timed out after {timeout:g} s")
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            code = self.proc.exitcode
            self._restart()
            raise BadVideo(f"decoder crashed (exit code {code})") from None
        if status == "unreadable":
            raise UnreadableVideo(value)
        if status == "bad":
            raise BadVideo(value)
        if status == "error":
            raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in the decode process:\n{value}")
        return value

    def close(self) -> None:
        if self.proc is not None:
            self.conn.close()
            self.proc.join(2)
            if self.proc.is_alive():
                self.proc.kill()
            self.proc = None

    def __del__(self):
        self.close()
