"""How a running study hears that it must stop: Ctrl-C, SIGUSR1 and SIGTERM all end it the same way,
saved by Tune and resumable (``run_study`` turns it into ``StudyInterrupted``)."""

from __future__ import annotations

import os


class InterruptWatch:
    """Around ``tuner.fit()``. Tune replaces the SIGINT handler for the run and, on Ctrl-C (or SIGUSR1),
    saves the experiment, puts back the handler it found (ours) and returns. So ours being back at
    the end means "interrupted" (``seen``); a second Ctrl-C, while Tune saves, raises KeyboardInterrupt.
    SIGTERM (``ray job stop``, Kubernetes, Slurm) is turned into that same Ctrl-C: the study ends
    KILLED and resumable instead of dying in Ray's C++ handlers."""

    def __init__(self):
        self.seen, self.previous, self.previous_term = False, None, None

    @staticmethod
    def _handler(sig, frame):
        raise KeyboardInterrupt

    @staticmethod
    def _on_term(sig, frame):
        import signal

        os.kill(os.getpid(), signal.SIGINT)  # to whichever SIGINT handler is in place: Tune's, or ours

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0":  # else Ctrl-C raises in fit() itself
            self.previous = signal.signal(signal.SIGINT, self._handler)
            self.previous_term = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            self.seen = signal.getsignal(signal.SIGINT) is self._handler
            signal.signal(signal.SIGINT, self.previous)
            signal.signal(signal.SIGTERM, self.previous_term)
        return False
