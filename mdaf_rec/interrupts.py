"""Ctrl-C (SIGINT) stops a command cleanly: one ``KeyboardInterrupt`` in the command's process, none in its
DataLoader workers (the ``mdaf-rec`` command line turns it into one line and exit status 130).

A terminal sends SIGINT to the whole process group. :func:`stoppable` makes the command's process raise
``KeyboardInterrupt`` where the signal lands and, should that one be lost (raised inside a ``__del__`` or a
callback, which Python only prints), again at the next batch (:func:`raise_if_interrupted`, which the data
loader calls). :func:`workers_ignore_sigint` starts DataLoader workers that leave SIGINT to this process
(a worker hit while starting printed its own traceback).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator, List

_interrupted = threading.Event()


@contextmanager
def stoppable() -> Iterator[None]:
    """Within the block, SIGINT raises ``KeyboardInterrupt`` now and at every later :func:`raise_if_interrupted`."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can handle signals
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        _interrupted.set()
        raise KeyboardInterrupt

    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raises ``KeyboardInterrupt`` if SIGINT arrived inside :func:`stoppable` (its first one may have been lost)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


@contextmanager
def workers_ignore_sigint() -> Iterator[None]:
    """Processes forked within the block ignore SIGINT; one that reaches this process meanwhile is raised
    when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))  # inherited by forks
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # what this process would have done: raise KeyboardInterrupt
