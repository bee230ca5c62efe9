"""Writing a command's output (a run directory, a MODEL_DIR, a scores file): a write the disk refuses
(full, over quota, read-only, no permission, a file where a folder is needed) ends as one line naming the
output, not a traceback.

:func:`writing_to` turns such an ``OSError`` into an :class:`OutputError` (the ``mdaf-rec`` command line
prints it as one line, exit status 2). :class:`ArchiveFile` is the file to hand torch's archive writers
(``torch.save``, ``torch.export.save``, AOTInductor's packager): their C++ writer aborts the process
(``terminate``, exit 134) when a write fails again while it is being destroyed, so the first failure is
kept, later writes are skipped, and the failure is raised once the writer is done.
"""

from __future__ import annotations

import errno
import io
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from mdaf_rec.errors import UserError

#: errno values that mean "the disk will not take this write" (not a bug), and what to tell the user.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
REFUSED = {
    **dict.fromkeys(NO_SPACE, "the disk is full (or a size limit is reached)"),
    **dict.fromkeys((errno.EACCES, errno.EPERM, errno.EROFS), "the location is not writable"),
    **dict.fromkeys((errno.ENOTDIR, errno.EEXIST), "a file stands where a folder is needed"),
}


class OutputError(UserError):
    """An output could not be written: the disk is full, the location is not writable, or a file stands where
    a folder is needed (the message names the output, and the file when known)."""


def refused_write(e: OSError, output: Path) -> Optional[OutputError]:
    """The :class:`OutputError` for ``e`` raised while writing ``output``, or ``None`` when ``e`` is not a
    refused write (then it is a bug or another problem, and keeps its traceback)."""
    if e.errno not in REFUSED:
        return None
    if e.errno not in NO_SPACE and e.filename is not None:  # only a write fails for lack of space; the others
        if not Path(e.filename).absolute().is_relative_to(output.absolute().parent):  # may be a read elsewhere
            return None
    reason = REFUSED[e.errno]
    where = f" {e.filename}" if e.filename and str(e.filename) != str(output) else ""
    return OutputError(f"{output}: cannot write{where} ({e.strerror}): {reason}")


@contextmanager
def writing_to(output: Path) -> Iterator[None]:
    """``with writing_to(out):`` the block's refused writes raise :class:`OutputError` naming ``out``."""
    try:
        yield
    except OSError as e:
        error = refused_write(e, output)
        if error is None:
            raise
        raise error from None


class ArchiveFile(io.FileIO):
    """A file opened for writing whose failed writes do not reach torch's C++ archive writer.

    ``with ArchiveFile(path) as f: torch.save(obj, f)``: the first ``OSError`` of a write is kept (the
    write reports success, later writes are skipped) and raised, naming ``path``, when the file is closed.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        super().__init__(str(path), "w")
        self.path = Path(path)
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:  # type: ignore[override]
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                view = memoryview(data).cast("B")
                while view:  # FileIO.write may write less than asked
                    view = view[super().write(view):]
            except OSError as e:
                self.error = e
        return size

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        except OSError as e:
            self.error = self.error or e
        if self.error is not None:
            e, self.error = self.error, None
            raise OSError(e.errno, e.strerror, str(self.path)) from None
