"""A dataset on disk: a folder of ``train`` / ``val`` / ``test`` Parquet splits and an optional ``meta.json``.

Each split is either ``<split>.parquet`` or a folder ``<split>/`` of ``.parquet`` files (read in
sorted file-name order; row numbers within a split count across its files in that order).

Every Parquet file is read through :func:`open_parquet`, so a truncated, corrupt or empty file is a
:class:`DatasetError` naming it, never a pyarrow traceback.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq

from mdaf_rec.config import is_timezone
from mdaf_rec.data.schema import META_FILE, SPLITS, TIMESTAMP
from mdaf_rec.data.validate import TIMESTAMP_RANGE, ColumnRules, validate
from mdaf_rec.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TIMEZONE = "UTC"


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
                _check_timestamps(open_parquet(f))
        meta_path = root / META_FILE
        meta: Dict[str, Any] = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise DatasetError(f"{meta_path}: not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise DatasetError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
            zone = meta.get("timezone")
            if zone is not None and not is_timezone(zone):  # read by every batch: refuse it here, not mid-epoch
                raise DatasetError(f"{meta_path}: field 'timezone': {zone!r} is not an IANA time zone name "
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


class ParquetFile:
    """A Parquet file opened by :func:`open_parquet`: pyarrow's reader whose errors name the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with _naming_file(path):
            self._file = pq.ParquetFile(path)

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


def _check_timestamps(parquet: ParquetFile) -> None:
    """Refuses an implausible ``timestamp`` when the dataset is opened, not when an epoch reaches it: the
    footer's min / max of each row group point at the row groups to read, whose values are then validated
    (:data:`~mdaf_rec.data.validate.TIMESTAMP_RANGE`) to name the row. Without statistics the loader's
    validation of each batch still refuses it."""
    meta = parquet.metadata
    leaf = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == TIMESTAMP), None)
    if leaf is None:
        return
    lo, hi = TIMESTAMP_RANGE
    offset = 0
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(leaf).statistics
        if stats is not None and stats.has_min_max and not (lo <= stats.min and stats.max < hi):
            validate(parquet.read_row_group(i, [TIMESTAMP]), ColumnRules.build(), str(parquet.path), offset, [TIMESTAMP])
        offset += meta.row_group(i).num_rows


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
