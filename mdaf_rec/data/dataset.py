"""A dataset on disk: a folder of ``train`` / ``val`` / ``test`` Parquet splits and an optional ``meta.json``.

Each split is either ``<split>.parquet`` or a folder ``<split>/`` of ``.parquet`` files (read in
sorted file-name order; row numbers within a split count across its files in that order).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import pyarrow.parquet as pq

from mdaf_rec.data.schema import META_FILE, SPLITS
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

        Raises :class:`DatasetError` naming the folder and the missing or empty split.
        """
        root = Path(path)
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
        files = {split: _split_files(root, split) for split in SPLITS}
        meta_path = root / META_FILE
        meta: Dict[str, Any] = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise DatasetError(f"{meta_path}: not valid JSON ({e})") from None
        logger.debug("opened dataset %s: %s", root, {s: len(f) for s, f in files.items()})
        return Dataset(root=root, files=files, meta=meta)

    def split_files(self, split: str) -> Tuple[Path, ...]:
        """The Parquet files of ``split``, in read order."""
        if split not in self.files:
            raise DatasetError(f"dataset {self.root}: unknown split {split!r} (known: {list(self.files)})")
        return self.files[split]

    def num_rows(self, split: str) -> int:
        """Rows of ``split``, from the Parquet footers (no data is read)."""
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.split_files(split))

    def timezone(self, configured: Optional[str] = None) -> str:
        """The IANA time zone for ``hour`` / ``dayofweek``: ``configured``, else meta's, else UTC."""
        return configured or self.meta.get("timezone") or DEFAULT_TIMEZONE


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
