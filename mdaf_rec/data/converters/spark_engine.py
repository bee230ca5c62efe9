"""``--engine spark``: the converters' SQL on Spark, for inputs that outgrow one machine.

The same converter code runs on either engine (:mod:`.engine`): the raw CSV is parsed and checked on the
driver (:mod:`.common`, the bad-row policy) and staged as Parquet in the temp folder; every table the SQL
makes is a Spark query written as Parquet into the temp folder (so each step reads materialised input,
spills under Spark's memory settings and keeps no long lineage) and registered as a temporary view of
that name. This module holds what differs from DuckDB's dialect: ``LEFT SEMI`` / ``LEFT ANTI`` joins,
``xxhash64`` for the random draws (so negatives differ from DuckDB's, with the same distribution), an
equi-join on exploded click positions for DuckDB's ASOF join, ``posexplode`` / ``collect_list`` for lists,
a history algorithm without DuckDB's variable window frames (:meth:`SparkEngine.add_histories`), and the
writer that streams Spark's sorted part files into one canonical Parquet file per split.

On a cluster, ``--temp-dir`` must be a folder that the driver and every executor see at the same path
(NFS or another shared mount), and ``--out`` must be writable by the driver: the staged Parquet is written
by the driver and read by the executors, and the split files are assembled on the driver.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession

from mdaf_rec.data.converters.common import ConversionError
from mdaf_rec.data.converters.engine import OUT_BATCH_ROWS, SEQ, RowGroups, temp_folder, write_staged
from mdaf_rec.data.schema import TIMESTAMP, USER_ID

logger = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"
# seconds to wait for a spark:// master to accept a connection before giving up
CONNECT_TIMEOUT = 5.0
# Spark errors that are about resources, not about the SQL: a one-line error naming the settings
_RESOURCE_ERRORS = ("OutOfMemoryError", "No space left on device", "SparkOutOfMemoryError")


def _check_java() -> None:
    """A one-line error when no ``java`` is found (``$JAVA_HOME/bin/java`` or on ``PATH``)."""
    home = os.environ.get("JAVA_HOME")
    if home:
        if not (Path(home) / "bin" / "java").is_file():
            raise ConversionError(f"--engine spark: JAVA_HOME={home} has no bin/java (Spark needs Java 17+)")
    elif shutil.which("java") is None:
        raise ConversionError("--engine spark: no java on PATH and JAVA_HOME unset (Spark needs Java 17+)")


def _check_master(master: str) -> None:
    """A one-line error when a ``spark://`` master accepts no connection on any of its hosts."""
    if not master.startswith("spark://"):
        return
    errors = []
    for address in master[len("spark://"):].split(","):
        host, port = address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
            return
        except OSError as e:
            errors.append(f"{address}: {e.strerror or e}")
    raise ConversionError(f"--spark-master {master}: unreachable ({'; '.join(errors)})")


class SparkEngine:
    """A Spark session (the active one, e.g. under spark-submit or in tests, else a new one from the
    ``--spark-*`` options, stopped on exit) and a fresh temp folder under ``--temp-dir`` (or ``--out``),
    removed on exit. Same methods as the DuckDB :class:`~mdaf_rec.data.converters.engine.Engine`."""

    dialect = "spark"
    SEMI = "LEFT SEMI JOIN"
    ANTI = "LEFT ANTI JOIN"
    LIST = "ARRAY<BIGINT>"

    def __init__(self, args: argparse.Namespace) -> None:
        self.spark: SparkSession
        active = SparkSession.getActiveSession()
        self._owned = active is None
        if active is None:
            _check_java()
            master = args.spark_master or (None if "PYSPARK_GATEWAY_PORT" in os.environ else DEFAULT_MASTER)
            if master is not None:
                _check_master(master)
        self.folder = temp_folder(args)
        self._views: Dict[str, Path] = {}
        self._count = 0
        try:
            if active is None:
                builder = SparkSession.builder.appName("mdaf-rec data")
                if master is not None:
                    builder = builder.master(master)
                confs = {
                    "spark.driver.memory": args.spark_driver_memory,
                    "spark.executor.memory": args.spark_executor_memory,
                    "spark.local.dir": str(self.folder / "spill"),
                    "spark.ui.enabled": "false",
                    "spark.ui.showConsoleProgress": "false",
                }
                for key, value in confs.items():
                    if value is not None:
                        builder = builder.config(key, value)
                self.spark = builder.getOrCreate()
                self.spark.sparkContext.setLogLevel("ERROR")
            else:
                self.spark = active
            if args.spark_partitions is not None:
                self.spark.conf.set("spark.sql.shuffle.partitions", str(args.spark_partitions))
        except Exception as e:  # the JVM did not start or the cluster refused the application
            shutil.rmtree(self.folder, ignore_errors=True)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConversionError(f"--engine spark: could not start Spark ({first})") from None
        conf = self.spark.sparkContext.getConf()
        self.settings: Dict[str, Any] = {
            "engine": "spark",
            "version": self.spark.version,
            "master": self.spark.sparkContext.master,
            "driver_memory": conf.get("spark.driver.memory", "1g"),
            "executor_memory": conf.get("spark.executor.memory", "1g"),
            "partitions": int(self.spark.conf.get("spark.sql.shuffle.partitions")),
        }
        logger.debug("engine: %s, temp folder %s", self.settings, self.folder)

    def __enter__(self) -> "SparkEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self._views:
            self.spark.catalog.dropTempView(name)
        if self._owned:
            self.spark.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------
    # Queries and tables
    # ---------------------------------------------------------------------------------------------

    def rows(self, query: str) -> List[Tuple]:
        """All result rows of ``query``."""
        return [tuple(r) for r in self._run(lambda: self.spark.sql(query).collect())]

    def one(self, query: str) -> Tuple:
        """The single result row of ``query``."""
        rows = self.rows(query)
        return rows[0] if rows else None

    def stage(self, name: str, blocks: Iterable[Mapping[str, np.ndarray]]) -> int:
        """Streams ``blocks`` into a Parquet file in the temp folder (on the driver) and makes it the view
        ``name``, with a column :data:`SEQ` numbering the rows in order; returns the number of rows."""
        path = self.folder / f"{name}.parquet"
        rows = write_staged(path, blocks)
        if rows:
            self._register(name, path)
        return rows

    def create(self, name: str, query: str) -> None:
        """Writes the result of ``query`` as Parquet and makes it the view ``name`` (replacing an earlier one)."""
        self._materialize(name, self.spark.sql(query))

    def append(self, name: str, query: str) -> None:
        """Adds the result of ``query`` to the table ``name``."""
        path = self._views[name]
        self._run(lambda: self.spark.sql(query).write.mode("append").parquet(str(path)))
        self._register(name, path)

    def drop(self, name: str) -> None:
        """Removes the table ``name``."""
        self.spark.catalog.dropTempView(name)
        shutil.rmtree(self._views.pop(name), ignore_errors=True)

    def _materialize(self, name: str, frame: DataFrame) -> None:
        self._count += 1
        path = self.folder / "tables" / f"{name}.{self._count}"
        self._run(lambda: frame.write.parquet(str(path)))
        old = self._views.get(name)
        self._register(name, path)
        if old is not None and old.parent == path.parent:
            shutil.rmtree(old, ignore_errors=True)

    def _register(self, name: str, path: Path) -> None:
        self.spark.read.parquet(str(path)).createOrReplaceTempView(name)
        self._views[name] = path

    def _run(self, action: Any) -> Any:
        """Runs ``action()``; Spark running out of memory or of temp-folder disk is a one-line error."""
        try:
            return action()
        except Exception as e:
            text = str(e)
            if not any(marker in text for marker in _RESOURCE_ERRORS):
                raise
            first = next(line for line in text.splitlines() if any(m in line for m in _RESOURCE_ERRORS))
            raise ConversionError(
                f"Spark: {first.strip()} (driver memory {self.settings['driver_memory']}, executor memory "
                f"{self.settings['executor_memory']}, temp folder {self.folder}: raise --spark-driver-memory / "
                "--spark-executor-memory or --spark-partitions, or free disk space there)"
            ) from None

    # ---------------------------------------------------------------------------------------------
    # Dialect
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def numbers(n: int) -> str:
        """A relation of one BIGINT column ``j``: 0, 1, ..., ``n - 1``."""
        return f"(SELECT id AS j FROM range({n}))"

    @staticmethod
    def uniform(keys: str, total: str) -> str:
        """SQL of a BIGINT in ``[0, total)`` that is a hash of the comma-separated expressions ``keys``
        (``xxhash64``: other numbers than DuckDB's ``hash``)."""
        return f"pmod(xxhash64({keys}), {total})"

    @staticmethod
    def range_join(left: str, right: str) -> str:
        """``left`` (alias ``a``; ``seg``, ``u``) joined with the row ``p`` of ``right`` (``seg``, ``lo``, ``cnt``)
        whose range ``[lo, lo + cnt)`` holds ``a.u``: Spark has no ASOF join (a range condition would compare
        every draw with every entry of its segment), so each entry is exploded into its ``cnt`` positions and
        joined on equality; the exploded relation has one row per click of the segment."""
        return (f"{left} a JOIN (SELECT *, explode(sequence(lo, lo + cnt - 1)) AS _at FROM {right}) p "
                "ON a.seg = p.seg AND a.u = p._at")

    @staticmethod
    def ordered_list(value: str, order: str) -> str:
        """Aggregate SQL: the list of ``value`` ordered by ``order``."""
        return f"transform(array_sort(collect_list(named_struct('o', {order}, 'v', {value}))), x -> x.v)"

    @staticmethod
    def unnest(column: str, value: str, position: str) -> str:
        """SELECT-list SQL: one row per element of the list ``column``, as ``value`` and its ``position``."""
        return f"posexplode({column}) AS ({position}, {value})"

    def empty_list(self) -> str:
        """SQL of an empty list of the list-column type."""
        return f"CAST(array() AS {self.LIST})"

    def add_histories(
        self,
        table: str,
        queries: str,
        groups: Sequence[Tuple[str, Mapping[str, str]]],
        max_len: int,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """:func:`~mdaf_rec.data.converters.engine.add_histories` (same arguments and result) without the
        variable window frames that Spark lacks.

        A query's position in group g is ``_n``, the number of its user's g events strictly before its
        timestamp: a running count over the queries and all groups' events per user ordered by
        (timestamp, queries first). Each group's events become one array per user, sorted by
        (timestamp, :data:`SEQ`); a join on the user and ``slice`` take the ``max_len`` events ending at
        position ``_n`` (only these are copied, so a heavy user's array is never copied per query).
        """
        query = self.spark.sql(f"SELECT * FROM {queries}")
        outputs = [f"`{c}`" for c in query.columns]
        outputs += [f"{expr} AS {name}" for name, expr in (extra or {}).items()]
        if max_len == 0:
            self._materialize(table, query.selectExpr(
                *outputs[:len(query.columns)], *[f"{self.empty_list()} AS {c}" for _, lists in groups for c in lists],
                *outputs[len(query.columns):]))
            return
        union = query.selectExpr("*", "0 AS _kind")
        for g, (events, _) in enumerate(groups):
            union = union.unionByName(self.spark.sql(f"SELECT {USER_ID}, {TIMESTAMP}, {g + 1} AS _kind FROM {events}"),
                                      allowMissingColumns=True)
        order = f"PARTITION BY {USER_ID} ORDER BY {TIMESTAMP}, _kind ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW"
        union.selectExpr("*", *[f"sum(CASE WHEN _kind = {g + 1} THEN 1 ELSE 0 END) OVER ({order}) AS _n{g}"
                                for g in range(len(groups))]).where("_kind = 0").createOrReplaceTempView("_numbered")
        joins, lists = [], []
        for g, (events, columns) in enumerate(groups):
            fields = ", ".join(f"'v{i}', {expr}" for i, expr in enumerate(columns.values()))
            self.spark.sql(
                f"SELECT {USER_ID}, array_sort(collect_list(named_struct('t', {TIMESTAMP}, 's', {SEQ}, {fields}))) AS _e "
                f"FROM {events} GROUP BY {USER_ID}"
            ).createOrReplaceTempView(f"_events{g}")
            joins.append(f"LEFT JOIN _events{g} e{g} ON n.{USER_ID} = e{g}.{USER_ID}")
            window = f"slice(e{g}._e, greatest(n._n{g} - {max_len - 1}, 1), least(n._n{g}, {max_len}))"
            lists += [f"coalesce(transform({window}, x -> x.v{i}), {self.empty_list()}) AS {name}"
                      for i, name in enumerate(columns)]
        outputs = [f"n.{c}" for c in outputs[:len(query.columns)]] + lists + outputs[len(query.columns):]
        self._materialize(table, self.spark.sql(f"SELECT {', '.join(outputs)} FROM _numbered n {' '.join(joins)}"))
        for name in ["_numbered"] + [f"_events{g}" for g in range(len(groups))]:
            self.spark.catalog.dropTempView(name)

    def write_parquet(self, query: str, path: Path, schema: pa.Schema, row_group_size: int) -> None:
        """Writes the rows of ``query`` in order into the Parquet file ``path`` (zstd), in row groups of
        at most ``row_group_size`` rows and bounded bytes (``concat_parquet``), cast to ``schema``: Spark writes the sorted rows as part files (in order,
        by range partitioning) into the temp folder, then the driver streams them, a batch at a time, into
        the one file."""
        parts = self.folder / "parts" / path.stem
        self._run(lambda: self.spark.sql(query).write.mode("overwrite").parquet(str(parts)))
        # part-NNNNN-...-cMMM: the partition number, then the file within the partition
        files = sorted(parts.glob("part-*.parquet"), key=lambda f: (int(f.name.split("-")[1]), f.name))
        concat_parquet(files, path, schema, row_group_size)
        shutil.rmtree(parts, ignore_errors=True)


def concat_parquet(parts: Sequence[Path], path: Path, schema: pa.Schema, row_group_size: int) -> None:
    """Streams the rows of the Parquet files ``parts``, in order, into the file ``path`` (zstd) cast to
    ``schema``, in row groups of at most ``row_group_size`` rows and bounded bytes (``RowGroups``, as the
    DuckDB engine writes them)."""
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        groups = RowGroups(writer, row_group_size)
        for part in parts:
            # pre_buffer=False: pyarrow's default keeps every row group's bytes read until the part ends
            for batch in pq.ParquetFile(part, pre_buffer=False).iter_batches(batch_size=OUT_BATCH_ROWS):
                if batch.num_rows:
                    groups.add(pa.Table.from_batches([batch]).cast(schema))
        groups.flush()
