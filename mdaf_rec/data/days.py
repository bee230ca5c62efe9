"""Day slices: a dataset whose training split keeps only the rows of some local days.

``mdaf-rec train --from-date D1 --to-date D2`` (``data.from_date`` / ``data.to_date``) trains on the rows of the
training split whose LOCAL date (``timestamp`` in the run's time zone, ``features.timezone``) lies in
``[D1, D2]`` (either end open when not given); validation and test stay whole. The rows are written once, in
split order, to a dataset folder of their own (:func:`day_slice`)::

    <derived>/days/<D1>_<D2>_<zone>/      (<derived>: DATASET/vocab/, else the cache folder, see
      train.parquet                         mdaf_rec.data.vocab.derived_folders; "first"/"last" for an open end)
      val.parquet, test.parquet (or val/, test/)   links to the dataset's own files
      meta.json                             the dataset's, with the slice's train rows and a "day_slice" entry

so that the slice has its own vocabularies and validation record, and a later run of the same days reuses it:
``day_slice`` records the dataset's training files (name, size, mtime, Parquet footer hash), the days and the
zone, and writes the slice again when any of them differs.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdaf_rec.config import parse_date
from mdaf_rec.data.dataset import READ_BATCH_ROWS, Dataset, DatasetError, file_identity, open_parquet, read_meta
from mdaf_rec.data.schema import META_FILE, TIMESTAMP
from mdaf_rec.data.vocab import derived_folders

logger = logging.getLogger(__name__)

DAYS_DIR = "days"
SLICE_KEY = "day_slice"
_SECONDS_PER_DAY = 86_400


def day_bounds(from_date: Optional[str], to_date: Optional[str], timezone: str) -> Tuple[Optional[int], Optional[int]]:
    """``[lo, hi)`` in UTC epoch seconds: local midnight starting ``from_date`` and local midnight ending
    ``to_date`` in ``timezone`` (``None`` for an open end; exact across daylight-saving changes)."""
    zone = ZoneInfo(timezone)

    def midnight(day: Optional[datetime.date]) -> Optional[int]:
        if day is None:
            return None
        return int(datetime.datetime.combine(day, datetime.time(), tzinfo=zone).timestamp())

    last = parse_date(to_date) if to_date is not None else None
    return (midnight(parse_date(from_date) if from_date is not None else None),
            midnight(last + datetime.timedelta(days=1) if last is not None else None))


def day_slice(
    dataset: Dataset, from_date: Optional[str], to_date: Optional[str], timezone: str,
    cache_dir: Optional[Union[str, Path]] = None,
) -> Dataset:
    """The dataset whose training split is ``dataset``'s rows of local dates ``[from_date, to_date]``, written
    (or reused, see the module docstring) in the first writable derived folder of ``dataset``.

    Raises:
        DatasetError: no training row falls in those days (the message gives the days the split spans), or
            no derived folder is writable.
    """
    name = f"{from_date or 'first'}_{to_date or 'last'}_{timezone.replace('/', '-')}"
    wanted = {"source": str(dataset.root.resolve()), "from_date": from_date, "to_date": to_date, "timezone": timezone,
              "train_files": [file_identity(dataset, p) for p in dataset.split_files("train")]}
    errors: List[str] = []
    for base in derived_folders(dataset, cache_dir):
        folder = base / DAYS_DIR / name
        if _slice_key(folder) == wanted:
            logger.info("training on the day slice %s (reused)", folder)
            return Dataset.open(folder)
        try:
            _write_slice(dataset, folder, wanted)
        except OSError as e:
            errors.append(f"{base}: {e.strerror or e}")
            continue
        return Dataset.open(folder)
    raise DatasetError(f"dataset {dataset.root}: cannot write the day slice {name} ({'; '.join(errors)}); pass a "
                       "writable data.vocab_dir")


def _slice_key(folder: Path) -> Optional[Dict[str, Any]]:
    """The key a slice folder was written for; ``None`` if there is none (or its ``meta.json`` is unreadable)."""
    try:
        entry = read_meta(folder).get(SLICE_KEY)
    except DatasetError:
        return None
    return entry.get("key") if isinstance(entry, dict) else None


def _write_slice(dataset: Dataset, folder: Path, key: Dict[str, Any]) -> None:
    """Writes the slice into a temporary folder next to ``folder``, then renames it into place."""
    lo, hi = day_bounds(key["from_date"], key["to_date"], key["timezone"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rows, first, last = _filter_train(dataset, tmp / "train.parquet", lo, hi)
        if rows == 0:
            span = (f"its rows span local dates {_local_date(first, key['timezone'])}..{_local_date(last, key['timezone'])}"
                    if first is not None else "it has no rows")
            raise DatasetError(
                f"dataset {dataset.root}: no training row has a local date ({key['timezone']}) in "
                f"[{key['from_date'] or 'first'}, {key['to_date'] or 'last'}] (data.from_date / data.to_date); {span}"
            )
        for split in ("val", "test"):
            _link_split(dataset, split, tmp)
        meta = read_meta(dataset.root)
        if isinstance(meta.get("splits"), dict):
            meta["splits"] = {**meta["splits"], "train": {"rows": rows}}
        meta.pop("row_groups", None)
        meta[SLICE_KEY] = {"key": key, "rows": rows}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))  # last: a slice without it is never reused
        if folder.exists():
            shutil.rmtree(folder)  # another slice of these days: of rewritten training files
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote the day slice %s: %d training rows of local dates [%s, %s] (%s)", folder, rows,
                key["from_date"] or "first", key["to_date"] or "last", key["timezone"])


def _filter_train(dataset: Dataset, out: Path, lo: Optional[int], hi: Optional[int]) -> Tuple[int, Optional[int], Optional[int]]:
    """Streams the training split into ``out``, keeping rows with ``lo <= timestamp < hi``, in split order;
    returns the rows kept and the split's first and last timestamp."""
    writer: Optional[pq.ParquetWriter] = None
    pending: List[pa.RecordBatch] = []
    rows, first, last = 0, None, None

    def flush() -> None:
        if pending:
            writer.write_table(pa.Table.from_batches(pending))
            pending.clear()

    try:
        for path in dataset.split_files("train"):
            for batch in open_parquet(path).iter_batches(READ_BATCH_ROWS):
                ts = batch.column(TIMESTAMP)
                if len(ts):
                    low, high = pc.min_max(ts).values()
                    first = low.as_py() if first is None else min(first, low.as_py())
                    last = high.as_py() if last is None else max(last, high.as_py())
                tests = ([pc.greater_equal(ts, lo)] if lo is not None else []) + ([pc.less(ts, hi)] if hi is not None else [])
                kept = batch.filter(tests[0] if len(tests) == 1 else pc.and_(*tests))
                if writer is None:
                    writer = pq.ParquetWriter(out, batch.schema, compression="zstd")
                if kept.num_rows:
                    pending.append(kept)
                    rows += kept.num_rows
                if sum(b.num_rows for b in pending) >= READ_BATCH_ROWS:
                    flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return rows, first, last


def _link_split(dataset: Dataset, split: str, folder: Path) -> None:
    """``folder/<split>.parquet`` (or ``folder/<split>/``) as links to ``dataset``'s files of ``split``."""
    files = dataset.split_files(split)
    if files == (dataset.root / f"{split}.parquet",):
        os.symlink(files[0].resolve(), folder / f"{split}.parquet")
        return
    (folder / split).mkdir()
    for f in files:
        os.symlink(f.resolve(), folder / split / f.name)


def _local_date(seconds: int, timezone: str) -> str:
    return datetime.datetime.fromtimestamp(seconds, ZoneInfo(timezone)).date().isoformat()
