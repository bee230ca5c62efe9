"""A dataset on disk: a folder of ``train`` / ``val`` / ``test`` Parquet splits and an optional ``meta.json``.

Each split is either ``<split>.parquet`` or a folder ``<split>/`` of ``.parquet`` files (read in
sorted file-name order; row numbers within a split count across its files in that order).

Every Parquet file is read through :func:`open_parquet`, so a truncated, corrupt or empty file is a
:class:`DatasetError` naming it, never a pyarrow traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq

from mdaf_rec.config import is_timezone
from mdaf_rec.data.schema import META_FILE, SPLITS
from mdaf_rec.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TIMEZONE = "UTC"
READ_BATCH_ROWS = 65536  # record batch size of streamed passes over a split file


class DatasetError(UserError, ValueError):
    """A dataset folder is missing, incomplete or malformed; the message names the folder."""


@dataclass(frozen=True)
class Dataset:
    """An opened dataset folder.

    Attributes:
        root: the dataset folder.
        files: split -> its Parquet files, in read order.
        meta: the parsed ``meta.json`` ({} if absent).
    """

    root: Path
    files: Dict[str, Tuple[Path, ...]]
    meta: Dict[str, Any]

    @staticmethod
    def open(path: Union[str, Path]) -> "Dataset":
        """Lists the split files of ``path`` and reads ``meta.json`` if present.

        Raises :class:`DatasetError` naming the folder and the missing or empty split, the split
        file that is not readable Parquet (every file's footer is read here, so a truncated or empty
        file fails before anything is built on the data), or ``meta.json``'s malformed field.
        """
        root = Path(path)
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
        files = {split: _split_files(root, split) for split in SPLITS}
        for split_files in files.values():
            for f in split_files:
                open_parquet(f)
        meta = read_meta(root)
        zone = meta.get("timezone")
        if zone is not None and not is_timezone(zone):  # read by every batch: refuse it here, not mid-epoch
            raise DatasetError(f"{root / META_FILE}: field 'timezone': {zone!r} is not an IANA time zone name "
                               "(e.g. 'Asia/Shanghai', 'UTC')")
        logger.debug("opened dataset %s: %s", root, {s: len(f) for s, f in files.items()})
        return Dataset(root=root, files=files, meta=meta)

    def split_files(self, split: str) -> Tuple[Path, ...]:
        """The Parquet files of ``split``, in read order."""
        if split not in self.files:
            raise DatasetError(f"dataset {self.root}: unknown split {split!r} (known: {list(self.files)})")
        return self.files[split]

    def num_rows(self, split: str) -> int:
        """Rows of ``split``, from the Parquet footers (no data is read)."""
        return sum(open_parquet(f).metadata.num_rows for f in self.split_files(split))

    def require_columns(self, columns: Sequence[str]) -> None:
        """Raises :class:`DatasetError` naming the first split file that lacks one of ``columns`` (read
        from the Parquet footers, no data)."""
        for split in SPLITS:
            for f in self.split_files(split):
                names = open_parquet(f).schema_arrow.names
                missing = [c for c in columns if c not in names]
                if missing:
                    raise DatasetError(f"{f}: missing column(s) {missing} (has {names})")

    def timezone(self, configured: Optional[str] = None) -> str:
        """The IANA time zone for ``hour`` / ``dayofweek``: ``configured``, else meta's, else UTC."""
        return configured or self.meta.get("timezone") or DEFAULT_TIMEZONE


def is_dataset_folder(path: Path) -> bool:
    """True if ``path`` has a dataset folder's layout: every split as ``<split>.parquet`` or a ``<split>/`` of
    ``.parquet`` files (nothing is opened)."""
    return all((path / f"{s}.parquet").is_file() or any((path / s).glob("*.parquet")) for s in SPLITS)


def read_meta(root: Union[str, Path]) -> Dict[str, Any]:
    """The parsed ``meta.json`` of dataset folder ``root`` ({} if there is none)."""
    meta_path = Path(root) / META_FILE
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def recorded_timezone(recorded: Optional[str], data: Union[str, Path]) -> str:
    """The time zone a run was trained with, for re-scoring or exporting it.

    Args:
        recorded: the run's ``features.timezone`` (training resolves it and writes it to the run's
            ``config.yaml``); ``None`` only in runs written before the zone was recorded.
        data: the dataset folder being scored (or the run's training data).
    Returns:
        ``recorded``; a different zone in ``data``'s ``meta.json`` is reported in one line, never followed.
        A run without a recorded zone takes the dataset's (meta.json, else UTC) and says so.
    """
    meta_path = Path(data) / META_FILE
    if recorded is None:
        zone = Dataset.open(data).timezone()
        logger.warning("the run does not record its time zone (trained by an older version): using %r from %s",
                       zone, meta_path if meta_path.exists() else "the default")
        return zone
    try:
        current = read_meta(data).get("timezone")
    except DatasetError:  # compared only: the recorded zone stands (eval names a bad meta.json when it opens the data)
        current = None
    if current is not None and current != recorded:
        logger.warning("%s says time zone %r, but the run was trained with %r (its config.yaml): using %r",
                       meta_path, current, recorded, recorded)
    return recorded


def file_identity(dataset: "Dataset", path: Path) -> List[Any]:
    """``[name relative to the dataset, bytes, mtime_ns, footer sha256]`` of a split file: what changes when it is
    rewritten (even at the same size), read without the data; the key of saved vocabularies and validation records."""
    stat = path.stat()
    return [str(path.relative_to(dataset.root)), stat.st_size, stat.st_mtime_ns, footer_sha256(path)]


def footer_sha256(path: Union[str, Path]) -> str:
    """sha256 (hex) of a Parquet file's footer: the schema, and per row group and column the sizes, offsets and
    statistics (min / max / null count) — what changes when the file's contents change, read without the data."""
    path = Path(path)
    with _naming_file(path), open(path, "rb") as fh:
        fh.seek(-8, os.SEEK_END)
        tail = fh.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length + 12 > fh.tell():
            raise OSError("no Parquet footer at the end")
        fh.seek(-8 - length, os.SEEK_END)
        return hashlib.sha256(fh.read(length)).hexdigest()


class ParquetFile:
    """A Parquet file opened by :func:`open_parquet`: pyarrow's reader whose errors name the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with _naming_file(path):
            # pre_buffer=False: with pyarrow's default, iter_batches keeps the bytes of every row group read until
            # the file is done, so a full pass (vocabulary, validation, labels) held the whole file
            self._file = pq.ParquetFile(path, pre_buffer=False)

    @property
    def metadata(self) -> pq.FileMetaData:
        """The footer: row groups and their row counts."""
        return self._file.metadata

    @property
    def schema_arrow(self) -> pa.Schema:
        """The file's Arrow schema."""
        return self._file.schema_arrow

    def read_row_group(self, index: int, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """Row group ``index`` (``columns`` only, if given)."""
        with _naming_file(self.path):
            return self._file.read_row_group(index, columns=columns)

    def iter_batches(self, batch_size: int, columns: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
        """The rows in record batches of at most ``batch_size`` rows (``columns`` only, if given)."""
        with _naming_file(self.path):
            yield from self._file.iter_batches(batch_size=batch_size, columns=columns)


def open_parquet(path: Union[str, Path]) -> ParquetFile:
    """Opens ``path`` for reading; a truncated, corrupt or 0-byte file (now or while reading) is a
    :class:`DatasetError` naming it."""
    return ParquetFile(Path(path))


@contextmanager
def _naming_file(path: Path) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())
        raise DatasetError(f"{path}: not a readable Parquet file ({reason})") from None


def _split_files(root: Path, split: str) -> Tuple[Path, ...]:
    single = root / f"{split}.parquet"
    folder = root / split
    if single.is_file() and folder.is_dir():
        raise DatasetError(f"dataset {root}: split {split!r} is both {single.name} and a folder {folder.name}/")
    if single.is_file():
        return (single,)
    if folder.is_dir():
        files = tuple(sorted(folder.glob("*.parquet")))
        if not files:
            raise DatasetError(f"dataset {root}: split folder {folder} holds no .parquet files")
        return files
    raise DatasetError(f"dataset {root}: split {split!r} is missing (expected {single.name} or {folder.name}/)")


def atomic_write(path: Path, write: Any) -> None:
    """Writes ``path`` through ``write(binary file handle)`` to a temporary name, then renames it, so concurrent
    writers of identical contents (one per rank) never leave a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)
