"""Taobao UserBehavior (Tianchi 649) -> canonical dataset, the DIN/DIEN protocol.

Input: one header-less CSV ``user_id,item_id,category_id,behavior,timestamp`` with behavior in
``pv`` / ``cart`` / ``fav`` / ``buy``. Each click (``pv``) is a positive (label 1) followed by
``--negatives`` N negatives at the same timestamp: items the user never touched (any behavior),
drawn with replacement with probability proportional to their click count ON THE CLICK'S LOCAL DAY
(``--tz``), so within every day an item's expected negatives match its positives and no later day
reaches an earlier one (whole-file counts leaked the future: an item popular only on the test day
was a train negative and a test positive). A click whose user touched every item clicked that day
(only on near-empty days, e.g. stray timestamps) draws from the clicks of all days up to its day,
and if the user touched all of those too, from the whole file. A negative's category is that of the
item's first click (file order) in the pool it was drawn from, so never from a later day.
History = the user's clicks strictly before the target's timestamp, most recent last. Split by
local date (Asia/Shanghai): last day test, the day before val, the rest train. Rows = clicks x
(1 + N); same ``--seed`` (and DuckDB version) -> identical output. Sampling, histories and splits run
out of core as SQL (:mod:`.engine`; on Spark the same draws use another hash, so other negatives with the
same distribution).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mdaf_rec.data.converters.common import (
    BadRows,
    ConversionError,
    add_common_arguments,
    add_local_date_split_arguments,
    cli_options,
    local_days,
    non_negative_int,
    read_csv,
    source_files,
)
from mdaf_rec.data.converters.engine import (
    SEQ,
    Engine,
    add_engine_arguments,
    add_histories,
    local_date_split,
    open_engine,
    write_dataset,
)
from mdaf_rec.data.schema import CATEGORY_HISTORY, CATEGORY_ID, ITEM_HISTORY, ITEM_ID, LABEL, TIMESTAMP, USER_ID

logger = logging.getLogger(__name__)

BEHAVIORS = ("pv", "cart", "fav", "buy")
CLICK = 0  # index of "pv" in BEHAVIORS
COLUMNS = (USER_ID, ITEM_ID, CATEGORY_ID, "behavior", TIMESTAMP)
# Redraw rounds for negatives that hit an item the user touched before giving up.
MAX_REDRAWS = 1000
# Negative pools, smallest first: a click falls back to the next one only if its user touched every
# item of the previous one. Per pool: the segment key of a draw (from its click's local day) and which
# clicks make up a segment.
POOLS = ("the clicks of the same local day", "the clicks of all days up to that day", "all clicks")
_SEGMENT = ("{t}.day", "{t}.day", "0")
_SEGMENT_CLICKS = ("c.day = s.seg", "c.day <= s.seg", "true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``taobao-behavior`` options."""
    add_common_arguments(parser, raw_help="UserBehavior.csv, or a folder holding one CSV", timezone="Asia/Shanghai")
    add_local_date_split_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--negatives", type=non_negative_int, default=1,
                        help="negatives per click, drawn from the same local day's clicks (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="negative sampling seed (default 0)")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Converts ``args.raw`` into ``args.out``; returns the meta written."""
    path = _raw_file(args.raw)
    bad = BadRows(args.on_bad_row)
    with open_engine(args) as engine:
        if not engine.stage("events", _read(path, bad, args)):
            raise ConversionError(f"{path}: no rows")
        engine.create("clicks", f"SELECT {SEQ}, {USER_ID}, {ITEM_ID}, {CATEGORY_ID}, {TIMESTAMP}, day "
                      f"FROM events WHERE behavior = {CLICK}")
        events, clicks, users = engine.one(
            f"SELECT (SELECT count(*) FROM events), count(*), count(DISTINCT {USER_ID}) FROM clicks")
        if not clicks:
            raise ConversionError(f"{path}: no clicks (behavior 'pv')")
        logger.info("%d events, %d clicks of %d users; sampling %d negatives per click", events, clicks, users,
                    args.negatives)
        split, rule = local_date_split(engine, "clicks", args.val_days, args.test_days)
        _sample_negatives(engine, args)
        # the rows (each click, then its negatives) are narrow until the history window adds the lists, so
        # no list ever goes through a join
        engine.create(
            "targets",
            f"SELECT {SEQ}, -1 AS j, {USER_ID}, {ITEM_ID}, {CATEGORY_ID}, {TIMESTAMP}, day, 1 AS {LABEL} FROM clicks "
            f"UNION ALL SELECT c.{SEQ}, n.j, c.{USER_ID}, n.{ITEM_ID}, n.{CATEGORY_ID}, c.{TIMESTAMP}, c.day, 0 "
            f"FROM clicks c JOIN negatives n ON c.{SEQ} = n.{SEQ}"
        )
        add_histories(engine, "rows", "targets", [("clicks", {ITEM_HISTORY: ITEM_ID, CATEGORY_HISTORY: CATEGORY_ID})],
                      args.max_history, extra={"split": split})
        meta = {
            "format": "taobao-behavior",
            "protocol": (
                f"DIN/DIEN: each click (pv) is a positive followed by {args.negatives} negatives at the same "
                "timestamp, items the user never touched, drawn with replacement weighted by their click "
                f"count on the same local day ({args.tz}; a user who touched every item clicked that day "
                "draws from the clicks of all days up to it, then of the whole file), category from the "
                f"item's first click in that pool (seed {args.seed}); history = the user's last "
                f"{args.max_history} clicks strictly before the timestamp, most recent last"
            ),
            "timezone": args.tz,
            "source": source_files([path]),
            "split": rule,
            "options": cli_options(args),
        }
        return write_dataset(engine, args.out, "rows", order_by=f"{USER_ID}, {TIMESTAMP}, {SEQ}, j",
                             extra_sparse=[], dense=[], meta=meta, bad=bad)


def _raw_file(raw: Path) -> Path:
    """``raw`` itself, or the single ``.csv`` file in the folder ``raw``."""
    if raw.is_dir():
        files = sorted(raw.glob("*.csv"))
        if len(files) != 1:
            raise ConversionError(f"{raw}: expected exactly one .csv file, found {[f.name for f in files]}")
        return files[0]
    return raw


def _read(path: Path, bad: BadRows, args: argparse.Namespace) -> Iterator[Dict[str, np.ndarray]]:
    """Blocks of the five columns of ``path`` (behavior as an index into BEHAVIORS) and the local ``day``."""
    for block in read_csv(path, COLUMNS, bad, names=COLUMNS):
        ids = [block.ids(c) for c in (USER_ID, ITEM_ID, CATEGORY_ID)]
        behavior = pc.index_in(block.strings("behavior"), pa.array(BEHAVIORS))
        block.reject("behavior", behavior.is_null().to_numpy(zero_copy_only=False), f"not one of {BEHAVIORS}")
        ts = block.ids(TIMESTAMP)
        block.in_date_range(TIMESTAMP, ts, args.tz, args.date_range)
        columns = block.rows(*ids, behavior.fill_null(0).to_numpy().astype(np.int8), ts)
        yield {**dict(zip(COLUMNS, columns)), "day": local_days(columns[-1], args.tz)}


def _sample_negatives(engine: Engine, args: argparse.Namespace) -> None:
    """Creates the table ``negatives (seq, j, item_id, category_id)``: ``args.negatives`` draws ``j`` per click
    ``seq`` of ``clicks`` (see the module docstring).

    Each draw picks an entry of its pool segment with probability proportional to the entry's click count:
    a uniform number ``u`` in ``[0, clicks of the segment)`` from the engine's hash of ``(seed, seq, j, round)``,
    then the entry whose cumulative click range holds ``u`` (``engine.range_join``: DuckDB's ASOF join). Draws that hit an item the
    user touched are redrawn with the next round number. A draw whose user touched every item of its
    segment goes to the next, larger pool (:data:`POOLS`).
    """
    engine.create("negatives", f"SELECT CAST(NULL AS BIGINT) AS {SEQ}, CAST(NULL AS INTEGER) AS j, "
                  f"CAST(NULL AS BIGINT) AS {ITEM_ID}, CAST(NULL AS BIGINT) AS {CATEGORY_ID} WHERE false")
    if not args.negatives:
        return
    engine.create("touched", f"SELECT DISTINCT {USER_ID}, {ITEM_ID} FROM events")
    engine.create("n_touched", f"SELECT {USER_ID}, count(*) AS n FROM touched GROUP BY {USER_ID}")
    engine.create("todo", f"SELECT c.{SEQ}, r.j::INTEGER AS j, c.{USER_ID}, c.day "
                  f"FROM clicks c CROSS JOIN {engine.numbers(args.negatives)} r")
    for tier, name in enumerate(POOLS):
        if not engine.one("SELECT count(*) FROM todo")[0]:
            break
        segment = _SEGMENT[tier].format(t="todo")
        engine.create(
            "pool", f"SELECT seg, {ITEM_ID}, {CATEGORY_ID}, cnt, (sum(cnt) OVER (PARTITION BY seg ORDER BY {ITEM_ID} "
            f"ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) - cnt)::BIGINT AS lo "
            f"FROM (SELECT s.seg, c.{ITEM_ID}, count(*) AS cnt, min_by(c.{CATEGORY_ID}, c.{SEQ}) AS {CATEGORY_ID} "
            f"FROM clicks c JOIN (SELECT DISTINCT {segment} AS seg FROM todo) s ON {_SEGMENT_CLICKS[tier]} "
            f"GROUP BY s.seg, c.{ITEM_ID})"
        )
        engine.create("segments", "SELECT seg, count(*) AS size, sum(cnt)::BIGINT AS total FROM pool GROUP BY seg")
        # users who touched every item of a segment (only possible where the segment is not larger than
        # the number of items they touched)
        engine.create(
            "stuck", f"SELECT c.{USER_ID}, c.seg FROM "
            f"(SELECT DISTINCT u.{USER_ID}, u.seg, s.size FROM (SELECT {USER_ID}, {segment} AS seg FROM todo) u "
            f"JOIN segments s ON u.seg = s.seg JOIN n_touched n ON u.{USER_ID} = n.{USER_ID} WHERE s.size <= n.n) c "
            f"JOIN touched t ON t.{USER_ID} = c.{USER_ID} JOIN pool p ON p.seg = c.seg AND p.{ITEM_ID} = t.{ITEM_ID} "
            f"GROUP BY c.{USER_ID}, c.seg, c.size HAVING count(*) = c.size"
        )
        engine.create(
            "active", f"SELECT t.{SEQ}, t.j, t.{USER_ID}, {_SEGMENT[tier].format(t='t')} AS seg FROM todo t "
            f"{engine.ANTI} stuck s ON t.{USER_ID} = s.{USER_ID} AND {_SEGMENT[tier].format(t='t')} = s.seg"
        )
        drawn = engine.one("SELECT count(*) FROM active")[0]
        if tier and drawn:
            logger.info("%d negatives drawn from %s (their user touched every item of the smaller pool)",
                        drawn, name)
        for attempt in range(MAX_REDRAWS + 1):
            if not engine.one("SELECT count(*) FROM active")[0]:
                break
            if attempt == MAX_REDRAWS:
                user = engine.one(f"SELECT min({USER_ID}) FROM active")[0]
                raise ConversionError(f"user {user}: no untouched item found in {MAX_REDRAWS} draws")
            u = engine.uniform(f"{args.seed}, a.{SEQ}, a.j, {tier}, {attempt}", "s.total")
            engine.create("drawn", f"SELECT a.{SEQ}, a.j, a.{USER_ID}, a.seg, p.{ITEM_ID}, p.{CATEGORY_ID} FROM "
                          + engine.range_join(f"(SELECT a.*, {u} AS u FROM active a JOIN segments s ON a.seg = s.seg)",
                                              "pool"))
            engine.append("negatives", f"SELECT d.{SEQ}, d.j, d.{ITEM_ID}, d.{CATEGORY_ID} FROM drawn d "
                          f"{engine.ANTI} touched t ON d.{USER_ID} = t.{USER_ID} AND d.{ITEM_ID} = t.{ITEM_ID}")
            engine.create("active", f"SELECT d.{SEQ}, d.j, d.{USER_ID}, d.seg FROM drawn d "
                          f"{engine.SEMI} touched t ON d.{USER_ID} = t.{USER_ID} AND d.{ITEM_ID} = t.{ITEM_ID}")
        engine.create("todo", f"SELECT t.* FROM todo t "
                      f"{engine.SEMI} stuck s ON t.{USER_ID} = s.{USER_ID} AND {_SEGMENT[tier].format(t='t')} = s.seg")
    user = engine.one(f"SELECT min({USER_ID}) FROM todo")[0]
    if user is not None:
        raise ConversionError(f"user {user}: touched every clicked item, no negative to draw")
