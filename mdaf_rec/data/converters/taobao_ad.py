"""Taobao ad display/click data (Alimama, Tianchi 56) -> canonical dataset.

Two inputs, detected from ``--raw``:

* the raw Alimama folder: ``raw_sample.csv`` (impressions), ``ad_feature.csv``, ``user_profile.csv``.
  item = adgroup_id, category = its cate_id, label = clk; history = the ads (and categories) the user
  clicked strictly before the impression, most recent last; split by local date (Asia/Shanghai):
  last day test, the day before val, the rest train. With ``--behavior-log behavior_log.csv``
  (``user,time_stamp,btag,cate,brand``, 723M rows in the real data) every row also gets, per
  behaviour type ``pv`` / ``cart`` / ``fav`` / ``buy``, the categories and brands of the user's last
  ``--max-history`` such behaviours strictly before the impression (:data:`BEHAVIOR_HISTORIES`).
  Joins and histories run out of core (:mod:`.engine`).
* FuxiCTR's preprocessed TaobaoAd CSVs (``train*.csv``, ``valid*.csv``, ``test*.csv`` with a
  ``click_sequence`` column): the files are the splits, ``time_stamp`` is a local date-time, and the
  history is the last ``--max-history`` entries of ``click_sequence`` (times unknown there).

Extra sparse columns: ``pid`` (stable_hash64 of the string), ``campaign_id``, ``customer``, ``brand``
(blank / NULL -> 0) and the user-profile codes stored as code + 1 (0 = blank or no profile); dense
column ``price`` (blank -> 0.0).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mdaf_rec.data.converters.common import (
    ID_PATTERN,
    MISSING_ID,
    BadRows,
    Block,
    ConversionError,
    add_common_arguments,
    add_local_date_split_arguments,
    cli_options,
    local_days,
    read_csv,
    read_header,
    require_file,
    source_files,
    stable_hash64,
    take_ranges,
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
from mdaf_rec.data.schema import CATEGORY_HISTORY, CATEGORY_ID, ITEM_HISTORY, ITEM_ID, LABEL, SPLITS, TIMESTAMP, USER_ID

logger = logging.getLogger(__name__)

AD_IDS = ("campaign_id", "customer", "brand")
PROFILE_CODES = (
    "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level", "shopping_level",
    "occupation", "new_user_class_level",
)
EXTRA_SPARSE = ("pid", *AD_IDS, *PROFILE_CODES)
DENSE = ("price",)
SEQUENCE_COLUMN = "click_sequence"
SEQUENCE_SEPARATOR = "^"
FUXICTR_SPLIT_PREFIXES = ("train", "valid", "test")
BTAGS = ("pv", "cart", "fav", "buy")
# --behavior-log: extra list column -> (btag, behavior_log.csv column it gathers)
BEHAVIOR_HISTORIES: Dict[str, Tuple[str, str]] = {
    f"{btag}_{column}_history": (btag, column) for btag in BTAGS for column in ("cate", "brand")
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``taobao-ad`` options."""
    add_common_arguments(
        parser, raw_help="folder with raw_sample.csv, ad_feature.csv, user_profile.csv (Alimama), or "
        "FuxiCTR's train/valid/test CSVs", timezone="Asia/Shanghai",
    )
    add_local_date_split_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument(
        "--behavior-log", type=Path, default=None, metavar="FILE",
        help="Alimama behavior_log.csv: add per-behaviour (pv/cart/fav/buy) category and brand histories "
        "strictly before each impression (raw Alimama folder only)",
    )


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Converts ``args.raw`` into ``args.out``; returns the meta written."""
    if (args.raw / "raw_sample.csv").is_file():
        return _run_alimama(args)
    if args.behavior_log is not None:
        raise ConversionError(f"--behavior-log: only with the raw Alimama folder (no raw_sample.csv in {args.raw})")
    return _run_fuxictr(args, _fuxictr_files(args.raw))


# --------------------------------------------------------------------------------------------------
# Shared column parsing
# --------------------------------------------------------------------------------------------------


def _pid(block: Block) -> np.ndarray:
    """``pid`` strings (``430548_1007``) as stable_hash64 ids."""
    block.reject("pid", block.missing("pid"), "missing value")
    return stable_hash64(block.strings("pid"))


def _ad_columns(block: Block) -> Dict[str, np.ndarray]:
    """``cate_id`` and the ad ids (blank / NULL -> 0) and ``price`` (blank -> 0.0)."""
    columns = {name: block.ids(name, missing=MISSING_ID) for name in ("cate_id", *AD_IDS)}
    columns["price"] = block.floats("price", missing=0.0).astype(np.float32)
    return columns


def _profile_columns(block: Block) -> Dict[str, np.ndarray]:
    """User-profile codes + 1, with 0 for a blank code."""
    return {name: block.ids(name, missing=MISSING_ID - 1) + 1 for name in PROFILE_CODES}


def _meta(args: argparse.Namespace, protocol: str, sources: List[Path], rule: Dict[str, Any],
          filled: Mapping[str, int]) -> Dict[str, Any]:
    return {
        "format": "taobao-ad",
        "protocol": protocol,
        "timezone": args.tz,
        "source": source_files(sources),
        "split": rule,
        "missing_values": "ad ids and brand: 0; user-profile columns hold code + 1, 0 = blank or no "
        "profile; price: 0.0; pid: stable_hash64 of the string",
        "filled": filled,
        "options": cli_options(args),
    }


# --------------------------------------------------------------------------------------------------
# Raw Alimama files
# --------------------------------------------------------------------------------------------------


def _run_alimama(args: argparse.Namespace) -> Dict[str, Any]:
    bad = BadRows(args.on_bad_row)
    paths = [args.raw / name for name in ("raw_sample.csv", "ad_feature.csv", "user_profile.csv")]
    log = require_file(args.behavior_log) if args.behavior_log is not None else None
    with open_engine(args) as engine:
        if not engine.stage("impressions", _read_impressions(paths[0], bad, args)):
            raise ConversionError(f"{paths[0]}: no impressions")
        ad_columns = ("cate_id", *AD_IDS, "price")
        _stage_table(engine, "ads", paths[1], "adgroup_id", ad_columns, _ad_columns, bad)
        _stage_table(engine, "profiles", paths[2], "userid", PROFILE_CODES, _profile_columns, bad)
        # the behaviour log (the largest CSV) is parsed before the impressions table is made, so that Python's
        # parsing memory and DuckDB's tables are not held at once (the peak was their sum)
        if log is not None and not engine.stage("behaviors", _read_behavior_log(log, bad, args)):
            raise ConversionError(f"{log}: no rows")
        ads = ", ".join(f"coalesce(a.{c}, {0.0 if c == 'price' else MISSING_ID}) AS "
                        f"{CATEGORY_ID if c == 'cate_id' else c}" for c in ad_columns)
        profiles = ", ".join(f"coalesce(u.{c}, {MISSING_ID}) AS {c}" for c in PROFILE_CODES)
        engine.create(
            "imp", f"SELECT i.{SEQ}, i.{USER_ID}, i.{ITEM_ID}, i.{TIMESTAMP}, i.{LABEL}, i.pid, i.day, "
            f"{ads}, {profiles}, a.adgroup_id IS NULL AS ad_missing, u.userid IS NULL AS user_missing "
            f"FROM impressions i LEFT JOIN ads a ON i.{ITEM_ID} = a.adgroup_id "
            f"LEFT JOIN profiles u ON i.{USER_ID} = u.userid"
        )
        n, clicks, ad_missing, user_missing = engine.one(
            f"SELECT count(*), sum({LABEL}), count_if(ad_missing), count_if(user_missing) FROM imp")
        logger.info("%d impressions, %d clicks; building histories", n, clicks)
        split, rule = local_date_split(engine, "imp", args.val_days, args.test_days)
        groups: List[Tuple[str, Mapping[str, str]]] = [(
            f"(SELECT {SEQ}, {USER_ID}, {TIMESTAMP}, {ITEM_ID}, {CATEGORY_ID} FROM imp WHERE {LABEL} = 1)",
            {ITEM_HISTORY: ITEM_ID, CATEGORY_HISTORY: CATEGORY_ID},
        )]
        extra_histories: Dict[str, str] = {}
        if log is not None:
            for b, btag in enumerate(BTAGS):
                columns = {name: column for name, (tag, column) in BEHAVIOR_HISTORIES.items() if tag == btag}
                groups.append((f"(SELECT {SEQ}, {USER_ID}, {TIMESTAMP}, cate, brand FROM behaviors "
                               f"WHERE btag = {b})", columns))
            extra_histories = {
                name: f"{'category' if column == 'cate' else 'brand'} ids of the user's last {args.max_history} "
                f"'{tag}' behaviours in behavior_log.csv strictly before the impression, most recent last"
                for name, (tag, column) in BEHAVIOR_HISTORIES.items()
            }
        add_histories(engine, "rows", "imp", groups, args.max_history, extra={"split": split})
        protocol = (
            "one row per impression of raw_sample.csv; label = clk; history = the user's last "
            f"{args.max_history} clicked ads strictly before the impression, most recent last"
            + ("; per behaviour type of behavior_log.csv, the categories and brands of the user's last "
               f"{args.max_history} such behaviours strictly before the impression" if log is not None else "")
        )
        filled = {
            "impressions whose ad is missing from ad_feature.csv (ad columns 0)": int(ad_missing),
            "impressions whose user is missing from user_profile.csv (profile columns 0)": int(user_missing),
        }
        return write_dataset(
            engine, args.out, "rows", order_by=f"{USER_ID}, {TIMESTAMP}, {SEQ}", extra_sparse=EXTRA_SPARSE,
            dense=DENSE, meta=_meta(args, protocol, paths + ([log] if log else []), rule, filled), bad=bad,
            extra_histories=extra_histories,
        )


def _read_impressions(path: Path, bad: BadRows, args: argparse.Namespace) -> Iterator[Dict[str, np.ndarray]]:
    names = ["user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"]
    rows = 0
    for block in read_csv(path, names, bad):
        columns = {USER_ID: block.ids("user"), TIMESTAMP: block.ids("time_stamp")}
        block.in_date_range("time_stamp", columns[TIMESTAMP], args.tz, args.date_range)
        columns[ITEM_ID] = block.ids("adgroup_id")
        columns["pid"] = _pid(block)
        nonclk, columns[LABEL] = block.binary("nonclk"), block.binary("clk")
        block.reject("nonclk", nonclk + columns[LABEL] != 1, "nonclk + clk != 1")
        kept = block.kept(columns)
        kept["day"] = local_days(kept[TIMESTAMP], args.tz)
        rows += len(kept[LABEL])
        logger.info("%s: %d rows read", path.name, rows)
        yield kept


def _read_behavior_log(path: Path, bad: BadRows, args: argparse.Namespace) -> Iterator[Dict[str, np.ndarray]]:
    """Blocks of behavior_log.csv: user, time_stamp, btag (index into :data:`BTAGS`), cate and brand
    (blank / NULL -> 0)."""
    rows = 0
    for block in read_csv(path, ["user", "time_stamp", "btag", "cate", "brand"], bad):
        columns = {USER_ID: block.ids("user"), TIMESTAMP: block.ids("time_stamp")}
        btag = pc.index_in(block.strings("btag"), pa.array(BTAGS))
        block.reject("btag", btag.is_null().to_numpy(zero_copy_only=False), f"not one of {BTAGS}")
        columns["btag"] = btag.fill_null(0).to_numpy().astype(np.int8)
        columns["cate"] = block.ids("cate", missing=MISSING_ID)
        columns["brand"] = block.ids("brand", missing=MISSING_ID)
        kept = block.kept(columns)
        rows += len(kept[USER_ID])
        logger.info("%s: %d rows read", path.name, rows)
        yield kept


def _stage_table(engine: Engine, name: str, path: Path, key: str, names: Tuple[str, ...],
                 parse: Callable[[Block], Dict[str, np.ndarray]], bad: BadRows) -> None:
    """Stages a side table keyed by ``key`` as the view ``name`` (a duplicate key keeps its first line)."""
    def blocks() -> Iterator[Dict[str, np.ndarray]]:
        for block in read_csv(path, [key, *names], bad):
            columns = {key: block.ids(key), **parse(block)}
            yield block.kept(columns)

    if not engine.stage(f"{name}_raw", blocks()):
        raise ConversionError(f"{path}: no rows")
    engine.create(name, f"SELECT {SEQ}, {key}, {', '.join(names)} FROM (SELECT *, row_number() OVER "
                  f"(PARTITION BY {key} ORDER BY {SEQ}) AS _first FROM {name}_raw) WHERE _first = 1")


# --------------------------------------------------------------------------------------------------
# FuxiCTR's preprocessed CSVs
# --------------------------------------------------------------------------------------------------


def _fuxictr_files(raw: Path) -> List[Path]:
    """The train / valid / test CSVs of a FuxiCTR TaobaoAd folder, checked by their header."""
    if not raw.is_dir():
        raise ConversionError(f"{raw}: not a folder")
    files = []
    for prefix in FUXICTR_SPLIT_PREFIXES:
        found = sorted(raw.glob(f"{prefix}*.csv"))
        if len(found) != 1:
            raise ConversionError(
                f"{raw}: neither raw_sample.csv (Alimama) nor one {prefix}*.csv (FuxiCTR) found "
                f"(found {[f.name for f in found]})"
            )
        if SEQUENCE_COLUMN not in read_header(found[0]):
            raise ConversionError(f"{found[0]}: line 1: missing column {SEQUENCE_COLUMN!r} (not FuxiCTR TaobaoAd)")
        files.append(found[0])
    return files


def _run_fuxictr(args: argparse.Namespace, paths: List[Path]) -> Dict[str, Any]:
    bad = BadRows(args.on_bad_row)
    with open_engine(args) as engine:
        if not engine.stage("fux", (block for code, path in enumerate(paths)
                                    for block in _read_fuxictr(path, code, bad, args))):
            raise ConversionError(f"{paths[0]}: no rows")
        for code, path in enumerate(paths):
            if not engine.one(f"SELECT count(*) FROM fux WHERE split = {code}")[0]:
                raise ConversionError(f"{path}: no rows")
        # history categories from the ad table of all three files (an ad's first row)
        engine.create("ads", f"SELECT {ITEM_ID}, min_by({CATEGORY_ID}, {SEQ}) AS {CATEGORY_ID} FROM fux "
                      f"GROUP BY {ITEM_ID}")
        engine.create(
            "hist", f"SELECT h.{SEQ}, {engine.ordered_list(f'coalesce(a.{CATEGORY_ID}, {MISSING_ID})', 'h.pos')} "
            f"AS {CATEGORY_HISTORY}, count_if(a.{ITEM_ID} IS NULL) AS unknown FROM "
            f"(SELECT {SEQ}, {engine.unnest(ITEM_HISTORY, 'item', 'pos')} FROM fux) h "
            f"LEFT JOIN ads a ON h.item = a.{ITEM_ID} GROUP BY h.{SEQ}"
        )
        engine.create("rows", f"SELECT f.*, coalesce(h.{CATEGORY_HISTORY}, {engine.empty_list()}) AS "
                      f"{CATEGORY_HISTORY} FROM fux f LEFT JOIN hist h ON f.{SEQ} = h.{SEQ}")
        unknown = engine.one("SELECT coalesce(sum(unknown), 0) FROM hist")[0]
        protocol = (
            "FuxiCTR's preprocessed TaobaoAd: one row per CSV row, splits as given (valid -> val); history "
            f"= the last {args.max_history} entries of click_sequence (assumed oldest first; their times are "
            "not in the files, so 'strictly earlier than timestamp' is as FuxiCTR built it, unchecked); "
            "history categories from the ad table of all three files"
        )
        rule = {"rule": "as given", **{s: p.name for s, p in zip(SPLITS, paths)}}
        filled = {"history items with no known category (category 0)": int(unknown)}
        return write_dataset(
            engine, args.out, "rows", order_by=SEQ, extra_sparse=EXTRA_SPARSE, dense=DENSE,
            meta=_meta(args, protocol, paths, rule, filled), bad=bad,
        )


def _read_fuxictr(path: Path, code: int, bad: BadRows, args: argparse.Namespace) -> Iterator[Dict[str, Any]]:
    """Blocks of one split file: the columns, ``split`` and ``item_history`` (the last ``--max-history``
    entries of ``click_sequence``)."""
    names = ["clk", "time_stamp", "userid", "adgroup_id", "pid", "cate_id", *AD_IDS, "price", *PROFILE_CODES,
             SEQUENCE_COLUMN]
    for block in read_csv(path, names, bad):
        columns = {LABEL: block.binary("clk"), TIMESTAMP: block.datetimes("time_stamp", args.tz)}
        block.in_date_range("time_stamp", columns[TIMESTAMP], args.tz, args.date_range)
        columns.update({USER_ID: block.ids("userid"), ITEM_ID: block.ids("adgroup_id"), "pid": _pid(block)})
        columns.update(_ad_columns(block))
        columns[CATEGORY_ID] = columns.pop("cate_id")
        columns.update(_profile_columns(block))
        row_lengths, values = _sequences(block, args.max_history)
        columns["split"] = np.full(len(block), code, np.int8)
        kept: Dict[str, Any] = block.kept(columns)
        lengths = row_lengths[block.keep]
        offsets = np.zeros(len(lengths) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        kept[ITEM_HISTORY] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[np.repeat(block.keep, row_lengths)]))
        yield kept


def _sequences(block: Block, max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """``click_sequence`` (``^``-joined ids, blank = empty) -> (lengths, last ``max_len`` ids per row)."""
    lists = pc.split_pattern(block.strings(SEQUENCE_COLUMN), SEQUENCE_SEPARATOR)
    offsets = lists.offsets.to_numpy().astype(np.int64)
    elements = pc.utf8_trim_whitespace(lists.values)
    ok = pc.match_substring_regex(elements, ID_PATTERN).to_numpy(zero_copy_only=False)
    empty = block.missing(SEQUENCE_COLUMN)
    element_row = np.repeat(np.arange(len(block)), np.diff(offsets))
    bad_rows = np.zeros(len(block), bool)
    bad_rows[element_row[~ok & ~empty[element_row]]] = True
    block.reject(SEQUENCE_COLUMN, bad_rows, f"not a {SEQUENCE_SEPARATOR!r}-joined list of non-negative ids")
    ends = np.where(empty, offsets[:-1], offsets[1:])
    tail_offsets, index = take_ranges(np.maximum(offsets[:-1], ends - max_len), ends)
    values = pc.cast(pc.if_else(ok, elements, "0").take(index), "int64").to_numpy()
    return np.diff(tail_offsets), values
