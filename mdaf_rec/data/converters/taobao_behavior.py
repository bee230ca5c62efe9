"""Taobao UserBehavior (Tianchi 649) -> canonical dataset, the DIN/DIEN protocol.

Input: one header-less CSV ``user_id,item_id,category_id,behavior,timestamp`` with behavior in
``pv`` / ``cart`` / ``fav`` / ``buy``. Each click (``pv``) is a positive (label 1) followed by
``--negatives`` N negatives at the same timestamp: items the user never touched (any behavior),
drawn with replacement with probability proportional to their click count, each with its own
category (that of its first click in the file). History = the user's clicks strictly before the
target's timestamp, most recent last. Split by local date (Asia/Shanghai): last day test, the day
before val, the rest train. Rows = clicks x (1 + N); same ``--seed`` -> identical output.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``taobao-behavior`` options."""
    add_common_arguments(parser, raw_help="UserBehavior.csv, or a folder holding one CSV", timezone="Asia/Shanghai")
    add_local_date_split_arguments(parser)
    parser.add_argument("--negatives", type=non_negative_int, default=1, help="negatives per click (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="negative sampling seed (default 0)")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Converts ``args.raw`` into ``args.out``; returns the meta written."""
    path = _raw_file(args.raw)
    bad = BadRows(args.on_bad_row)
    user, item, category, behavior, ts = _read(path, bad, args)
    click = behavior == CLICK
    if not click.any():
        raise ConversionError(f"{path}: no clicks (behavior 'pv')")
    pool = _click_pool(item[click], category[click])
    order = np.flatnonzero(click)[np.lexsort((ts[click], user[click]))]
    pos_user, pos_item, pos_category, pos_ts = user[order], item[order], category[order], ts[order]
    logger.info("%d events, %d clicks of %d users; sampling %d negatives per click",
                len(ts), len(order), len(np.unique(pos_user)), args.negatives)
    neg_item, neg_category = _sample_negatives(user, item, pos_user, pool, args)
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
            "timestamp, items the user never touched, drawn click-count-weighted with replacement "
            f"(seed {args.seed}); history = the user's last {args.max_history} clicks strictly before "
            "the timestamp, most recent last"
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


def _click_pool(click_item: np.ndarray, click_category: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clicked items (sorted), their categories (of their first click in file order) and click counts."""
    clicked, first, counts = np.unique(click_item, return_index=True, return_counts=True)
    return clicked, click_category[first], counts


def _sample_negatives(
    user: np.ndarray, item: np.ndarray, pos_user: np.ndarray,
    pool: Tuple[np.ndarray, np.ndarray, np.ndarray], args: argparse.Namespace,
) -> Tuple[np.ndarray, np.ndarray]:
    """``[clicks, N]`` negative items and their categories (see the module docstring)."""
    clicked, clicked_category, counts = pool
    shape = (len(pos_user), args.negatives)
    users = np.unique(user)
    items = np.unique(item)
    touched = np.unique(np.searchsorted(users, user) * len(items) + np.searchsorted(items, item))
    owner = np.repeat(np.searchsorted(users, pos_user) * len(items), args.negatives)
    clicked_rank = np.searchsorted(items, clicked)
    rng = np.random.default_rng(args.seed)
    p = counts / counts.sum()
    draw = rng.choice(len(clicked), size=len(owner), p=p)
    todo = np.arange(len(owner))
    redraws = 0
    while len(todo):
        if redraws == MAX_REDRAWS:
            worst = pos_user[todo[0] // args.negatives]
            raise ConversionError(f"user {worst}: no untouched item found in {MAX_REDRAWS} draws")
        redraws += 1
        keys = owner[todo] + clicked_rank[draw[todo]]
        pos = np.minimum(np.searchsorted(touched, keys), len(touched) - 1)
        todo = todo[touched[pos] == keys]
        draw[todo] = rng.choice(len(clicked), size=len(todo), p=p)
    return clicked[draw].reshape(shape), clicked_category[draw].reshape(shape)
