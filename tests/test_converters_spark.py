"""``--engine spark``: the converters on Spark (local mode) write what they write on DuckDB, row by row
(negatives of taobao-behavior, drawn with another hash, by their statistics), and a missing Java / pyspark /
master is a one-line error. One SparkSession (local[2], 2 shuffle partitions, no UI) serves the module."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from mdaf_rec.cli import main as cli_main
from mdaf_rec.cli.data import build_parser
from mdaf_rec.data.converters import CONVERTERS
from mdaf_rec.data.converters.common import local_days
from mdaf_rec.data.converters import engine as engine_module
from mdaf_rec.data.converters.engine import add_histories, rows_per_group
from mdaf_rec.data.converters.spark_engine import SparkEngine
from converter_digests import raw_path
from mdaf_rec.data.schema import CATEGORY_ID, ITEM_HISTORY, ITEM_ID, LABEL, SPLITS, TIMESTAMP, USER_ID
from test_converters import behavior_events, shared_data

SPARK = ["--engine", "spark", "--spark-master", "local[2]", "--spark-partitions", "2"]


@pytest.fixture(scope="module")
def spark():
    """The module's session, set for small data: 2 cores, 2 partitions, no UI, no adaptive re-planning, no
    whole-stage code generation, and a JVM that compiles with C1 only (short runs on small data spend most of
    their CPU compiling otherwise)."""
    session = (SparkSession.builder.master("local[2]").appName("mdaf-rec tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "2").config("spark.default.parallelism", "2")
               .config("spark.sql.adaptive.enabled", "false").config("spark.sql.codegen.wholeStage", "false")
               .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def convert_both(fmt: str, raw: Path, work: Path, *extra: str) -> Tuple[Dict, Dict, pa.Table, pa.Table]:
    """Converts ``raw`` with DuckDB and with Spark; returns both metas and both datasets (splits in order,
    with a ``split`` column)."""
    metas, tables = [], []
    for engine, options in (("duckdb", []), ("spark", SPARK)):
        out = work / engine
        args = build_parser().parse_args([fmt, "--raw", str(raw), "--out", str(out), *extra, *options])
        metas.append(CONVERTERS[fmt].run(args))
        splits = []
        for code, split in enumerate(SPLITS):
            t = pq.read_table(out / f"{split}.parquet")
            splits.append(t.append_column("split", pa.array(np.full(t.num_rows, code, np.int8))))
        tables.append(pa.concat_tables(splits))
    return metas[0], metas[1], tables[0], tables[1]


def assert_same_meta(duck: Dict, spark: Dict) -> None:
    """Everything but the engine (and the options naming it) is the same, row-group layout included."""
    assert spark["engine"]["engine"] == "spark" and spark["engine"]["master"] == "local[2]"
    for key in set(duck) | set(spark):
        if key not in ("engine", "options"):
            assert duck[key] == spark[key], key


def test_history_ties_order_and_cap(spark, tmp_path):
    """The Spark history algorithm on the hand-written case of test_history_join_ties_order_and_cap: events
    at the query's second excluded, ties in file (seq) order, the cap keeps the most recent; two groups."""
    args = argparse.Namespace(out=tmp_path, temp_dir=None, spark_partitions=2)
    with SparkEngine(args) as engine:
        engine.stage("ev", [{USER_ID: np.array([7, 7, 7, 7, 8, 7]), TIMESTAMP: np.array([30, 10, 20, 20, 5, 40]),
                             ITEM_ID: np.array([3, 1, 2, 22, 99, 4])}])
        engine.stage("q", [{USER_ID: np.array([7, 7, 8, 9, 7]), TIMESTAMP: np.array([20, 41, 5, 100, 10])}])
        add_histories(engine, "h3", "q", [("ev", {ITEM_HISTORY: ITEM_ID}),
                                          ("(SELECT * FROM ev WHERE item_id < 10)", {"small": "item_id + 100"})],
                      3, extra={"twice": "2 * seq"})
        assert engine.rows(f"SELECT {ITEM_HISTORY}, small, twice FROM h3 ORDER BY seq") == [
            ([1], [101], 0), ([22, 3, 4], [102, 103, 104], 2), ([], [], 4), ([], [], 6), ([], [], 8)]
        add_histories(engine, "self", "ev", [("ev", {ITEM_HISTORY: ITEM_ID})], 2)
        assert [r[0] for r in engine.rows(f"SELECT {ITEM_HISTORY} FROM self ORDER BY seq")] == \
            [[2, 22], [], [1], [1], [], [22, 3]]
        add_histories(engine, "h0", "q", [("ev", {ITEM_HISTORY: ITEM_ID})], 0)
        assert [r[0] for r in engine.rows(f"SELECT {ITEM_HISTORY} FROM h0")] == [[]] * 5
    assert not any(tmp_path.glob(".convert-*")), "the engine's temp folder is removed"
    assert spark.sparkContext._jsc is not None, "a session the engine did not start is left running"


@pytest.mark.parametrize("name,extra", [
    ("ml-latest-small", ["--max-history", "5"]),
    ("taobaoad_tiny", []),
])
def test_same_rows_as_duckdb(spark, tmp_path, name, extra):
    """MovieLens (time-quantile split) and FuxiCTR TaobaoAd (given splits, history categories by a list
    aggregate): every column of every row identical, and the same row-group layout."""
    fmt = "movielens" if name.startswith("ml") else "taobao-ad"
    duck, sp, a, b = convert_both(fmt, shared_data() / name, tmp_path, *extra)
    assert_same_meta(duck, sp)
    assert a.num_rows == duck["rows"] > 0 and b.equals(a)
    for split in SPLITS:
        files = [pq.ParquetFile(tmp_path / engine / f"{split}.parquet") for engine in ("duckdb", "spark")]
        groups = [[f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] for f in files]
        assert groups[1] == groups[0] and files[1].schema_arrow == files[0].schema_arrow


def test_taobao_ad_raw_with_behavior_log(spark, tmp_path, monkeypatch):
    """Raw Alimama files (generated: joins with the ad and profile tables, click histories) and
    behavior_log.csv (four more history groups): identical row by row, and the same row groups when their
    bytes bound them (engine.ROW_GROUP_BYTES lowered so that it binds)."""
    monkeypatch.setattr(engine_module, "ROW_GROUP_BYTES", 100_000)
    raw = raw_path("gen:ad --rows 4000 --behavior-rows 12000 --users 200 --seed 3", Path("/nonexistent"), tmp_path)
    duck, sp, a, b = convert_both("taobao-ad", raw, tmp_path, "--behavior-log", str(raw / "behavior_log.csv"),
                                  "--max-history", "4")
    assert_same_meta(duck, sp)
    lengths = [pc.list_value_length(a[name]).to_numpy() for name in (ITEM_HISTORY, "pv_cate_history")]
    assert a.num_rows == 4000 and [(n.min(), n.max()) for n in lengths] == [(0, 4), (4, 4)]
    assert b.equals(a)
    files = [pq.ParquetFile(tmp_path / engine / "train.parquet").metadata for engine in ("duckdb", "spark")]
    groups = [[f.row_group(i).num_rows for i in range(f.num_row_groups)] for f in files]
    assert groups[1] == groups[0] and len(groups[0]) >= 8 and max(groups[0]) < rows_per_group(0)


def test_behavior_sample(spark, tmp_path):
    """UserBehavior: positives, splits, timestamps, labels and every history identical row by row; the
    negatives (Spark's xxhash64 draws, not DuckDB's hash) by their statistics: one per click, never an item the
    user touched, the category of the item's first click that day, and per (day, item) as many as its clicks
    that day, about as closely as DuckDB's draws."""
    raw = shared_data() / "taobao_userbehavior_sample" / "UserBehavior_sample.csv"
    duck, sp, a, b = convert_both("taobao-behavior", raw, tmp_path, "--max-history", "10")
    assert_same_meta(duck, sp)
    drawn = [ITEM_ID, CATEGORY_ID]
    assert b.drop_columns(drawn).equals(a.drop_columns(drawn))
    positive = pc.equal(a[LABEL], 1)
    assert b.filter(positive).equals(a.filter(positive))
    user, item, ts, pv = behavior_events(raw)
    touched = np.unique(user * (1 << 32) + item)
    click_day = local_days(ts[pv], "Asia/Shanghai")
    click_keys, first, click_counts = np.unique(click_day * (1 << 40) + item[pv], return_index=True, return_counts=True)
    category = np.genfromtxt(raw, delimiter=",", usecols=2, dtype=np.int64)[pv][first]
    correlation = []
    for t in (a, b):
        neg = t.filter(pc.equal(t[LABEL], 0))
        assert neg.num_rows == pv.sum()
        neg_user, neg_item = neg[USER_ID].to_numpy(), neg[ITEM_ID].to_numpy()
        assert not np.isin(neg_user * (1 << 32) + neg_item, touched).any()
        keys = local_days(neg[TIMESTAMP].to_numpy(), "Asia/Shanghai") * (1 << 40) + neg_item
        at = np.minimum(np.searchsorted(click_keys, keys), len(click_keys) - 1)
        same_day = click_keys[at] == keys
        assert same_day.mean() > 0.999
        assert np.array_equal(category[at[same_day]], neg[CATEGORY_ID].to_numpy()[same_day])
        per_pair = np.bincount(at[same_day], minlength=len(click_keys))
        correlation.append(np.corrcoef(per_pair, click_counts)[0, 1])
    assert correlation[0] > 0.5 and correlation[1] == pytest.approx(correlation[0], abs=0.03), correlation
    assert not b.filter(pc.equal(b[LABEL], 0))[ITEM_ID].equals(a.filter(pc.equal(a[LABEL], 0))[ITEM_ID])


def test_one_line_errors(tmp_path, monkeypatch, capsys):
    """No Java, no pyspark, an unreachable master: exit 2 with one line, before any JVM starts."""
    monkeypatch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: None))
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.0,100\n")
    (raw / "movies.csv").write_text("movieId,title,genres\n2,x,Drama\n")
    command = ["data", "movielens", "--raw", str(raw), "--out", str(tmp_path / "out"), "--engine", "spark"]

    def error(*extra: str) -> str:
        assert cli_main([*command, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert "--spark-master spark://127.0.0.1:9: unreachable (127.0.0.1:9: Connection refused)" in \
        error("--spark-master", "spark://127.0.0.1:9")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    assert f"JAVA_HOME={tmp_path} has no bin/java" in error()
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "no java on PATH and JAVA_HOME unset" in error()
    monkeypatch.delitem(sys.modules, "mdaf_rec.data.converters.spark_engine")
    for name in [m for m in sys.modules if m.split(".")[0] == "pyspark"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert "--engine spark: pyspark is not installed" in error()
    assert cli_main([*command[:-2], "--spark-partitions", "4"]) == 2
    assert capsys.readouterr().err.strip().endswith("--spark-partitions: only with --engine spark")
    for option, value in (("--spark-master", "spark://nohost"), ("--spark-driver-memory", "lots")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(command[1:] + [option, value])


def test_pyspark_imported_only_for_spark():
    """The DuckDB path (and building every converter's parser) never imports pyspark."""
    code = ("import sys; from mdaf_rec.cli.data import build_parser; from mdaf_rec.data.converters import CONVERTERS; "
            "build_parser(); print('pyspark' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
