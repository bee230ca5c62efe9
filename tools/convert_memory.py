"""Where a conversion's memory goes: peak RSS and DuckDB's own accounting per step, sampled while it runs.

Runs ``mdaf-rec data FORMAT ...`` in this process and samples, every ``--interval`` seconds, the process's
resident memory (``/proc/self/status`` VmRSS) and what DuckDB says it holds (``duckdb_memory()``: its
buffer-managed memory, which ``--memory-limit`` caps, and its spilled bytes), read on a second connection to
the converter's database. Each sample is charged to the step running at that moment: the SQL statement the
engine executes, the Arrow stream it writes from, or the CSV it stages. Prints one line per step with its
peak RSS and DuckDB's peak memory and spill; RSS minus DuckDB's memory is what Python (pyarrow, numpy, the
interpreter) and allocations outside DuckDB's buffer manager hold. ``--groups`` also prints a line per
Parquet row group the split writer writes (its rows and Arrow bytes, and at that moment RSS, what pyarrow's
memory pool holds, glibc's heap in use and free (``mallinfo2``: numpy's arrays live there) and DuckDB's
memory). A diagnosis tool (used for docs/benchmarks.md "Converters out of core"); ``tools/bench_convert.py``
measures the peaks to report.

Usage::

    python tools/convert_memory.py [--interval SECONDS] [--groups] taobao-ad --raw DIR --behavior-log DIR/behavior_log.csv --out OUT \\
        --memory-limit 1GB --threads 2
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Tuple

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mdaf_rec.cli import data as data_cli  # noqa: E402
from mdaf_rec.data.converters import engine as engine_module  # noqa: E402

GB = 1e9


def rss_gb() -> float:
    """This process's resident memory (GB)."""
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1e3 / GB


class Sampler:
    """Samples RSS and DuckDB's memory every ``interval`` seconds on a thread, charging them to :attr:`step`."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.step = "start"
        self.con: Any = None  # the converter's DuckDB connection, once open
        self.peaks: Dict[str, List[float]] = {}  # step -> [peak RSS, peak DuckDB memory, peak spill] (GB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        cursor = None
        while not self._stop.is_set():
            step, rss = self.step, rss_gb()
            memory = spill = 0.0
            if self.con is not None:
                try:
                    cursor = cursor or self.con.cursor()
                    memory, spill = (v / GB for v in cursor.execute(
                        "SELECT sum(memory_usage_bytes), sum(temporary_storage_bytes) FROM duckdb_memory()"
                    ).fetchone())
                except Exception:  # the database is closing or closed
                    cursor = None
            peak = self.peaks.setdefault(step, [0.0, 0.0, 0.0])
            for i, value in enumerate((rss, memory, spill)):
                peak[i] = max(peak[i], value)
            self._stop.wait(self.interval)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def trace_groups(sampler: Sampler) -> None:
    """Prints a line per row group written (:class:`engine_module.RowGroups`): its rows and Arrow bytes, RSS,
    pyarrow's pool, glibc's heap (in use, free) and DuckDB's memory, in GB, before the group is encoded."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    flush = engine_module.RowGroups.flush
    print(f"{'rows':>7} {'MB':>6} {'RSS':>5} {'Arrow':>5} {'heap':>5} {'free':>5} {'DuckDB':>6}  (GB)")

    def traced_flush(self: engine_module.RowGroups) -> None:
        if self._rows:
            heap = libc.mallinfo2()
            duck = sampler.con.cursor().execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0]
            print(f"{self._rows:7d} {self._bytes / 1e6:6.1f} {rss_gb():5.2f} {pa.total_allocated_bytes() / GB:5.2f} "
                  f"{heap.uordblks / GB:5.2f} {heap.fordblks / GB:5.2f} {duck / GB:6.2f}", flush=True)
        flush(self)

    engine_module.RowGroups.flush = traced_flush


def instrument(sampler: Sampler) -> None:
    """Makes the engine name its current step to ``sampler`` (wraps the Engine methods that do the work)."""
    execute, batches, write_staged = (engine_module.Engine._execute, engine_module.Engine.batches,
                                      engine_module.write_staged)

    def short(query: str) -> str:
        return re.sub(r"\s+", " ", query)[:100]

    def traced_execute(self: engine_module.Engine, query: str) -> Any:
        sampler.con = self.con
        sampler.step = short(query)
        return execute(self, query)

    def traced_batches(self: engine_module.Engine, query: str, rows_per_batch: int) -> Iterator[pa.RecordBatch]:
        sampler.step = "stream out: " + short(query)
        yield from batches(self, query, rows_per_batch)

    def traced_write_staged(path: Path, blocks: Iterable[Mapping[str, Any]]) -> int:
        sampler.step = f"parse and stage: {Path(path).name}"
        return write_staged(path, blocks)

    engine_module.Engine._execute = traced_execute
    engine_module.Engine.batches = traced_batches
    engine_module.write_staged = traced_write_staged


def main(argv: List[str]) -> int:
    interval = 0.1
    if argv[:1] == ["--interval"]:
        interval, argv = float(argv[1]), argv[2:]
    sampler = Sampler(interval)
    instrument(sampler)
    if argv[:1] == ["--groups"]:
        trace_groups(sampler)
        argv = argv[1:]
    start = time.perf_counter()
    with sampler:
        data_cli.main(argv)
    rows: List[Tuple[str, List[float]]] = list(sampler.peaks.items())
    print(f"{time.perf_counter() - start:.0f} s; peak RSS {max(p[0] for _, p in rows):.2f} GB")
    print(f"{'RSS GB':>7} {'DuckDB GB':>9} {'spill GB':>8}  step")
    for step, (rss, memory, spill) in rows:
        print(f"{rss:7.2f} {memory:9.2f} {spill:8.2f}  {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
