"""SIGTERM and SIGHUP stop a command the way Ctrl-C does: as an exception, so that every clean-up runs.

By default these signals kill the process on the spot, and the hidden staging folder of a file being written
(:mod:`bnfold.files`) would stay behind. While a command runs, :func:`stop_as_exception` turns them into
:class:`Terminated` (a ``KeyboardInterrupt``, so code that cleans up after Ctrl-C cleans up after them too); the
command line then exits with ``128 + signal number``, the shell's convention (143 for SIGTERM, 129 for SIGHUP;
Ctrl-C keeps 130). A second signal of the same kind during the clean-up falls back to the default action.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP while a command ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _names() -> list[str]:
    return [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


@contextmanager
def stop_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM / SIGHUP raise :class:`Terminated`; the previous handlers come back afterwards.

    Only the main thread may set signal handlers; elsewhere (a command run from a thread) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [getattr(signal, name) for name in _names()]

    def raise_terminated(signum: int, frame: Any) -> None:
        for number in signums:  # a second signal during the clean-up: the default action
            signal.signal(number, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {number: signal.signal(number, raise_terminated) for number in signums}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
