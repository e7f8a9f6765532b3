"""SIGINT, SIGTERM and SIGHUP, turned into an orderly stop of a run (docs/design.md, the runner's guarantees)."""

from __future__ import annotations

import contextlib
import signal
import threading

from benchmark.core.errors import Interrupted


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP, turned into an orderly stop of the run.

    The first signal only sets ``received`` (the driver's loop checks it between steps, so no
    result file or claim is left half-done), except while a cell trains in this very process
    (``interruptible``), where it raises Interrupted at once. A second signal raises at once
    wherever the driver is: a user pressing Ctrl-C twice means it.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                                getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self):
        self.received: int | None = None
        self._raise = False
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        again = self.received is not None
        if not again:
            self.received = signum
        if again or self._raise:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interruptible(self):
        if self.received is not None:
            raise Interrupted(self.received)
        self._raise = True
        try:
            yield
        finally:
            self._raise = False


def signal_name(signum: int | None) -> str:
    """SIGTERM for 15; "signal N" for a number that names no signal here."""
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return f"signal {signum}"
