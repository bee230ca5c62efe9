"""The converters' out-of-core engine: DuckDB under a memory limit, spilling to a temp folder.

A converter parses and checks its raw CSV files block by block in Python (:mod:`.common`: the bad-row
policy, one 64 MB block in memory at a time) and *stages* the typed columns as Parquet files
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
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mdaf_rec.data.converters.common import BadRows, ConversionError, iso_day, positive_int
from mdaf_rec.data.schema import LABEL, META_FILE, REQUIRED_COLUMNS, SPLITS, TIMESTAMP

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = "2GB"
_SIZE = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
# Row groups: at most ROWS_PER_GROUP rows, and a split holds about TARGET_GROUPS of them when it has more
# than TARGET_GROUPS * MIN_ROWS_PER_GROUP rows, so that W ranks x DataLoader workers each get whole groups.
ROWS_PER_GROUP = 1 << 17
MIN_ROWS_PER_GROUP = 1 << 12
TARGET_GROUPS = 64
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
    """Parquet row-group size for a split of ``rows`` rows (see :data:`TARGET_GROUPS`)."""
    return int(min(ROWS_PER_GROUP, max(MIN_ROWS_PER_GROUP, -(-rows // TARGET_GROUPS))))


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
    return rows


class Engine:
    """A DuckDB database in a fresh folder under ``--temp-dir`` (or ``--out``), removed on exit.

    Use as a context manager. ``args`` needs ``out``, ``memory_limit``, ``temp_dir`` and ``threads``.
    The methods below :meth:`stage` are the dialect both engines provide (``SparkEngine`` has the same).
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
            self.con = duckdb.connect(":memory:", config=config)
        except duckdb.Error as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise ConversionError(f"--memory-limit {args.memory_limit}: {e}") from None
        self.settings: Dict[str, Any] = {"engine": "duckdb", "version": duckdb.__version__,
                                         "memory_limit": args.memory_limit}
        self.settings["threads"] = int(self.one("SELECT current_setting('threads')")[0])
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

    def _execute(self, query: str) -> duckdb.DuckDBPyConnection:
        """Runs ``query``; running out of memory or of temp-folder disk is a one-line error naming the settings."""
        try:
            return self.con.execute(query)
        except (duckdb.OutOfMemoryException, duckdb.IOException) as e:
            first = str(e).strip().splitlines()[0]
            raise ConversionError(
                f"DuckDB: {first} (--memory-limit {self.settings['memory_limit']}, temp folder {self.folder}: "
                "raise the limit or free disk space there / choose another --temp-dir)"
            ) from None

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

    def write_parquet(self, query: str, path: Path, schema: pa.Schema, row_group_size: int) -> None:
        """Writes the rows of ``query`` (its columns cast to ``schema``'s types in SQL) in order into the
        Parquet file ``path`` (zstd), in row groups of ``row_group_size`` rows."""
        del schema  # the query's casts give DuckDB's COPY the types
        self.sql(f"COPY ({query}) TO '{path}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {row_group_size})")


def add_histories(
    engine: Engine,
    table: str,
    queries: str,
    groups: Sequence[Tuple[str, Mapping[str, str]]],
    max_len: int,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Creates ``table``: the rows of ``queries`` with, per group ``(events, columns)``, list columns holding
    the user's last ``max_len`` events of ``events`` STRICTLY before the row's timestamp, oldest first, most
    recent last, and the ``extra`` columns (name -> SQL expression over the query's columns).

    Events at the same second as each other keep their :data:`SEQ` (file) order. ``queries`` and each
    ``events`` are relations (table names or parenthesised queries) with ``user_id``, ``timestamp`` and
    :data:`SEQ`; ``columns`` maps an output list column to the event expression it gathers (e.g.
    ``{"item_history": "item_id"}``); ``queries`` may also be the events (a click's history of clicks), and
    several queries may share a (user, timestamp, seq) (a click and its negatives).

    How, with narrow sorts and one list window (lists are what is expensive to move): the queries and all
    groups' events go into one relation ordered per user by (timestamp, queries first, seq), so the events
    before a query's position are exactly those strictly earlier. A running count per group numbers the
    events; a query's history of group g starts at the event numbered (events before it - max_len + 1),
    whose position an equi-join on (user, number) finds (pure equality keys: a residual condition in the
    ON clause made DuckDB's join quadratic); ``list(...) FILTER (WHERE the row is a g event)``
    over the variable frame from that position to the row before the query gathers the history. Each step
    is a sort, a join or a window that spills under the memory limit, and lists are only built for queries.
    """
    if engine.dialect != "duckdb":
        engine.add_histories(table, queries, groups, max_len, extra)
        return
    extra = dict(extra or {})
    extra_sql = "".join(f", {expr} AS {name}" for name, expr in extra.items())
    if max_len == 0:
        lists = "".join(f", []::BIGINT[] AS {c}" for _, columns in groups for c in columns)
        engine.sql(f"CREATE TABLE {table} AS SELECT *{lists}{extra_sql} FROM {queries}")
        return
    # _tie makes the order total where queries share (timestamp, seq) (a click and its negatives): the frames
    # count physical rows, so the order must not leave ties
    parts = [f"SELECT *, 0 AS _kind, row_number() OVER () AS _tie FROM {queries}"]
    for g, (events, columns) in enumerate(groups):
        values = ", ".join(f"{expr} AS _v{g}_{i}" for i, expr in enumerate(columns.values()))
        parts.append(f"SELECT user_id, {TIMESTAMP}, {SEQ}, {g + 1} AS _kind, 0 AS _tie, {values} FROM {events}")
    order = f"PARTITION BY user_id ORDER BY {TIMESTAMP}, _kind, {SEQ}, _tie"
    counts = "".join(f", sum((_kind = {g + 1})::BIGINT) OVER ({order} ROWS BETWEEN UNBOUNDED PRECEDING AND "
                     f"CURRENT ROW) AS _n{g}" for g in range(len(groups)))
    engine.sql(f"CREATE TEMP TABLE _numbered AS SELECT *, row_number() OVER ({order}) AS _pos{counts} "
               f"FROM ({' UNION ALL BY NAME '.join(parts)})")
    joins, wants, backs, lists, internal = [], [], [], [], ["_kind", "_tie", "_pos"]
    for g, (_, columns) in enumerate(groups):
        joins.append(
            f"LEFT JOIN (SELECT user_id AS _u{g}, _n{g} AS _k{g}, _pos AS _p{g} FROM _numbered WHERE _kind = {g + 1}) "
            f"s{g} ON s{g}._u{g} = n.user_id AND s{g}._k{g} = n._w{g}"
        )
        wants.append(f", CASE WHEN _kind = 0 AND _n{g} > 0 THEN greatest(_n{g} - {max_len - 1}, 1) END AS _w{g}")
        backs.append(f", coalesce(n._pos - s{g}._p{g}, 0) AS _b{g}")
        frame = f"OVER ({order} ROWS BETWEEN _b{g} PRECEDING AND 1 PRECEDING)"
        lists += [f"coalesce(list(_v{g}_{i}) FILTER (WHERE _kind = {g + 1}) {frame}, []::BIGINT[]) AS {c}"
                  for i, c in enumerate(columns)]
        internal += [f"_n{g}", f"_w{g}", f"_b{g}", f"_u{g}", f"_k{g}", f"_p{g}"] + [f"_v{g}_{i}" for i in range(len(columns))]
    engine.sql(
        f"CREATE TABLE {table} AS SELECT * EXCLUDE ({', '.join(internal)}){extra_sql} FROM ("
        f"SELECT *, {', '.join(lists)} FROM (SELECT n.*{''.join(backs)}, {', '.join(f's{g}.*' for g in range(len(groups)))} "
        f"FROM (SELECT *{''.join(wants)} FROM _numbered) n {' '.join(joins)})) WHERE _kind = 0"
    )
    engine.sql("DROP TABLE _numbered")


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
    stats = {int(r[0]): r[1:] for r in engine.rows(
        f"SELECT split, count(*), sum({LABEL}), min({TIMESTAMP}), max({TIMESTAMP}) FROM {rows} GROUP BY split"
    )}
    columns = ", ".join(_sql_column(f, engine.LIST) for f in schema)
    splits: Dict[str, Any] = {}
    groups: Dict[str, int] = {}
    total = labels = 0
    for code, split in enumerate(SPLITS):
        n, clicks, first, last = stats.get(code, (0, 0, None, None))
        path = out / f"{split}.parquet"
        if n:
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


def _sql_column(f: pa.Field, list_type: str) -> str:
    if pa.types.is_list(f.type):
        return f"{f.name}::{list_type} AS {f.name}"
    sql_type = {pa.int64(): "BIGINT", pa.int8(): "TINYINT", pa.float32(): "FLOAT"}[f.type]
    return f"{f.name}::{sql_type} AS {f.name}"
