"""Logging of the command-line tools: the project's own lines by default, everything with ``-v``."""

from __future__ import annotations

import logging
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import Optional


def setup_logging(rank: int = 0, verbose: bool = False, buffer_for_file: bool = False) -> Optional[MemoryHandler]:
    """Logs to stderr: the project's own lines (INFO on rank 0, warnings elsewhere) and, with ``verbose``,
    everything else too (TorchRec's planner and FBGEMM's TBE INFO dumps, Python warnings).

    Args:
        rank: this process's rank (only rank 0 logs INFO).
        verbose: also show third-party lines and warnings.
        buffer_for_file: also keep the lines in a buffer for :func:`attach_log_file`.
    Returns:
        With ``buffer_for_file``, a buffer of the lines logged from now on; :func:`attach_log_file` writes
        it, and every later line, to a file (a run's ``train.log``, once the run directory may be written).
    """
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler()
    buffer = MemoryHandler(capacity=1 << 16, flushLevel=logging.CRITICAL + 1) if buffer_for_file else None
    handlers = [h for h in (console, buffer) if h is not None]
    for handler in handlers:
        handler.setFormatter(fmt)
    root, project = logging.getLogger(), logging.getLogger("mdaf_rec")
    for logger_ in (root, project):
        for handler in list(logger_.handlers):
            logger_.removeHandler(handler)
    logging.captureWarnings(True)  # Python warnings become "py.warnings" log records: shown with verbose only
    level = logging.INFO if rank == 0 else logging.WARNING
    project.setLevel(level)
    if verbose:
        root.setLevel(level)
        project.propagate = True
        for handler in handlers:
            root.addHandler(handler)
    else:
        root.setLevel(logging.ERROR)
        project.propagate = False
        for handler in handlers:
            project.addHandler(handler)
    # torch's own loggers (e.g. the "[rank0]:W..." lines) have their own handler: errors only unless verbose.
    logging.getLogger("torch").setLevel(logging.INFO if verbose else logging.ERROR)
    return buffer


def attach_log_file(buffer: MemoryHandler, path: Path) -> None:
    """Writes the buffered lines to ``path`` (appending) and sends every later line there too."""
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(buffer.formatter)
    buffer.setTarget(file_handler)
    buffer.flush()
    for logger_ in (logging.getLogger(), logging.getLogger("mdaf_rec")):
        if buffer in logger_.handlers:
            logger_.removeHandler(buffer)
            logger_.addHandler(file_handler)
    buffer.close()
