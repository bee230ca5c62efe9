"""The converters' out-of-core engine: DuckDB under a memory limit, spilling to a temp folder.

A converter parses and checks its raw CSV files block by block in Python (:mod:`.common`: the bad-row
policy, one 4 MB block parsed at a time) and *stages* the typed columns as Parquet files
(:meth:`Engine.stage`); everything that needs the whole data (joins, time splits, per-user histories,
negative sampling, counts) then runs as SQL on a DuckDB database file in the temp folder, with
DuckDB's ``memory_limit`` (``--memory-limit``), ``temp_directory`` (spills) and ``threads`` set, so peak
memory is bounded by the setting, not by the input size. :func:`write_dataset` streams each split out of
DuckDB as Arrow batches into Parquet (zstd) with row groups sized for per-rank reading.

``--engine spark`` runs the same SQL on Spark (:mod:`.spark_engine`, imported only then). The converters'
SQL is the dialect both engines share; what differs (making a table, ``hash``, ASOF joins, ``range``,
list columns, the history window, the Parquet writer) is a method of each engine (:class:`Engine` here,
``SparkEngine`` there), opened by :func:`open_engine`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdaf_rec.data.converters.common import BadRows, ConversionError, iso_day, positive_int, take_ranges
from mdaf_rec.data.schema import LABEL, META_FILE, REQUIRED_COLUMNS, SPLITS, TIMESTAMP

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = "2GB"
_SIZE = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
# Row groups: at most ROWS_PER_GROUP rows, and a split holds about TARGET_GROUPS of them when it has more
# than TARGET_GROUPS * MIN_ROWS_PER_GROUP rows, so that W ranks x DataLoader workers each get whole groups.
ROWS_PER_GROUP = 1 << 17
MIN_ROWS_PER_GROUP = 1 << 12
TARGET_GROUPS = 64
# ... and at most ROW_GROUP_BYTES of Arrow data (row_bytes: the values and offsets of the row's columns and
# lists): the writer holds a row group whole before pyarrow encodes it, and the memory that takes (the lists,
# their gather indices, pyarrow's encoding buffers) is several times the group's bytes, so long histories
# make row groups shorter instead of the converter's memory larger (RowGroups).
ROW_GROUP_BYTES = 32 << 20
# Column with the row's position in the raw files (file order), added by Engine.stage; ties keep it.
SEQ = "seq"
# the options that only --engine spark reads
SPARK_OPTIONS = ("spark_master", "spark_driver_memory", "spark_executor_memory", "spark_partitions")
_JVM_SIZE = re.compile(r"^\s*[0-9]+\s*[kmgt]b?\s*$", re.IGNORECASE)
_MASTERS = (
    re.compile(r"^local(\[([0-9]+|\*)(,[0-9]+)?\])?$"),
    re.compile(r"^spark://[^\s:,/]+:[0-9]+(,[^\s:,/]+:[0-9]+)*$"),
    re.compile(r"^yarn$"),
    re.compile(r"^k8s://\S+$"),
)
# Rows per Arrow batch streamed out of DuckDB while writing, and per batch read from a history events file.
OUT_BATCH_ROWS = 1 << 14
EVENT_BATCH_ROWS = 1 << 16


def memory_size(text: str) -> str:
    """A DuckDB memory size such as ``2GB`` or ``512MiB`` (argparse type)."""
    if not _SIZE.match(text):
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 512MB, got {text!r}")
    return text.strip()


def spark_memory(text: str) -> str:
    """A JVM memory size such as ``4g`` or ``512m`` (argparse type)."""
    if not _JVM_SIZE.match(text):
        raise argparse.ArgumentTypeError(f"expected a JVM memory size such as 4g or 512m, got {text!r}")
    return text.strip().lower()


def spark_master(text: str) -> str:
    """A Spark master URL: ``local``, ``local[N]``, ``local[*]``, ``local[N,F]``, ``spark://HOST:PORT[,HOST:PORT]``,
    ``yarn`` or ``k8s://URL`` (argparse type)."""
    if not any(p.match(text) for p in _MASTERS):
        raise argparse.ArgumentTypeError(
            f"expected local[*], local[N], spark://HOST:PORT, yarn or k8s://URL, got {text!r}")
    return text


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--engine``, ``--memory-limit``, ``--temp-dir``, ``--threads`` and the ``--spark-*`` options."""
    parser.add_argument(
        "--engine", choices=("duckdb", "spark"), default="duckdb",
        help="SQL engine for joins, splits, histories and negatives: DuckDB on this machine (default), or Spark "
        "(needs pyspark and Java 17+; docs/data.md)",
    )
    parser.add_argument(
        "--memory-limit", type=memory_size, default=DEFAULT_MEMORY_LIMIT,
        help="DuckDB memory limit; larger intermediate results spill to --temp-dir (default %(default)s)",
    )
    parser.add_argument(
        "--temp-dir", type=Path, default=None,
        help="folder for the engine's database and spill files (default: a temporary folder inside --out; "
        "removed at the end)",
    )
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="DuckDB threads (default: one per core)")
    parser.add_argument(
        "--spark-master", type=spark_master, default=None,
        help="--engine spark: the Spark master (default local[*]; under spark-submit, its --master)",
    )
    parser.add_argument("--spark-driver-memory", type=spark_memory, default=None,
                        help="--engine spark: spark.driver.memory, e.g. 8g (local mode: all the memory Spark "
                        "works in; default Spark's, 1g)")
    parser.add_argument("--spark-executor-memory", type=spark_memory, default=None,
                        help="--engine spark: spark.executor.memory on a cluster, e.g. 8g (default Spark's, 1g)")
    parser.add_argument("--spark-partitions", type=positive_int, default=None,
                        help="--engine spark: spark.sql.shuffle.partitions (default Spark's, 200, coalesced by "
                        "adaptive execution)")


def open_engine(args: argparse.Namespace) -> "Engine":
    """The engine ``args.engine`` names (``duckdb`` when the namespace has none): a DuckDB :class:`Engine` or a
    ``SparkEngine`` (:mod:`.spark_engine`; pyspark is imported only here)."""
    if getattr(args, "engine", "duckdb") == "duckdb":
        given = [f"--{k.replace('_', '-')}" for k in SPARK_OPTIONS if getattr(args, k, None) is not None]
        if given:
            raise ConversionError(f"{', '.join(given)}: only with --engine spark")
        return Engine(args)
    try:
        from mdaf_rec.data.converters.spark_engine import SparkEngine
    except ImportError as e:
        raise ConversionError(f"--engine spark: pyspark is not installed ({e}); pip install 'mdaf_rec[spark]'") from None
    return SparkEngine(args)


def rows_per_group(rows: int) -> int:
    """Parquet row-group size for a split of ``rows`` rows (see :data:`TARGET_GROUPS`); :class:`RowGroups`
    also bounds a group's bytes."""
    return int(min(ROWS_PER_GROUP, max(MIN_ROWS_PER_GROUP, -(-rows // TARGET_GROUPS))))


def row_bytes(table: pa.Table) -> np.ndarray:
    """``(rows,)`` int64: each row's bytes of Arrow data, the fixed-width values plus, per list column, its
    offset and its values (validity bitmaps not counted)."""
    sizes = np.zeros(table.num_rows, np.int64)
    for field, column in zip(table.schema, table.columns):
        if pa.types.is_list(field.type):
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
            sizes += 4 + lengths.astype(np.int64) * (field.type.value_type.bit_width // 8)
        else:
            sizes += field.type.bit_width // 8
    return sizes


class RowGroups:
    """Writes a split's rows, arriving in order as tables, to ``writer`` in row groups of consecutive rows,
    each as long as it can be with at most ``max_rows`` rows and :data:`ROW_GROUP_BYTES` bytes
    (:func:`row_bytes`; a row larger than that is a group of its own). pyarrow writes one row group per call,
    so a group is held until it is full; the bytes bound caps that memory whatever the histories' lengths.
    Both engines write through this, so the same rows make the same row groups.
    """

    def __init__(self, writer: pq.ParquetWriter, max_rows: int) -> None:
        self.writer = writer
        self.max_rows = max_rows
        self.max_bytes = ROW_GROUP_BYTES
        self._pending: List[pa.Table] = []
        self._rows = 0
        self._bytes = 0

    def add(self, table: pa.Table) -> None:
        """Appends ``table``'s rows, writing each row group as soon as it is full."""
        ends = np.cumsum(row_bytes(table))  # bytes of rows [0, i] of the table
        start = 0
        while start < table.num_rows:
            before = int(ends[start - 1]) if start else 0
            # rows from ``start`` on that still fit the open group's bytes and rows
            fit = int(np.searchsorted(ends, before + self.max_bytes - self._bytes, side="right")) - start
            take = min(max(fit, 0 if self._rows else 1), self.max_rows - self._rows, table.num_rows - start)
            if take:
                self._pending.append(table.slice(start, take))
                self._rows += take
                self._bytes += int(ends[start + take - 1]) - before
                start += take
            if self._rows == self.max_rows or start < table.num_rows:
                self.flush()

    def flush(self) -> None:
        """Writes the open row group, if any, and releases its memory."""
        if self._rows:
            self.writer.write_table(pa.concat_tables(self._pending), row_group_size=self._rows)
            self._pending, self._rows, self._bytes = [], 0, 0
            pa.default_memory_pool().release_unused()


def temp_folder(args: argparse.Namespace) -> Path:
    """A fresh folder ``.convert-*`` under ``--temp-dir`` (or ``--out``) for an engine's files."""
    parent = Path(args.temp_dir) if args.temp_dir is not None else Path(args.out)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".convert-", dir=parent))


def write_staged(path: Path, blocks: Iterable[Mapping[str, np.ndarray]]) -> int:
    """Streams ``blocks`` (equal-length named numpy columns) into the Parquet file ``path`` with a column
    :data:`SEQ` numbering the rows in order; returns the number of rows (0: no file)."""
    writer: Optional[pq.ParquetWriter] = None
    rows = 0
    try:
        for block in blocks:
            n = len(next(iter(block.values())))
            table = pa.table({SEQ: np.arange(rows, rows + n, dtype=np.int64), **block})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table)
            rows += n
    finally:
        if writer is not None:
            writer.close()
        pa.default_memory_pool().release_unused()  # the parsed blocks' memory, before the engine takes its share
    return rows


class Engine:
    """A DuckDB database in a fresh folder under ``--temp-dir`` (or ``--out``), removed on exit.

    Use as a context manager. ``args`` needs ``out``, ``memory_limit``, ``temp_dir`` and ``threads``.
    The SQL-dialect methods below :meth:`stage` are what both engines provide (``SparkEngine`` has the same);
    histories and split files differ: DuckDB keeps histories as ranges of sorted events files and
    :func:`write_dataset` cuts the lists while streaming, Spark builds list columns and writes with its own
    ``write_parquet``.
    """

    dialect = "duckdb"
    # join keywords: keep the left rows with (SEMI) / without (ANTI) a match
    SEMI = "SEMI JOIN"
    ANTI = "ANTI JOIN"
    # SQL type of the list columns
    LIST = "BIGINT[]"

    def __init__(self, args: argparse.Namespace) -> None:
        self.folder = temp_folder(args)
        config: Dict[str, Any] = {
            "memory_limit": args.memory_limit,
            "temp_directory": str(self.folder / "spill"),
            "preserve_insertion_order": False,
        }
        if args.threads is not None:
            config["threads"] = args.threads
        try:
            # a database file, not ":memory:": tables larger than the limit then live in the file's blocks, which
            # DuckDB evicts and re-reads, instead of in-memory blocks it must spill (UserBehavior, 32M raw rows,
            # 2GB: peak RSS 2.43 GB against 2.66 GB; docs/benchmarks.md)
            self.con = duckdb.connect(str(self.folder / "engine.duckdb"), config=config)
        except duckdb.Error as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise ConversionError(f"--memory-limit {args.memory_limit}: {e}") from None
        self.settings: Dict[str, Any] = {"engine": "duckdb", "version": duckdb.__version__,
                                         "memory_limit": args.memory_limit}
        self.settings["threads"] = int(self.one("SELECT current_setting('threads')")[0])
        # tables made by add_histories -> their list columns, built by write_dataset
        self.histories: Dict[str, _Histories] = {}
        logger.debug("engine: %s, temp folder %s", self.settings, self.folder)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.con.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def sql(self, query: str) -> None:
        """Runs ``query`` (a statement without result)."""
        self._execute(query)

    def rows(self, query: str) -> List[Tuple]:
        """All result rows of ``query``."""
        return self._execute(query).fetchall()

    def one(self, query: str) -> Tuple:
        """The single result row of ``query``."""
        return self._execute(query).fetchone()

    def batches(self, query: str, rows_per_batch: int) -> Iterator[pa.RecordBatch]:
        """Streams the result of ``query`` as Arrow record batches (in its ``ORDER BY`` order, if any)."""
        try:
            yield from self._execute(query).fetch_record_batch(rows_per_batch)
        except (duckdb.OutOfMemoryException, duckdb.IOException) as e:
            raise self._error(e) from None

    def write_events(self, query: str, path: Path) -> int:
        """Writes the result of ``query`` to ``path`` in its order (uncompressed: a temp file); returns the rows."""
        writer: Optional[pq.ParquetWriter] = None
        rows = 0
        try:
            for batch in self.batches(query, EVENT_BATCH_ROWS):
                if writer is None:
                    writer = pq.ParquetWriter(path, batch.schema, compression="none")
                writer.write_batch(batch)
                rows += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        return rows

    def _execute(self, query: str) -> duckdb.DuckDBPyConnection:
        """Runs ``query``; running out of memory or of temp-folder disk is a one-line error naming the settings."""
        try:
            return self.con.execute(query)
        except (duckdb.OutOfMemoryException, duckdb.IOException) as e:
            raise self._error(e) from None

    def _error(self, e: duckdb.Error) -> ConversionError:
        first = str(e).strip().splitlines()[0]
        return ConversionError(
            f"DuckDB: {first} (--memory-limit {self.settings['memory_limit']}, temp folder {self.folder}: "
            "raise the limit or free disk space there / choose another --temp-dir)"
        )

    def stage(self, name: str, blocks: Iterable[Mapping[str, np.ndarray]]) -> int:
        """Streams ``blocks`` (equal-length named numpy columns) into a Parquet file in the temp folder and
        makes it the view ``name``, with a column :data:`SEQ` numbering the rows in order.

        Returns:
            The number of rows (0: no view is made).
        """
        path = self.folder / f"{name}.parquet"
        rows = write_staged(path, blocks)
        if rows:
            self.sql(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
        return rows

    def create(self, name: str, query: str) -> None:
        """Makes (or replaces) the table ``name`` holding the result of ``query``."""
        self.sql(f"CREATE OR REPLACE TABLE {name} AS {query}")

    def append(self, name: str, query: str) -> None:
        """Adds the result of ``query`` to the table ``name``."""
        self.sql(f"INSERT INTO {name} {query}")

    def drop(self, name: str) -> None:
        """Removes the table ``name``."""
        self.sql(f"DROP TABLE {name}")

    @staticmethod
    def numbers(n: int) -> str:
        """A relation of one BIGINT column ``j``: 0, 1, ..., ``n - 1``."""
        return f"(SELECT range AS j FROM range({n}))"

    @staticmethod
    def uniform(keys: str, total: str) -> str:
        """SQL of a BIGINT in ``[0, total)`` that is a hash of the comma-separated expressions ``keys``."""
        return f"(hash({keys}) % {total}::UBIGINT)::BIGINT"

    @staticmethod
    def range_join(left: str, right: str) -> str:
        """``left`` (alias ``a``; columns ``seg``, ``u``) joined with the row (alias ``p``) of ``right`` (columns
        ``seg``, ``lo``, ``cnt``; per ``seg`` the ranges ``[lo, lo + cnt)`` tile ``[0, total)``) whose range holds
        ``a.u``, for a FROM clause."""
        return f"{left} a ASOF JOIN {right} p ON a.seg = p.seg AND a.u >= p.lo"

    @staticmethod
    def ordered_list(value: str, order: str) -> str:
        """Aggregate SQL: the list of ``value`` ordered by ``order``."""
        return f"list({value} ORDER BY {order})"

    @staticmethod
    def unnest(column: str, value: str, position: str) -> str:
        """SELECT-list SQL: one row per element of the list ``column``, as ``value`` and its ``position``
        (increasing along the list)."""
        return f"unnest({column}) AS {value}, generate_subscripts({column}, 1) AS {position}"

    def empty_list(self) -> str:
        """SQL of an empty list of the list-column type."""
        return f"[]::{self.LIST}"


def add_histories(
    engine: Engine,
    table: str,
    queries: str,
    groups: Sequence[Tuple[str, Mapping[str, str]]],
    max_len: int,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Makes ``table``: the rows of ``queries`` with, per group ``(events, columns)``, list columns holding
    the user's last ``max_len`` events of ``events`` STRICTLY before the row's timestamp, oldest first, most
    recent last, and the ``extra`` columns (name -> SQL expression over the query's columns).

    Events at the same second as each other keep their :data:`SEQ` (file) order. ``queries`` and each
    ``events`` are relations (table names or parenthesised queries) with ``user_id``, ``timestamp`` and
    :data:`SEQ`; ``columns`` maps an output list column to the event expression it gathers (e.g.
    ``{"item_history": "item_id"}``); ``queries`` may also be the events (a click's history of clicks), and
    several queries may share a (user, timestamp, seq) (a click and its negatives).

    How, without ever building a list in the engine (list states do not spill and lists are what is
    expensive to sort and move): each group's events are written once, sorted by (user, timestamp, seq), to a
    Parquet file in the temp folder (:class:`_HistoryEvents` reads it), so a user's events are a contiguous
    run of positions and a history is the slice ``[start, end)`` of that run: ``end`` = the user's first
    position + the number of their events strictly before the row (a running count over the queries and
    events ordered per user by (timestamp, queries first, seq)), ``start`` = ``max(end - max_len, first)``.
    Those two narrow numbers per group are all the rows table ``_{table}_ranges`` holds;
    :func:`write_dataset` builds the lists from them while it streams the rows out in order, and ``table``
    is a view that builds them in SQL for queries (a correlated sub-query per list: fine for small tables
    and tests, not the path that writes datasets).
    """
    if engine.dialect != "duckdb":
        engine.add_histories(table, queries, groups, max_len, extra)
        return
    extra_sql = "".join(f", {expr} AS {name}" for name, expr in extra.items()) if extra else ""
    ranges = f"_{table}_ranges"
    parts = [f"SELECT *, 0 AS _kind FROM {queries}"]
    counts, bounds, joins, internal, lists = [], [], [], ["_kind"], []
    files: List[Tuple[Path, Tuple[str, ...]]] = []
    order = f"PARTITION BY user_id ORDER BY {TIMESTAMP}, _kind, {SEQ} ROWS UNBOUNDED PRECEDING"
    for g, (events, columns) in enumerate(groups):
        path = engine.folder / f"{table}.history{g}.parquet"
        values = ", ".join(f"({expr})::BIGINT AS {name}" for name, expr in columns.items())
        engine.write_events(f"SELECT {values} FROM {events} ORDER BY user_id, {TIMESTAMP}, {SEQ}", path)
        files.append((path, tuple(columns)))
        # each user's first position in the file: the events of the users before it
        engine.sql(f"CREATE OR REPLACE TEMP TABLE _{table}_first{g} AS SELECT user_id AS _u{g}, "
                   f"(sum(n) OVER (ORDER BY user_id ROWS UNBOUNDED PRECEDING) - n)::BIGINT AS _f{g} "
                   f"FROM (SELECT user_id, count(*) AS n FROM {events} GROUP BY user_id)")
        parts.append(f"SELECT user_id, {TIMESTAMP}, {SEQ}, {g + 1} AS _kind FROM {events}")
        counts.append(f", sum((_kind = {g + 1})::BIGINT) OVER ({order}) AS _n{g}")
        bounds.append(f", (coalesce(_f{g}, 0) + greatest(_n{g} - {max_len}, 0))::BIGINT AS _hs{g}, "
                      f"(coalesce(_f{g}, 0) + _n{g})::BIGINT AS _he{g}")
        joins.append(f" LEFT JOIN _{table}_first{g} ON user_id = _u{g}")
        internal += [f"_n{g}", f"_u{g}", f"_f{g}"]
        lists += [f", (SELECT coalesce(list(h.{name} ORDER BY h.file_row_number), []::BIGINT[]) FROM "
                  f"read_parquet('{path}', file_row_number = true) h WHERE h.file_row_number >= r._hs{g} AND "
                  f"h.file_row_number < r._he{g}) AS {name}" for name in columns]
    engine.sql(
        f"CREATE OR REPLACE TABLE {ranges} AS SELECT * EXCLUDE ({', '.join(internal)}){extra_sql}{''.join(bounds)} "
        f"FROM (SELECT *{''.join(counts)} FROM ({' UNION ALL BY NAME '.join(parts)})){''.join(joins)} "
        f"WHERE _kind = 0"
    )
    for g in range(len(groups)):
        engine.sql(f"DROP TABLE _{table}_first{g}")
    hidden = [f"_h{e}{g}" for g in range(len(groups)) for e in "se"]
    engine.sql(f"CREATE OR REPLACE VIEW {table} AS SELECT r.*{' EXCLUDE (' + ', '.join(hidden) + ')' if hidden else ''}"
               f"{''.join(lists)} FROM {ranges} r")
    engine.histories[table] = _Histories(ranges, files)


@dataclass(frozen=True)
class _Histories:
    """The list columns of a table made by :func:`add_histories`, for :func:`write_dataset`.

    Attributes:
        ranges: the rows table; group ``g``'s history of a row is ``[_hs{g}, _he{g})`` in ``files[g]``.
        files: per group, its sorted events file and the list columns it holds (one column each).
    """

    ranges: str
    files: List[Tuple[Path, Tuple[str, ...]]]


class _HistoryEvents:
    """Reads one group's sorted events file front to back, keeping only what the rows still to come need.

    The rows are written in (user, timestamp, ...) order, so the non-empty ranges ``[start, end)`` of
    successive batches never move backwards: positions before a batch's first start are dropped.
    """

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        # pre_buffer=False: with pyarrow's default, iter_batches keeps the bytes of every row group read so
        # far until it ends, so memory grew with the events file (up to its whole size, once per split)
        self._batches = pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=EVENT_BATCH_ROWS,
                                                                             columns=list(columns))
        self._columns = list(columns)
        self._first = 0  # position of the kept values' first entry
        self._values = [np.empty(0, np.int64) for _ in columns]

    def lists(self, starts: np.ndarray, ends: np.ndarray) -> List[pa.ListArray]:
        """One list array per column: row ``i`` holds the values at positions ``[starts[i], ends[i])``."""
        filled = ends > starts
        if filled.any():
            first, last = int(starts[filled].min()), int(ends[filled].max())
            if first < self._first:
                raise RuntimeError(f"history ranges out of order: position {first} after {self._first}")
            chunks = [[v[first - self._first:]] for v in self._values]
            end = self._first + len(self._values[0])
            self._first = first
            while end < last:
                batch = next(self._batches)
                skip = max(first - end, 0)
                if skip < batch.num_rows:
                    for i, column in enumerate(self._columns):
                        chunks[i].append(batch.column(column).to_numpy()[skip:])
                end += batch.num_rows
            self._values = [np.concatenate(c) for c in chunks]
        offsets, index = take_ranges(np.where(filled, starts - self._first, 0), np.where(filled, ends - self._first, 0))
        offsets = pa.array(offsets.astype(np.int32))
        return [pa.ListArray.from_arrays(offsets, pa.array(v[index], pa.int64())) for v in self._values]


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def local_date_split(engine: Engine, table: str, val_days: int, test_days: int) -> Tuple[str, Dict[str, Any]]:
    """Test = the last ``test_days`` local calendar days of ``table`` (its ``day`` column: local days since
    1970-01-01), val = the ``val_days`` before them, train = everything earlier.

    Returns:
        ``(SQL expression of the split code (0 train, 1 val, 2 test), description for meta.json)``.
    """
    first, last = engine.one(f"SELECT min(day), max(day) FROM {table}")
    test_first = last - test_days + 1
    val_first = test_first - val_days
    if not engine.one(f"SELECT count(*) FROM {table} WHERE day < {val_first}")[0]:
        raise ConversionError(
            f"no training rows: the data spans local dates {iso_day(first)}..{iso_day(last)}, "
            f"fewer than --val-days {val_days} + --test-days {test_days} + 1 days"
        )
    rule = {
        "rule": "local calendar date",
        "train": f"..{iso_day(val_first - 1)}",
        "val": f"{iso_day(val_first)}..{iso_day(test_first - 1)}" if val_days else "empty",
        "test": f"{iso_day(test_first)}..{iso_day(last)}",
    }
    return f"CASE WHEN day >= {test_first} THEN 2 WHEN day >= {val_first} THEN 1 ELSE 0 END", rule


def time_quantile_split(engine: Engine, table: str, fractions: Sequence[float]) -> Tuple[str, Dict[str, Any]]:
    """Global time split of ``table``: the cut times are the ``fractions`` quantiles of all timestamps (the
    timestamp at position ``round(n * q)`` in sorted order). Rows at a cut time go to the later split, so
    one second never spans two splits.

    Returns:
        ``(SQL expression of the split code, description for meta.json)``.
    """
    n = engine.one(f"SELECT count(*) FROM {table}")[0]
    cuts = []
    for q in np.cumsum(fractions)[:2]:
        position = min(int(round(n * q)), n - 1)
        cuts.append(int(engine.one(f"SELECT {TIMESTAMP} FROM {table} ORDER BY {TIMESTAMP} "
                                   f"LIMIT 1 OFFSET {position}")[0]))
    rule = {"rule": "global time quantiles", "fractions": list(fractions), "val_from": cuts[0], "test_from": cuts[1]}
    return f"CASE WHEN {TIMESTAMP} >= {cuts[1]} THEN 2 WHEN {TIMESTAMP} >= {cuts[0]} THEN 1 ELSE 0 END", rule


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def arrow_schema(extra_sparse: Sequence[str], dense: Sequence[str], extra_histories: Sequence[str] = ()) -> pa.Schema:
    """The canonical schema followed by the extra int64, float32 and list<int64> columns."""
    fields = [pa.field(name, type_) for name, type_ in REQUIRED_COLUMNS.items()]
    fields += [pa.field(name, pa.int64()) for name in extra_sparse]
    fields += [pa.field(name, pa.float32()) for name in dense]
    fields += [pa.field(name, pa.list_(pa.int64())) for name in extra_histories]
    return pa.schema(fields)


def write_dataset(
    engine: Engine,
    out: Path,
    rows: str,
    *,
    order_by: str,
    extra_sparse: Sequence[str],
    dense: Sequence[str],
    meta: Mapping[str, Any],
    bad: BadRows,
    extra_histories: Mapping[str, str] | None = None,
) -> Dict[str, Any]:
    """Writes ``train/val/test.parquet`` and ``meta.json`` into ``out`` (created; files replaced).

    Args:
        rows: a table with the canonical columns, the extra columns and ``split`` (0 train, 1 val, 2 test).
        order_by: the row order within a split (SQL ``ORDER BY`` list).
        meta: converter-specific fields (``format``, ``protocol``, ``timezone``, ``source``, ``split``, ...);
            row counts, CTRs, column lists and dropped-row counts are added here.
        extra_histories: extra list columns -> what each holds (for ``meta.json``).

    Returns:
        The meta written.
    """
    extra_histories = dict(extra_histories or {})
    out.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(extra_sparse, dense, list(extra_histories))
    histories = engine.histories.get(rows) if engine.dialect == "duckdb" else None
    source = histories.ranges if histories is not None else rows
    stats = {int(r[0]): r[1:] for r in engine.rows(
        f"SELECT split, count(*), sum({LABEL}), min({TIMESTAMP}), max({TIMESTAMP}) FROM {source} GROUP BY split"
    )}
    splits: Dict[str, Any] = {}
    groups: Dict[str, int] = {}
    total = labels = 0
    for code, split in enumerate(SPLITS):
        n, clicks, first, last = stats.get(code, (0, 0, None, None))
        path = out / f"{split}.parquet"
        if n:
            if engine.dialect == "duckdb":  # lists cut from the history events files while streaming
                _write_split(engine, path, schema, f"FROM {source} WHERE split = {code} ORDER BY {order_by}",
                             histories, rows_per_group(n))
            else:  # the engine's rows hold their lists
                columns = ", ".join(_sql_column(f, engine.LIST) for f in schema)
                engine.write_parquet(f"SELECT {columns} FROM {rows} WHERE split = {code} ORDER BY {order_by}", path,
                                     schema, rows_per_group(n))
        else:
            pq.write_table(schema.empty_table(), path, compression="zstd")
        groups[split] = pq.ParquetFile(path).metadata.num_row_groups
        splits[split] = {
            "rows": int(n),
            "ctr": float(clicks) / n if n else None,
            "first_timestamp": int(first) if n else None,
            "last_timestamp": int(last) if n else None,
        }
        total += n
        labels += int(clicks or 0)
        logger.info("wrote %s: %d rows, CTR %s", path, n, splits[split]["ctr"])
    full = dict(meta)
    full.update(
        rows=int(total),
        splits=splits,
        extra_sparse=list(extra_sparse),
        dense=list(dense),
        **({"extra_histories": extra_histories} if extra_histories else {}),
        row_groups=groups,
        engine=engine.settings,
        dropped=dict(sorted(bad.counts.items())),
        dropped_total=int(sum(bad.counts.values())),
    )
    (out / META_FILE).write_text(json.dumps(full, indent=2) + "\n")
    return full


def _write_split(engine: Engine, path: Path, schema: pa.Schema, rows: str, histories: Optional[_Histories],
                 group_rows: int) -> None:
    """Streams ``SELECT ... {rows}`` (the ``FROM``, ``WHERE`` and ``ORDER BY`` clauses) into ``path`` with
    ``schema``, in :class:`RowGroups` of at most ``group_rows`` rows; the list columns of ``histories`` are
    built from their events files batch by batch."""
    built = {name: g for g, (_, names) in enumerate(histories.files if histories else []) for name in names}
    columns = [_sql_column(f, engine.LIST) for f in schema if f.name not in built]
    columns += [f"_h{e}{g}" for g in range(len(histories.files) if histories else 0) for e in "se"]
    events = [_HistoryEvents(file, names) for file, names in (histories.files if histories else [])]
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        groups = RowGroups(writer, group_rows)
        for batch in engine.batches(f"SELECT {', '.join(columns)} {rows}", OUT_BATCH_ROWS):
            arrays = {name: batch.column(name) for name in batch.schema.names}
            for g, reader in enumerate(events):
                starts, ends = (batch.column(f"_h{e}{g}").to_numpy() for e in "se")
                arrays.update(zip(histories.files[g][1], reader.lists(starts, ends)))
            groups.add(pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema))
        groups.flush()


def _sql_column(f: pa.Field, list_type: str) -> str:
    if pa.types.is_list(f.type):
        return f"{f.name}::{list_type} AS {f.name}"
    sql_type = {pa.int64(): "BIGINT", pa.int8(): "TINYINT", pa.float32(): "FLOAT"}[f.type]
    return f"{f.name}::{sql_type} AS {f.name}"
