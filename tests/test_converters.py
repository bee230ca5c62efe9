"""Raw-data converters: exact histories on hand-written files, invariants on the shared samples,
and the bad-row policy."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from mdaf_rec.cli import main as cli_main
from mdaf_rec.cli.data import build_parser
from mdaf_rec.data.converters import CONVERTERS
from mdaf_rec.data.converters.common import ConversionError, local_days, stable_hash64
from mdaf_rec.data.converters import engine as engine_module
from mdaf_rec.data.converters.engine import Engine, add_histories, rows_per_group
from mdaf_rec.data.converters.movielens import GENRE_IDS
from converter_digests import CASES, DIGESTS, raw_path, run_case
from mdaf_rec.data.schema import (
    CATEGORY_HISTORY,
    CATEGORY_ID,
    ITEM_HISTORY,
    ITEM_ID,
    LABEL,
    REQUIRED_COLUMNS,
    SPLITS,
    TIMESTAMP,
    USER_ID,
)

SHANGHAI_DAY0 = 1511539200  # 2017-11-25 00:00 Asia/Shanghai
DAY = 86_400


def shared_data() -> Path:
    env = os.environ.get("MDAF_SHARED_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


def convert(fmt: str, raw: Path, out: Path, *extra: str) -> Dict:
    args = build_parser().parse_args([fmt, "--raw", str(raw), "--out", str(out), *extra])
    return CONVERTERS[fmt].run(args)


def load(out: Path) -> pa.Table:
    """All splits, in split order, with a ``split`` column."""
    tables = []
    for code, split in enumerate(SPLITS):
        t = pq.read_table(out / f"{split}.parquet")
        tables.append(t.append_column("split", pa.array(np.full(t.num_rows, code, np.int8))))
    return pa.concat_tables(tables)


def write(path: Path, lines: Sequence[str], encoding: str = "utf8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def rows_of(table: pa.Table) -> List[Dict]:
    return table.to_pylist()


def assert_canonical(out: Path) -> Dict:
    """Schema starts with the canonical columns, histories have equal lengths, meta is consistent."""
    meta = json.loads((out / "meta.json").read_text())
    total = 0
    for split in SPLITS:
        schema = pq.read_schema(out / f"{split}.parquet")
        names = list(REQUIRED_COLUMNS)
        assert schema.names[: len(names)] == names
        for name, type_ in REQUIRED_COLUMNS.items():
            assert schema.field(name).type == type_, name
        assert schema.names[len(names):] == meta["extra_sparse"] + meta["dense"] + list(meta.get("extra_histories", {}))
        t = pq.read_table(out / f"{split}.parquet")
        assert t.num_rows == meta["splits"][split]["rows"]
        total += t.num_rows
        lengths = t[ITEM_HISTORY].combine_chunks().value_lengths().to_numpy()
        assert np.array_equal(lengths, t[CATEGORY_HISTORY].combine_chunks().value_lengths().to_numpy())
        for name in (USER_ID, ITEM_ID, CATEGORY_ID, *meta["extra_sparse"]):
            assert t[name].null_count == 0 and (t[name].to_numpy() >= 0).all(), name
    assert total == meta["rows"]
    return meta


def assert_leak_free(table: pa.Table, ev_user, ev_item, ev_time, max_len: int = 50) -> None:
    """Vectorised: every history entry is an event of the row's user strictly before the row's
    timestamp, and each history holds exactly min(max_len, #such events) entries."""
    user = table[USER_ID].to_numpy()
    ts = table[TIMESTAMP].to_numpy()
    hist = table[ITEM_HISTORY].combine_chunks()
    lengths = hist.value_lengths().to_numpy()
    entries = hist.flatten().to_numpy()
    row = np.repeat(np.arange(len(user)), lengths)
    # earliest event time per (user, item)
    key = ev_user.astype(np.int64) * (1 << 32) + ev_item
    order = np.lexsort((ev_time, key))
    keys, first = np.unique(key[order], return_index=True)
    earliest = ev_time[order][first]
    query = user[row] * (1 << 32) + entries
    pos = np.searchsorted(keys, query)
    assert (keys[np.minimum(pos, len(keys) - 1)] == query).all(), "history entry is not an event of the user"
    assert (earliest[pos] < ts[row]).all(), "history entry at or after the impression time"
    # count of the user's events strictly before ts
    ev_order = np.lexsort((ev_time, ev_user))
    u_sorted, t_sorted = ev_user[ev_order], ev_time[ev_order]
    composite = u_sorted * (1 << 33) + t_sorted
    before = np.searchsorted(composite, user * (1 << 33) + ts, side="left") - np.searchsorted(u_sorted, user)
    assert np.array_equal(lengths, np.minimum(before, max_len))


# --------------------------------------------------------------------------------------------------
# History building
# --------------------------------------------------------------------------------------------------


def engine_args(tmp_path: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(out=tmp_path, temp_dir=None, memory_limit="256MB", threads=1, **kw)


def test_history_join_ties_order_and_cap(tmp_path):
    """Events at the query's second are excluded, ties keep file (seq) order, the cap keeps the most recent."""
    ev_user = np.array([7, 7, 7, 7, 8, 7])
    ev_time = np.array([30, 10, 20, 20, 5, 40])
    ev_item = np.array([3, 1, 2, 22, 99, 4])
    q_user = np.array([7, 7, 8, 9, 7])
    q_time = np.array([20, 41, 5, 100, 10])
    with Engine(engine_args(tmp_path)) as engine:
        engine.stage("ev", [{USER_ID: ev_user, TIMESTAMP: ev_time, ITEM_ID: ev_item}])
        engine.stage("q", [{USER_ID: q_user, TIMESTAMP: q_time}])
        add_histories(engine, "h3", "q", [("ev", {ITEM_HISTORY: ITEM_ID})], 3, extra={"twice": "2 * seq"})
        got = engine.rows(f"SELECT {ITEM_HISTORY}, twice FROM h3 ORDER BY seq")
        assert got == [([1], 0), ([22, 3, 4], 2), ([], 4), ([], 6), ([], 8)]
        # the events as their own queries: the history of each event
        add_histories(engine, "self", "ev", [("ev", {ITEM_HISTORY: ITEM_ID})], 2)
        got = engine.rows(f"SELECT {ITEM_HISTORY} FROM self ORDER BY seq")
        assert [r[0] for r in got] == [[2, 22], [], [1], [1], [], [22, 3]]
        add_histories(engine, "h0", "q", [("ev", {ITEM_HISTORY: ITEM_ID})], 0)
        assert [r[0] for r in engine.rows(f"SELECT {ITEM_HISTORY} FROM h0")] == [[]] * 5
    assert not any(tmp_path.glob(".convert-*")), "the engine's temp folder is removed"


def test_engine_options_row_groups_and_temp_folder(tmp_path):
    """--memory-limit / --threads reach DuckDB (recorded in meta.json), the temp folder is removed, and a split
    is written in row groups of rows_per_group rows (several per split, for per-rank reading)."""
    assert (rows_per_group(0), rows_per_group(10**6), rows_per_group(10**8)) == (4096, 15625, 131072)
    raw = shared_data() / "ml-latest-small"
    meta = convert("movielens", raw, tmp_path / "out", "--memory-limit", "300MB", "--threads", "1",
                   "--temp-dir", str(tmp_path / "tmp"))
    assert meta["engine"] == {"engine": "duckdb", "version": duckdb.__version__, "memory_limit": "300MB", "threads": 1}
    assert list((tmp_path / "tmp").iterdir()) == [] and not list((tmp_path / "out").glob(".convert-*"))
    f = pq.ParquetFile(tmp_path / "out" / "train.parquet").metadata
    assert meta["row_groups"]["train"] == f.num_row_groups == 20  # 80,669 rows
    assert all(f.row_group(i).num_rows == 4096 for i in range(19))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["movielens", "--raw", str(raw), "--out", str(tmp_path), "--memory-limit", "lots"])


# --------------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------------


def movielens_latest(root: Path) -> Path:
    write(root / "ratings.csv", [
        "userId,movieId,rating,timestamp",
        "1,10,4.0,100", "1,20,3.5,200", "1,30,5.0,200", "1,40,1.0,300",
        "2,20,4.5,150", "2,50,2.0,150", "2,10,4.0,400",
    ])
    write(root / "movies.csv", [
        "movieId,title,genres",
        '10,"Movie, The (1999)",Comedy|Drama', "20,B (2000),Sci-Fi", "30,C,(no genres listed)",
        "40,D,IMAX|Action", "50,E,Film-Noir",
    ])
    return root


def test_movielens_latest_exact(tmp_path):
    meta = convert("movielens", movielens_latest(tmp_path / "raw"), tmp_path / "out")
    assert_canonical(tmp_path / "out")
    assert meta["rows"] == 7 and meta["timezone"] == "UTC"
    rows = {(r[USER_ID], r[ITEM_ID]): r for r in rows_of(load(tmp_path / "out"))}
    assert rows[(1, 40)][ITEM_HISTORY] == [10, 20, 30]
    expected = [GENRE_IDS["Comedy"], GENRE_IDS["Sci-Fi"], GENRE_IDS["(no genres listed)"]]
    assert rows[(1, 40)][CATEGORY_HISTORY] == expected
    assert rows[(1, 20)][ITEM_HISTORY] == [10] and rows[(1, 30)][ITEM_HISTORY] == [10]  # same second excluded
    assert rows[(1, 10)][ITEM_HISTORY] == []
    assert rows[(2, 50)][ITEM_HISTORY] == [] and rows[(2, 10)][ITEM_HISTORY] == [20, 50]
    assert rows[(1, 40)][CATEGORY_ID] == GENRE_IDS["IMAX"]
    assert [rows[k][LABEL] for k in [(1, 10), (1, 20), (1, 30), (1, 40)]] == [1, 0, 1, 0]


def test_movielens_100k_exact(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "u.data", ["1\t5\t4\t881250949", "1\t6\t3\t881250950", "2\t5\t5\t881250949"])
    flags_action = "|".join(["0", "1"] + ["0"] * 17)
    flags_none = "|".join(["0"] * 19)
    write(raw / "u.item", [
        f"5|Café (1995)|01-Jan-1995||http://x|{flags_action}",
        f"6|Other (1996)|01-Jan-1996||http://y|{flags_none}",
    ], encoding="latin-1")
    meta = convert("movielens", raw, tmp_path / "out", "--split", "0.34,0.33,0.33")
    assert meta["rows"] == 3
    rows = {(r[USER_ID], r[ITEM_ID]): r for r in rows_of(load(tmp_path / "out"))}
    assert rows[(1, 5)][CATEGORY_ID] == GENRE_IDS["Action"]
    assert rows[(1, 6)][CATEGORY_ID] == GENRE_IDS["(no genres listed)"]
    assert rows[(1, 6)][ITEM_HISTORY] == [5] and rows[(2, 5)][ITEM_HISTORY] == []


def test_history_cap_keeps_most_recent(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "ratings.csv", ["userId,movieId,rating,timestamp"] + [f"1,{m},4.0,{1000 + m}" for m in range(60)])
    write(raw / "movies.csv", ["movieId,title,genres"] + [f"{m},T,Drama" for m in range(60)])
    convert("movielens", raw, tmp_path / "out")
    rows = {r[ITEM_ID]: r for r in rows_of(load(tmp_path / "out"))}
    assert rows[59][ITEM_HISTORY] == list(range(9, 59))
    assert rows[50][ITEM_HISTORY] == list(range(0, 50))
    assert rows[51][ITEM_HISTORY] == list(range(1, 51))


# --------------------------------------------------------------------------------------------------
# Taobao UserBehavior
# --------------------------------------------------------------------------------------------------


def behavior_file(path: Path) -> Path:
    """4 users over 4 local days; user 1 has a same-second tie and a cart event."""
    lines = [
        f"1,100,10,pv,{SHANGHAI_DAY0 + 10}", f"1,101,10,pv,{SHANGHAI_DAY0 + 20}",
        f"1,102,11,pv,{SHANGHAI_DAY0 + 20}", f"1,103,11,cart,{SHANGHAI_DAY0 + 25}",
        f"1,104,12,pv,{SHANGHAI_DAY0 + DAY * 3 + 5}",
    ]
    rng = np.random.default_rng(0)
    for user in (2, 3, 4):
        for k in range(30):
            item = int(rng.integers(200, 260))
            lines.append(f"{user},{item},{item // 10},pv,{SHANGHAI_DAY0 + int(rng.integers(0, 4 * DAY))}")
    return write(path, lines)


def behavior_events(path: Path):
    data = np.genfromtxt(path, delimiter=",", dtype=None, encoding="utf8")
    user = np.array([r[0] for r in data], np.int64)
    item = np.array([r[1] for r in data], np.int64)
    ts = np.array([r[4] for r in data], np.int64)
    pv = np.array([r[3] == "pv" for r in data])
    return user, item, ts, pv


@pytest.mark.parametrize("negatives", [0, 1, 2])
def test_behavior_protocol(tmp_path, negatives):
    raw = behavior_file(tmp_path / "UserBehavior.csv")
    meta = convert("taobao-behavior", raw, tmp_path / "out", "--negatives", str(negatives))
    assert_canonical(tmp_path / "out")
    user, item, ts, pv = behavior_events(raw)
    assert meta["rows"] == pv.sum() * (1 + negatives)
    t = load(tmp_path / "out")
    rows = rows_of(t)
    label = t[LABEL].to_numpy()
    assert label.sum() == pv.sum()
    # negatives never touched by their user (any behavior)
    touched = set(zip(user.tolist(), item.tolist()))
    negs = [(r[USER_ID], r[ITEM_ID]) for r in rows if r[LABEL] == 0]
    assert len(negs) == pv.sum() * negatives and not touched.intersection(negs)
    # negatives share the timestamp and history of their positive
    pos = {(r[USER_ID], r[ITEM_ID], r[TIMESTAMP]): r for r in rows if r[LABEL] == 1}
    r101 = pos[(1, 101, SHANGHAI_DAY0 + 20)]
    assert r101[ITEM_HISTORY] == [100] and r101[CATEGORY_HISTORY] == [10]
    assert pos[(1, 102, SHANGHAI_DAY0 + 20)][ITEM_HISTORY] == [100]
    assert pos[(1, 104, SHANGHAI_DAY0 + 3 * DAY + 5)][ITEM_HISTORY] == [100, 101, 102]  # cart is not a click
    for r in rows:
        if r[LABEL] == 0:
            same = [p[ITEM_HISTORY] for k, p in pos.items() if k[0] == r[USER_ID] and k[2] == r[TIMESTAMP]]
            assert r[ITEM_HISTORY] in same
    assert_leak_free(t, user[pv], item[pv], ts[pv])
    assert meta["split"]["test"] == "2017-11-28..2017-11-28" and meta["splits"]["val"]["rows"] > 0


def test_behavior_seed(tmp_path):
    raw = behavior_file(tmp_path / "UserBehavior.csv")
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        convert("taobao-behavior", raw, tmp_path / name, "--seed", seed)
    for split in SPLITS:
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()
    a, c = load(tmp_path / "a"), load(tmp_path / "c")
    assert not np.array_equal(a[ITEM_ID].to_numpy(), c[ITEM_ID].to_numpy())
    assert np.array_equal(a[LABEL].to_numpy(), c[LABEL].to_numpy())


def negatives_by(table: pa.Table) -> Dict:
    """(user, local day index from SHANGHAI_DAY0) -> [(item, category)] of the negatives."""
    out: Dict = {}
    for r in rows_of(table):
        if r[LABEL] == 0:
            out.setdefault((r[USER_ID], (r[TIMESTAMP] - SHANGHAI_DAY0) // DAY), []).append((r[ITEM_ID], r[CATEGORY_ID]))
    return out


def test_behavior_negatives_from_same_day(tmp_path):
    """Negatives are drawn with the click counts of their click's local day only: item 9, clicked
    20 times on the test day alone, is never a negative before it (whole-file counts made it most
    of the train negatives); a negative's category is the item's category that day."""
    at = lambda day, s: SHANGHAI_DAY0 + day * DAY + s  # noqa: E731
    lines = [f"8,3,31,pv,{at(2, 100)}"]  # item 3 re-categorised on day 2, first in the file
    lines += [f"1,1,10,pv,{at(0, 1)}", f"2,2,20,pv,{at(0, 2)}"]
    lines += [f"3,3,30,pv,{at(0, 3 + k)}" for k in range(3)]
    lines += [f"4,4,40,pv,{at(1, 1)}", f"5,5,50,pv,{at(1, 2)}"]
    lines += [f"6,9,90,pv,{at(2, k)}" for k in range(20)] + [f"7,8,80,pv,{at(2, 50)}"]
    raw = write(tmp_path / "UserBehavior.csv", lines)
    n = 2000
    meta = convert("taobao-behavior", raw, tmp_path / "out", "--negatives", str(n))
    assert meta["rows"] == 29 * (1 + n)
    assert meta["split"]["train"] == "..2017-11-25" and meta["split"]["test"] == "2017-11-27..2017-11-27"
    neg = negatives_by(load(tmp_path / "out"))
    assert sorted(neg) == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2)]
    assert not any(item == 9 for key, pairs in neg.items() if key[1] < 2 for item, _ in pairs)
    # day 0 weights: item 1 x1, item 2 x1, item 3 x3 (its day-2 click does not count), category 30
    for user, other in ((1, 2), (2, 1)):
        items = np.array([i for i, _ in neg[(user, 0)]])
        assert set(items) == {other, 3} and abs((items == 3).mean() - 0.75) < 0.04
        assert {c for i, c in neg[(user, 0)] if i == 3} == {30}
    items = np.array([i for i, _ in neg[(3, 0)]])
    assert len(items) == 3 * n and set(items) == {1, 2} and abs((items == 1).mean() - 0.5) < 0.03
    assert neg[(4, 1)] == [(5, 50)] * n and neg[(5, 1)] == [(4, 40)] * n
    # day 2 weights: item 9 x20, item 3 x1 (category 31 that day), item 8 x1
    items = np.array([i for i, _ in neg[(7, 2)]])
    assert set(neg[(7, 2)]) == {(9, 90), (3, 31)} and abs((items == 9).mean() - 20 / 21) < 0.02
    assert set(neg[(6, 2)]) == {(3, 31), (8, 80)} and set(neg[(8, 2)]) == {(9, 90), (8, 80)}
    assert "same local day" in meta["protocol"]


def test_behavior_negatives_fallback_pools(tmp_path):
    """A user who touched every item clicked on their day (a near-empty day) draws from the clicks
    of all days up to it, then from the whole file; a user who touched every clicked item is an
    error."""
    at = lambda day, s: SHANGHAI_DAY0 + day * DAY + s  # noqa: E731
    lines = [f"1,1,10,pv,{at(0, 1)}", f"2,2,20,pv,{at(1, 1)}"]
    lines += [f"{u},{u},{u}0,pv,{at(day, u)}" for day in (2, 3, 4) for u in (3, 4)]
    raw = write(tmp_path / "UserBehavior.csv", lines)
    convert("taobao-behavior", raw, tmp_path / "out", "--negatives", "50")
    neg = negatives_by(load(tmp_path / "out"))
    assert neg[(2, 1)] == [(1, 10)] * 50  # day 1 is user 2's alone: days 0..1 hold only item 1 untouched
    assert {i for i, _ in neg[(1, 0)]} == {2, 3, 4}  # day 0 is the first day: the whole file
    assert all(neg[(3, d)] == [(4, 40)] * 50 and neg[(4, d)] == [(3, 30)] * 50 for d in (2, 3, 4))
    raw = write(tmp_path / "one.csv", [f"1,{i},1,pv,{at(d, i)}" for d in range(3) for i in (1, 2)])
    with pytest.raises(ConversionError, match="user 1: touched every clicked item"):
        convert("taobao-behavior", raw, tmp_path / "one")


# --------------------------------------------------------------------------------------------------
# Taobao ad (raw Alimama files)
# --------------------------------------------------------------------------------------------------

T0 = 1494000000  # 2017-05-06 00:00 Asia/Shanghai


def taobao_ad_raw(root: Path, impressions: Sequence[str] = ()) -> Path:
    write(root / "raw_sample.csv", ["user,time_stamp,adgroup_id,pid,nonclk,clk", *(impressions or [
        f"1,{T0 + 10},500,430548_1007,0,1", f"1,{T0 + 20},501,430539_1007,0,1",
        f"1,{T0 + 20},502,430548_1007,1,0", f"1,{T0 + DAY},503,430548_1007,1,0",
        f"1,{T0 + 2 * DAY},504,430548_1007,0,1", f"2,{T0 + 2 * DAY},500,430548_1007,1,0",
        f"3,{T0 + 5},509,430548_1007,1,0",
    ])])
    write(root / "ad_feature.csv", [
        "adgroup_id,cate_id,campaign_id,customer,brand,price",
        "500,7,70,700,NULL,9.5", "501,8,80,800,8000,1.0", "502,7,70,700,7000,2.0",
        "503,9,90,900,9000,3.0", "504,9,90,900,,4.0",
    ])
    write(root / "user_profile.csv", [
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
        "new_user_class_level ",
        "1,0,5,2,3,,3,0,", "2,12,3,1,2,1,2,1,4",
    ])
    return root


def test_taobao_ad_raw_exact(tmp_path):
    meta = convert("taobao-ad", taobao_ad_raw(tmp_path / "raw"), tmp_path / "out")
    assert_canonical(tmp_path / "out")
    assert meta["rows"] == 7 and meta["dense"] == ["price"] and "pid" in meta["extra_sparse"]
    assert meta["split"]["test"] == "2017-05-08..2017-05-08"
    assert [meta["splits"][s]["rows"] for s in SPLITS] == [4, 1, 2]
    assert meta["filled"]["impressions whose ad is missing from ad_feature.csv (ad columns 0)"] == 1
    rows = {(r[USER_ID], r[ITEM_ID]): r for r in rows_of(load(tmp_path / "out"))}
    assert rows[(1, 501)][ITEM_HISTORY] == [500] and rows[(1, 502)][ITEM_HISTORY] == [500]  # tie excluded
    assert rows[(1, 503)][ITEM_HISTORY] == [500, 501]  # 502 was not clicked
    assert rows[(1, 504)][ITEM_HISTORY] == [500, 501] and rows[(1, 504)][CATEGORY_HISTORY] == [7, 8]
    assert rows[(2, 500)][ITEM_HISTORY] == []
    r = rows[(1, 500)]
    assert (r["brand"], r["campaign_id"], r["customer"], r[CATEGORY_ID], r["price"]) == (0, 70, 700, 7, 9.5)
    assert (r["cms_segid"], r["cms_group_id"], r["pvalue_level"], r["new_user_class_level"]) == (1, 6, 0, 0)
    assert r["pid"] == int(stable_hash64(pa.array(["430548_1007"]))[0])
    assert rows[(1, 504)]["brand"] == 0 and rows[(2, 500)]["new_user_class_level"] == 5
    missing = rows[(3, 509)]
    assert (missing[CATEGORY_ID], missing["price"], missing["cms_segid"]) == (0, 0.0, 0)


def test_taobao_ad_behavior_log(tmp_path):
    """Per behaviour type, the categories and brands of the user's last N behaviours strictly before the
    impression: same second excluded, ties in file order, most recent last, NULL brand -> 0."""
    raw = taobao_ad_raw(tmp_path / "raw")
    log = write(tmp_path / "behavior_log.csv", [
        "user,time_stamp,btag,cate,brand",
        f"1,{T0 + 15},pv,14,114", f"1,{T0 - 100},pv,11,111", f"1,{T0 + 10},pv,12,112", f"1,{T0 + 10},cart,13,NULL",
        f"1,{T0 + 15},pv,15,115", f"1,{T0 + 3 * DAY},buy,16,116", f"2,{T0 + 1},fav,21,221",
    ])
    meta = convert("taobao-ad", raw, tmp_path / "out", "--behavior-log", str(log), "--max-history", "2")
    assert_canonical(tmp_path / "out")
    assert list(meta["extra_histories"]) == [f"{b}_{c}_history" for b in ("pv", "cart", "fav", "buy")
                                             for c in ("cate", "brand")]
    rows = {(r[USER_ID], r[ITEM_ID]): r for r in rows_of(load(tmp_path / "out"))}

    def histories(key):
        return {name: rows[key][name] for name in meta["extra_histories"] if rows[key][name]}

    assert histories((1, 500)) == {"pv_cate_history": [11], "pv_brand_history": [111]}
    later = {"pv_cate_history": [14, 15], "pv_brand_history": [114, 115],
             "cart_cate_history": [13], "cart_brand_history": [0]}
    assert histories((1, 501)) == later and histories((1, 504)) == later
    assert rows[(1, 504)][ITEM_HISTORY] == [500, 501]  # the click history is unchanged
    assert histories((2, 500)) == {"fav_cate_history": [21], "fav_brand_history": [221]}
    assert histories((3, 509)) == {}
    write(log, ["user,time_stamp,btag,cate,brand", f"1,{T0},pv,1,1", f"1,{T0},click,1,1"])
    with pytest.raises(ConversionError, match=r"behavior_log.csv: line 3: column 'btag': not one of"):
        convert("taobao-ad", raw, tmp_path / "bad", "--behavior-log", str(log))
    with pytest.raises(ConversionError, match="--behavior-log: only with the raw Alimama folder"):
        convert("taobao-ad", tmp_path, tmp_path / "fux", "--behavior-log", str(log))


def test_taobao_ad_behavior_log_parsed_before_the_tables(tmp_path, monkeypatch):
    """Peak memory is not Python's CSV parsing on top of DuckDB's tables: the behaviour log (the largest
    CSV) is parsed while DuckDB holds only the small side tables, before the impressions table is made."""
    held = {}
    stage = Engine.stage

    def recording_stage(self, name, blocks):
        held[name] = sorted(r[0] for r in self.rows("SELECT table_name FROM duckdb_tables()"))
        return stage(self, name, blocks)

    monkeypatch.setattr(Engine, "stage", recording_stage)
    raw = raw_path("gen:ad --rows 2000 --behavior-rows 8000 --users 100 --seed 5", Path("/nonexistent"), tmp_path)
    convert("taobao-ad", raw, tmp_path / "out", "--behavior-log", str(raw / "behavior_log.csv"))
    assert held["behaviors"] == ["ads", "profiles"]


def test_data_command_does_not_import_torch():
    """`mdaf-rec data` builds every converter's parser; none of them may import torch (~190 MB resident in
    every conversion, on top of the engine's memory)."""
    code = "import sys; from mdaf_rec.cli.data import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("fmt,spec", [
    ("taobao-ad", "gen:ad --rows 3000 --behavior-rows 12000 --users 400 --seed 3"),
    ("taobao-behavior", "gen:behavior --rows 6000 --users 60 --seed 4"),
])
def test_histories_streamed_in_small_batches(tmp_path, monkeypatch, fmt, spec):
    """write_dataset builds the history lists while it streams the sorted rows out: with output and event
    batches far smaller than a user's rows and events (ranges across batch edges, event batches skipped whole,
    users without events of a group), every split holds the same rows as with the default batch sizes."""
    raw = raw_path(spec, Path("/nonexistent"), tmp_path)
    extra = ["--max-history", "5"] + (["--behavior-log", str(raw / "behavior_log.csv")] if fmt == "taobao-ad" else [])
    convert(fmt, raw, tmp_path / "default", *extra)
    monkeypatch.setattr(engine_module, "OUT_BATCH_ROWS", 37)
    monkeypatch.setattr(engine_module, "EVENT_BATCH_ROWS", 23)
    meta = convert(fmt, raw, tmp_path / "small", *extra)
    assert meta["splits"]["test"]["rows"] > 100
    for split in SPLITS:
        want, got = (pq.read_table(tmp_path / out / f"{split}.parquet") for out in ("default", "small"))
        assert got.equals(want), split



def arrow_bytes(table: pa.Table) -> int:
    """Bytes of Arrow data of ``table``: fixed-width values, and per list column a 4-byte offset per row plus
    its values (validity bitmaps not counted)."""
    total = 0
    for field, column in zip(table.schema, table.columns):
        if pa.types.is_list(field.type):
            total += 4 * table.num_rows + field.type.value_type.bit_width // 8 * len(column.combine_chunks().flatten())
        else:
            total += field.type.bit_width // 8 * table.num_rows
    return total


def test_row_groups_bounded_by_bytes(tmp_path, monkeypatch):
    """A row group is held whole by the writer before pyarrow encodes it, so its Arrow bytes are bounded
    (engine.ROW_GROUP_BYTES, lowered here so that long behaviour-log histories reach it): every row group
    stays under the cap and is as long as the cap allows (its next row would not fit), and the rows are those
    of the uncapped run, in the same order."""
    raw = raw_path("gen:ad --rows 3000 --behavior-rows 24000 --users 60 --seed 3", Path("/nonexistent"), tmp_path)
    extra = ["--behavior-log", str(raw / "behavior_log.csv"), "--max-history", "30"]
    convert("taobao-ad", raw, tmp_path / "default", *extra)
    cap = 200_000
    monkeypatch.setattr(engine_module, "ROW_GROUP_BYTES", cap, raising=False)
    monkeypatch.setattr(engine_module, "OUT_BATCH_ROWS", 300)  # groups end inside and at the edges of batches
    meta = convert("taobao-ad", raw, tmp_path / "capped", *extra)
    for split in SPLITS:
        want, got = (pq.read_table(tmp_path / out / f"{split}.parquet") for out in ("default", "capped"))
        assert got.equals(want), split
    f = pq.ParquetFile(tmp_path / "capped" / "train.parquet")
    groups = [f.read_row_group(g) for g in range(f.num_row_groups)]
    assert meta["row_groups"]["train"] == len(groups) >= 8
    assert sum(g.num_rows for g in groups) == meta["splits"]["train"]["rows"] < rows_per_group(0)
    sizes = [arrow_bytes(g) for g in groups]
    assert max(sizes) <= cap and min(sizes[:-1]) > cap / 2, sizes
    for g, size in enumerate(sizes[:-1]):  # greedy: the next group's first row did not fit
        assert size + arrow_bytes(groups[g + 1].slice(0, 1)) > cap, g


def test_history_events_read_in_bounded_memory(tmp_path, monkeypatch):
    """The split writer reads each history events file front to back once per split; what it holds must not
    grow with the file (pyarrow's default pre-buffering kept every row group read until the end: memory up to
    the whole file, 0.4 GB more at 80M Taobao Ad raw rows)."""
    monkeypatch.setattr(engine_module, "EVENT_BATCH_ROWS", 1000)
    rows, size = 400_000, 1000
    values = pa.array(np.arange(rows, dtype=np.int64))
    pq.write_table(pa.table({"a": values, "b": values}), tmp_path / "events.parquet", row_group_size=size,
                   compression="none")  # 6.4 MB in 400 row groups, as write_events writes them
    events = engine_module._HistoryEvents(tmp_path / "events.parquet", ["a", "b"])
    base, peak = pa.total_allocated_bytes(), 0
    for start in range(0, rows - 5, 997):
        a, b = events.lists(np.array([start, start + 2]), np.array([start + 5, start + 4]))
        assert a.to_pylist() == b.to_pylist() == [list(range(start, start + 5)), [start + 2, start + 3]]
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert peak < 200_000, peak  # a few row groups (16 kB each), not the 6.4 MB read

def test_taobao_ad_cap_and_invariant(tmp_path):
    impressions = [f"1,{T0 + i},{600 + i},430548_1007,0,1" for i in range(60)]
    impressions += [f"1,{T0 + 59},{700},430548_1007,1,0", f"1,{T0 + 3 * DAY},{701},430548_1007,1,0"]
    convert("taobao-ad", taobao_ad_raw(tmp_path / "raw", impressions), tmp_path / "out")
    t = load(tmp_path / "out")
    rows = {r[ITEM_ID]: r for r in rows_of(t)}
    assert rows[700][ITEM_HISTORY] == list(range(609, 659))
    assert rows[701][ITEM_HISTORY] == list(range(610, 660))
    clicks = np.arange(60)
    assert_leak_free(t, np.ones(60, np.int64), 600 + clicks, T0 + clicks)


# --------------------------------------------------------------------------------------------------
# Real samples
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_rows_as_the_numpy_converters(tmp_path, case):
    """Row by row (every column, histories included) the DuckDB converters write what the in-memory numpy
    converters wrote (digests captured from them, tests/converter_digests.py); taobao-behavior: the positives
    and their histories (negatives are random: see test_behavior_negatives_statistics)."""
    raw = CASES[case][1]
    shared = shared_data() if not raw.startswith("gen:") else Path("/nonexistent")
    expected = json.loads(DIGESTS.read_text())[case]
    got = run_case(case, shared, tmp_path)
    assert got["digests"] == expected["digests"]
    assert got["filled"] == expected["filled"]
    for split in SPLITS:
        want, have = expected["splits"][split], got["splits"][split]
        assert {k: have[k] for k in ("rows", "first_timestamp", "last_timestamp")} == \
            {k: want[k] for k in ("rows", "first_timestamp", "last_timestamp")}
        assert have["ctr"] == pytest.approx(want["ctr"], abs=1e-12)


def test_behavior_negatives_statistics(tmp_path):
    """The SQL sampler draws other negatives than the numpy one did (another generator), from the same
    per-day pools with the same weights: per (local day, item) its negatives follow the item's clicks that
    day as closely as the numpy sampler's did (its numbers: correlation 0.7281, share of negatives on the
    top 1 % clicked (day, item) pairs 0.0597, 6 draws of 4 (day, item) pairs from the fallback pools)."""
    raw = shared_data() / "taobao_userbehavior_sample" / "UserBehavior_sample.csv"
    convert("taobao-behavior", raw, tmp_path / "out", "--negatives", "3")
    t = load(tmp_path / "out")
    user, item, ts, pv = behavior_events(raw)
    label, neg_item = t[LABEL].to_numpy(), t[ITEM_ID].to_numpy()
    neg = label == 0
    assert neg.sum() == 3 * pv.sum()
    click_day = local_days(ts[pv], "Asia/Shanghai")
    neg_day = local_days(t[TIMESTAMP].to_numpy()[neg], "Asia/Shanghai")
    click_keys, click_counts = np.unique(click_day * (1 << 40) + item[pv], return_counts=True)
    neg_keys, neg_counts = np.unique(neg_day * (1 << 40) + neg_item[neg], return_counts=True)
    pos = np.minimum(np.searchsorted(click_keys, neg_keys), len(click_keys) - 1)
    same_day = click_keys[pos] == neg_keys
    assert ((~same_day).sum(), neg_counts[~same_day].sum()) == (4, 6)
    per_pair = np.zeros(len(click_keys))
    per_pair[pos[same_day]] = neg_counts[same_day]
    assert np.corrcoef(per_pair, click_counts)[0, 1] == pytest.approx(0.7281, abs=0.02)
    top = click_counts >= np.quantile(click_counts, 0.99)
    assert per_pair[top].sum() / per_pair.sum() == pytest.approx(0.0597, abs=0.005)
    # never an item the user touched; the category is that of the item's first click of the day
    touched = np.unique(user * (1 << 32) + item)
    neg_user = t[USER_ID].to_numpy()[neg]
    assert not np.isin(neg_user * (1 << 32) + neg_item[neg], touched).any()
    category = np.genfromtxt(raw, delimiter=",", usecols=2, dtype=np.int64)[pv]
    first = np.unique(click_day * (1 << 40) + item[pv], return_index=True)[1]
    neg_category = t[CATEGORY_ID].to_numpy()[neg]
    keys = neg_day * (1 << 40) + neg_item[neg]
    at = np.minimum(np.searchsorted(click_keys, keys), len(click_keys) - 1)
    in_day = click_keys[at] == keys
    assert np.array_equal(category[first][at[in_day]], neg_category[in_day])


def test_movielens_small_sample(tmp_path):
    raw = shared_data() / "ml-latest-small"
    meta = convert("movielens", raw, tmp_path / "out")
    assert meta["rows"] == 100_836
    assert_canonical(tmp_path / "out")
    t = load(tmp_path / "out")
    assert_leak_free(t, t[USER_ID].to_numpy(), t[ITEM_ID].to_numpy(), t[TIMESTAMP].to_numpy())
    split, ts = t["split"].to_numpy(), t[TIMESTAMP].to_numpy()
    assert ts[split == 0].max() < ts[split == 1].min() and ts[split == 1].max() < ts[split == 2].min()


def test_generated_movielens_files(tmp_path):
    """tools/gen_raw.py movielens writes ml-latest's ratings.csv / movies.csv (titles with a comma quoted,
    ``|``-joined genres) that the converter reads whole: one row per rating, every movie found, each row's
    category the first genre of its movie."""
    raw = raw_path("gen:movielens --rows 5000 --seed 6", Path("/nonexistent"), tmp_path)
    meta = convert("movielens", raw, tmp_path / "out")
    assert (meta["rows"], meta["dropped_total"], list(meta["filled"].values())) == (5000, 0, [0])
    movies = pcsv.read_csv(raw / "movies.csv").to_pylist()
    assert len(movies) == 100 and movies[9]["title"].startswith("Movie 10, The (")
    category = {m["movieId"]: GENRE_IDS[m["genres"].split("|")[0]] for m in movies}
    t = load(tmp_path / "out")
    assert t[CATEGORY_ID].to_pylist() == [category[i] for i in t[ITEM_ID].to_pylist()]
    assert len(set(t[CATEGORY_ID].to_pylist())) >= 15


def test_behavior_sample(tmp_path):
    raw = shared_data() / "taobao_userbehavior_sample" / "UserBehavior_sample.csv"
    meta = convert("taobao-behavior", raw, tmp_path / "out")
    user, item, ts, pv = behavior_events(raw)
    assert len(user) == 84_474 and meta["rows"] == 2 * pv.sum()
    assert all(meta["splits"][s]["rows"] > 0 for s in SPLITS)
    assert_canonical(tmp_path / "out")
    assert_leak_free(load(tmp_path / "out"), user[pv], item[pv], ts[pv])


def test_taobaoad_fuxictr_sample(tmp_path):
    raw = shared_data() / "taobaoad_tiny"
    meta = convert("taobao-ad", raw, tmp_path / "out")
    assert [meta["splits"][s]["rows"] for s in SPLITS] == [100, 100, 100]
    assert_canonical(tmp_path / "out")
    first = rows_of(load(tmp_path / "out"))[0]
    assert first[TIMESTAMP] == T0 and first[ITEM_HISTORY] == [170301, 573514]


def test_taobaoad_fuxictr_truncates(tmp_path):
    header = ("clk,time_stamp,userid,adgroup_id,pid,cate_id,campaign_id,customer,brand,price,cms_segid,"
              "cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
              "new_user_class_level,click_sequence")
    seq = "^".join(str(i) for i in range(1, 61))
    for name in ("train", "valid", "test"):
        write(tmp_path / "raw" / f"{name}.csv", [
            header, f"1,2017-05-06 00:00:00,5,9,430548_1007,3,1,1,,1.5,0,1,1,1,,1,0,,{seq}",
            "0,2017-05-06 00:00:01,5,2,430548_1007,4,1,1,,1.5,0,1,1,1,,1,0,,",
        ])
    meta = convert("taobao-ad", tmp_path / "raw", tmp_path / "out")
    rows = rows_of(pq.read_table(tmp_path / "out" / "train.parquet"))
    assert rows[0][ITEM_HISTORY] == list(range(11, 61)) and rows[1][ITEM_HISTORY] == []
    assert rows[0][CATEGORY_HISTORY] == [0] * 50  # unknown ads -> 0
    assert meta["filled"]["history items with no known category (category 0)"] == 150
    bad_sequence = "1,2017-05-06 00:00:00,5,9,430548_1007,3,1,1,,1.5,0,1,1,1,,1,0,,1^x^3"
    write(tmp_path / "raw" / "valid.csv", [header, bad_sequence])
    with pytest.raises(ConversionError, match=r"valid.csv: line 2: column 'click_sequence'"):
        convert("taobao-ad", tmp_path / "raw", tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Bad rows
# --------------------------------------------------------------------------------------------------

RATINGS_HEADER = "userId,movieId,rating,timestamp"
GOOD_RATINGS = ["1,10,4.0,100", "1,20,3.5,200"]


@pytest.mark.parametrize(
    "bad_line, column, reason",
    [
        ("1,30,4.0", "*", "expected 4 fields, got 3"),
        ("1,abc,4.0,300", "movieId", "not a non-negative integer"),
        ("-3,30,4.0,300", "userId", "negative id"),
        (",30,4.0,300", "userId", "missing value"),
        ("1,30,x,300", "rating", "not a number"),
    ],
)
def test_bad_rating_rows(tmp_path, bad_line, column, reason):
    raw = movielens_latest(tmp_path / "raw")
    write(raw / "ratings.csv", [RATINGS_HEADER, GOOD_RATINGS[0], bad_line, GOOD_RATINGS[1]])
    with pytest.raises(ConversionError) as e:
        convert("movielens", raw, tmp_path / "out")
    message = str(e.value)
    assert "ratings.csv" in message and "line 3" in message and repr(column) in message and reason in message
    meta = convert("movielens", raw, tmp_path / "out", "--on-bad-row", "drop")
    assert meta["rows"] == 2 and meta["dropped"] == {f"ratings.csv: {column}: {reason}": 1}
    assert meta["dropped_total"] == 1


def test_missing_column(tmp_path):
    raw = movielens_latest(tmp_path / "raw")
    write(raw / "ratings.csv", ["userId,movieId,timestamp", "1,10,100"])
    for policy in ("error", "drop"):
        with pytest.raises(ConversionError, match=r"ratings.csv: line 1: missing column 'rating'"):
            convert("movielens", raw, tmp_path / "out", "--on-bad-row", policy)


def test_bad_label_and_lines_after_dropped_rows(tmp_path, caplog):
    raw = taobao_ad_raw(tmp_path / "raw", [
        f"1,{T0},500,430548_1007,0,1", "1,2", f"1,{T0 + DAY},501,430548_1007,0,2",
        f"1,{T0 + 2 * DAY},502,430548_1007,1,0", f"1,{T0 + 3 * DAY},503,430548_1007,1,1",
    ])
    with pytest.raises(ConversionError, match=r"raw_sample.csv: line 3: column '\*'"):
        convert("taobao-ad", raw, tmp_path / "out")
    meta = convert("taobao-ad", raw, tmp_path / "out", "--on-bad-row", "drop")
    assert meta["rows"] == 2
    assert "column 'clk': value not in {0, 1}, first at line 4" in caplog.text  # after the skipped line 3
    assert meta["dropped"] == {
        "raw_sample.csv: *: expected 6 fields, got 2": 1,
        "raw_sample.csv: clk: value not in {0, 1}": 1,
        "raw_sample.csv: nonclk: nonclk + clk != 1": 1,
    }
    write(raw / "raw_sample.csv", ["user,time_stamp,adgroup_id,pid,nonclk,clk", "1,2", f"1,{T0},500,x,0,2"])
    with pytest.raises(ConversionError, match=r"raw_sample.csv: line 2: column '\*'"):
        convert("taobao-ad", raw, tmp_path / "out")


def test_behavior_bad_rows_and_date_range(tmp_path):
    raw = behavior_file(tmp_path / "UserBehavior.csv")
    lines = raw.read_text().splitlines()
    lines[3] = lines[3].replace("cart", "click")
    lines.append("5,300,30,pv,1000")
    write(raw, lines)
    with pytest.raises(ConversionError, match=r"UserBehavior.csv: line 4: column 'behavior'"):
        convert("taobao-behavior", raw, tmp_path / "out")
    meta = convert("taobao-behavior", raw, tmp_path / "out", "--on-bad-row", "drop",
                   "--date-range", "2017-11-25:2017-12-03")
    assert meta["dropped"] == {
        "UserBehavior.csv: behavior: not one of ('pv', 'cart', 'fav', 'buy')": 1,
        "UserBehavior.csv: timestamp: date out of range": 1,
    }


def test_cli_exit_codes(tmp_path, capsys):
    raw = movielens_latest(tmp_path / "raw")
    assert cli_main(["data", "movielens", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 0
    write(raw / "ratings.csv", [RATINGS_HEADER, "1,10,4.0,-5"])
    capsys.readouterr()
    assert cli_main(["data", "movielens", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mdaf-rec: error: ") and err.count("\n") == 1 and "ratings.csv: line 2: column 'timestamp'" in err


def test_non_utf8_byte_is_a_bad_row_at_its_line(tmp_path):
    raw = behavior_file(tmp_path / "UserBehavior.csv")
    lines = raw.read_bytes().split(b"\n")
    lines[6] = lines[6].replace(b",pv,", b",p\xffv,")  # line 7
    raw.write_bytes(b"\n".join(lines))
    with pytest.raises(ConversionError, match=r"UserBehavior.csv: line 7: column 'behavior': not valid UTF-8"):
        convert("taobao-behavior", raw, tmp_path / "out")
    meta = convert("taobao-behavior", raw, tmp_path / "out", "--on-bad-row", "drop")
    assert meta["dropped"] == {"UserBehavior.csv: behavior: not valid UTF-8": 1}
    clicks = sum(line.split(b",")[3] == b"pv" for line in lines if line)  # the bad line is not a click any more
    assert meta["rows"] == 2 * clicks


def test_non_utf8_header_is_an_error_at_line_1(tmp_path):
    raw = movielens_latest(tmp_path / "raw")
    ratings = raw / "ratings.csv"
    ratings.write_bytes(b"userId,movieId,rating,time\xffstamp\n" + ratings.read_bytes().split(b"\n", 1)[1])
    with pytest.raises(ConversionError, match=r"ratings.csv: line 1: the header is not valid utf8 text \(invalid start byte at byte 26\)"):
        convert("movielens", raw, tmp_path / "out")


def test_last_line_without_line_end_is_a_bad_row(tmp_path):
    """A file cut mid-number: its last timestamp still parses, to a wrong time."""
    raw = behavior_file(tmp_path / "UserBehavior.csv")
    text = raw.read_text()
    raw.write_text(text[:-4])  # "...,15118" of the last line's timestamp, no line end
    last = len(text.splitlines())
    with pytest.raises(ConversionError, match=rf"UserBehavior.csv: line {last}: column '\*': last line has no line end"):
        convert("taobao-behavior", raw, tmp_path / "out")
    meta = convert("taobao-behavior", raw, tmp_path / "out", "--on-bad-row", "drop")
    assert meta["dropped"] == {"UserBehavior.csv: *: last line has no line end (file cut short?)": 1}
    assert meta["rows"] == convert("taobao-behavior", behavior_file(tmp_path / "full.csv"), tmp_path / "full")["rows"] - 2


def test_complete_last_line_without_line_end_is_also_refused(tmp_path):
    """The file cannot tell a complete last line from a cut one: refused too, named."""
    raw = behavior_file(tmp_path / "UserBehavior.csv")
    raw.write_text(raw.read_text().rstrip("\n"))
    with pytest.raises(ConversionError, match="last line has no line end"):
        convert("taobao-behavior", raw, tmp_path / "out")
