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
(1 + N); same ``--seed`` -> identical output.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mdaf_rec.data.converters.common import (
    BadRows,
    ConversionError,
    Impressions,
    add_common_arguments,
    add_local_date_split_arguments,
    build_histories,
    cli_options,
    concat,
    local_days,
    non_negative_int,
    read_csv,
    source_files,
    split_by_local_date,
    take_ranges,
    write_dataset,
)
from mdaf_rec.data.schema import CATEGORY_ID, ITEM_ID, LABEL, TIMESTAMP, USER_ID

logger = logging.getLogger(__name__)

BEHAVIORS = ("pv", "cart", "fav", "buy")
CLICK = 0  # index of "pv" in BEHAVIORS
COLUMNS = (USER_ID, ITEM_ID, CATEGORY_ID, "behavior", TIMESTAMP)
# Redraw rounds for negatives that hit an item the user touched before giving up.
MAX_REDRAWS = 1000
# Negative pools, smallest first: a click falls back to the next one only if its user touched every
# item of the previous one.
POOLS = ("the clicks of the same local day", "the clicks of all days up to that day", "all clicks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``taobao-behavior`` options."""
    add_common_arguments(parser, raw_help="UserBehavior.csv, or a folder holding one CSV", timezone="Asia/Shanghai")
    add_local_date_split_arguments(parser)
    parser.add_argument("--negatives", type=non_negative_int, default=1,
                        help="negatives per click, drawn from the same local day's clicks (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="negative sampling seed (default 0)")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Converts ``args.raw`` into ``args.out``; returns the meta written."""
    path = _raw_file(args.raw)
    bad = BadRows(args.on_bad_row)
    user, item, category, behavior, ts = _read(path, bad, args)
    click = behavior == CLICK
    if not click.any():
        raise ConversionError(f"{path}: no clicks (behavior 'pv')")
    click_day = local_days(ts[click], args.tz)
    within = np.lexsort((ts[click], user[click]))
    order = np.flatnonzero(click)[within]
    pos_user, pos_item, pos_category, pos_ts = user[order], item[order], category[order], ts[order]
    logger.info("%d events, %d clicks of %d users; sampling %d negatives per click",
                len(ts), len(order), len(np.unique(pos_user)), args.negatives)
    neg_item, neg_category = _sample_negatives(
        user, item, pos_user, click_day[within], (item[click], category[click], click_day), args
    )
    offsets, (hist_items, hist_categories) = build_histories(
        pos_user, pos_ts, [pos_item, pos_category], pos_user, pos_ts, args.max_history
    )
    group = 1 + args.negatives
    offsets, index = take_ranges(np.repeat(offsets[:-1], group), np.repeat(offsets[1:], group))
    label = np.zeros((len(order), group), np.int8)
    label[:, 0] = 1
    columns = {
        USER_ID: np.repeat(pos_user, group),
        ITEM_ID: np.column_stack([pos_item, neg_item]).ravel(),
        CATEGORY_ID: np.column_stack([pos_category, neg_category]).ravel(),
        TIMESTAMP: np.repeat(pos_ts, group),
        LABEL: label.ravel(),
    }
    split, rule = split_by_local_date(columns[TIMESTAMP], args.tz, args.val_days, args.test_days)
    data = Impressions(columns, offsets, hist_items[index], hist_categories[index], split)
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
    return write_dataset(args.out, data, extra_sparse=[], dense=[], meta=meta, bad=bad)


def _raw_file(raw: Path) -> Path:
    """``raw`` itself, or the single ``.csv`` file in the folder ``raw``."""
    if raw.is_dir():
        files = sorted(raw.glob("*.csv"))
        if len(files) != 1:
            raise ConversionError(f"{raw}: expected exactly one .csv file, found {[f.name for f in files]}")
        return files[0]
    return raw


def _read(path: Path, bad: BadRows, args: argparse.Namespace):
    """The five columns of ``path`` as numpy arrays (behavior as an index into BEHAVIORS)."""
    parts = []
    for block in read_csv(path, COLUMNS, bad, names=COLUMNS):
        ids = [block.ids(c) for c in (USER_ID, ITEM_ID, CATEGORY_ID)]
        behavior = pc.index_in(block.strings("behavior"), pa.array(BEHAVIORS))
        block.reject("behavior", behavior.is_null().to_numpy(zero_copy_only=False), f"not one of {BEHAVIORS}")
        ts = block.ids(TIMESTAMP)
        block.in_date_range(TIMESTAMP, ts, args.tz, args.date_range)
        parts.append(block.rows(*ids, behavior.fill_null(0).to_numpy().astype(np.int8), ts))
    if not parts:
        raise ConversionError(f"{path}: no rows")
    return concat(parts)


def _sample_negatives(
    user: np.ndarray, item: np.ndarray, pos_user: np.ndarray, pos_day: np.ndarray,
    clicks: Tuple[np.ndarray, np.ndarray, np.ndarray], args: argparse.Namespace,
) -> Tuple[np.ndarray, np.ndarray]:
    """``[clicks, N]`` negative items and their categories (see the module docstring).

    ``clicks`` = (item, category, local day) of every click in file order; ``pos_day`` = the local
    day of each positive. Each negative is drawn from its click's day pool; a click whose user
    touched every item of that pool falls back to the pool of all days up to its day, then to the
    pool of the whole file (see :data:`POOLS`).
    """
    click_item, click_category, click_day = clicks
    users = np.unique(user)
    items = np.unique(item)
    n_items = len(items)
    touched = np.unique(np.searchsorted(users, user) * n_items + np.searchsorted(items, item))
    n_touched = np.bincount(touched // n_items, minlength=len(users))
    click_rank = np.searchsorted(items, click_item)
    owner = np.repeat(np.searchsorted(users, pos_user), args.negatives)
    day = np.repeat(pos_day, args.negatives)
    drawn = np.empty(len(owner), np.int64)
    drawn_category = np.empty(len(owner), click_category.dtype)
    rng = np.random.default_rng(args.seed)
    todo = np.arange(len(owner))
    for tier, name in enumerate(POOLS):
        if not len(todo):
            break
        # pool segments: each click day (tier 0), the days up to each remaining day (1), all days (2)
        days = np.unique(day[todo]) if tier < 2 else click_day.max(keepdims=True)
        pool = _Pool(click_rank, click_category, click_day, days, cumulative=tier > 0, n_items=n_items)
        segment = np.searchsorted(days, day[todo]) if tier < 2 else np.zeros(len(todo), np.int64)
        stuck = pool.covered(owner[todo], segment, touched, n_touched)
        if tier:
            logger.info("%d negatives drawn from %s (their user touched every item of the smaller pool)",
                        np.count_nonzero(~stuck), name)
        ok = todo[~stuck]
        entry = pool.draw(rng, owner[ok], segment[~stuck], touched, users)
        drawn[ok], drawn_category[ok] = pool.item[entry], pool.category[entry]
        todo = todo[stuck]
    if len(todo):
        raise ConversionError(f"user {users[owner[todo[0]]]}: touched every clicked item, no negative to draw")
    shape = (len(pos_user), args.negatives)
    return items[drawn].reshape(shape), drawn_category.reshape(shape)


class _Pool:
    """Click-count-weighted item pools, one segment per entry of ``days``: the clicks of that local
    day, or (``cumulative``) of every day up to it. Entries are sorted by (segment, item rank);
    an entry's category is that of the item's first click (file order) among the segment's clicks."""

    def __init__(self, click_rank: np.ndarray, click_category: np.ndarray, click_day: np.ndarray,
                 days: np.ndarray, cumulative: bool, n_items: int) -> None:
        if cumulative:  # few segments (fallback days only): one pass each
            parts = [np.flatnonzero(click_day <= d) for d in days]
            source = np.concatenate(parts)
            seg = np.repeat(np.arange(len(days), dtype=np.int64), [len(p) for p in parts])
        else:
            seg = np.searchsorted(days, click_day)
            source = np.flatnonzero(days[np.minimum(seg, len(days) - 1)] == click_day)
            seg = seg[source]
        keys, first, counts = np.unique(seg * n_items + click_rank[source], return_index=True, return_counts=True)
        self.n_items = n_items
        self.segment = keys // n_items
        self.item = keys % n_items
        self.category = click_category[source[first]]
        self.cum = np.cumsum(counts)
        self.start = np.searchsorted(self.segment, np.arange(len(days)))
        self.end = np.searchsorted(self.segment, np.arange(len(days)), side="right")
        self.base = self.cum[self.start] - counts[self.start]  # clicks before each segment
        self.total = self.cum[self.end - 1] - self.base

    def covered(self, owner: np.ndarray, segment: np.ndarray, touched: np.ndarray,
                n_touched: np.ndarray) -> np.ndarray:
        """Whether ``owner`` (a user rank) touched every item of ``segment``, per request."""
        pairs, inverse = np.unique(owner * len(self.start) + segment, return_inverse=True)
        user, seg = pairs // len(self.start), pairs % len(self.start)
        size = self.end[seg] - self.start[seg]
        candidate = np.flatnonzero(size <= n_touched[user])  # only these can cover their segment
        result = np.zeros(len(pairs), bool)
        if len(candidate):
            offsets, index = take_ranges(self.start[seg[candidate]], self.end[seg[candidate]])
            lengths = np.diff(offsets)
            hit = _isin_sorted(touched, np.repeat(user[candidate] * self.n_items, lengths) + self.item[index])
            n_hit = np.bincount(np.repeat(np.arange(len(candidate)), lengths), weights=hit, minlength=len(candidate))
            result[candidate] = n_hit == size[candidate]
        return result[inverse.reshape(-1)]

    def draw(self, rng: np.random.Generator, owner: np.ndarray, segment: np.ndarray,
             touched: np.ndarray, users: np.ndarray) -> np.ndarray:
        """An entry of ``segment`` per request, click-count-weighted, redrawn while ``owner``
        touched it (the caller excluded owners that touched the whole segment)."""
        low, high = self.base[segment], self.base[segment] + self.total[segment]
        entry = np.searchsorted(self.cum, rng.integers(low, high), side="right")
        todo = np.arange(len(owner))
        redraws = 0
        while True:
            todo = todo[_isin_sorted(touched, owner[todo] * self.n_items + self.item[entry[todo]])]
            if not len(todo):
                return entry
            if redraws == MAX_REDRAWS:
                raise ConversionError(f"user {users[owner[todo[0]]]}: no untouched item found in {MAX_REDRAWS} draws")
            redraws += 1
            entry[todo] = np.searchsorted(self.cum, rng.integers(low[todo], high[todo]), side="right")


def _isin_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``keys`` in the sorted, non-empty ``sorted_keys``."""
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys
