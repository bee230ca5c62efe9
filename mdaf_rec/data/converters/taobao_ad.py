"""Taobao ad display/click data (Alimama, Tianchi 56) -> canonical dataset.

Two inputs, detected from ``--raw``:

* the raw Alimama folder: ``raw_sample.csv`` (impressions), ``ad_feature.csv``, ``user_profile.csv``.
  item = adgroup_id, category = its cate_id, label = clk; history = the ads (and categories) the user
  clicked strictly before the impression, most recent last; split by local date (Asia/Shanghai):
  last day test, the day before val, the rest train. ``raw_sample.csv`` (26M rows) is streamed in
  blocks into int64 numpy columns; peak memory is about 6 GB (see ``docs/data.md``).
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
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pyarrow.compute as pc

from mdaf_rec.data.converters.common import (
    ID_PATTERN,
    MISSING_ID,
    BadRows,
    Block,
    ConversionError,
    Impressions,
    add_common_arguments,
    add_local_date_split_arguments,
    build_histories,
    cli_options,
    concat_columns,
    lookup,
    read_csv,
    read_header,
    sort_by_user_time,
    source_files,
    split_by_local_date,
    stable_hash64,
    take_ranges,
    write_dataset,
)
from mdaf_rec.data.schema import CATEGORY_ID, ITEM_ID, LABEL, SPLITS, TIMESTAMP, USER_ID

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``taobao-ad`` options."""
    add_common_arguments(
        parser, raw_help="folder with raw_sample.csv, ad_feature.csv, user_profile.csv (Alimama), or "
        "FuxiCTR's train/valid/test CSVs", timezone="Asia/Shanghai",
    )
    add_local_date_split_arguments(parser)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Converts ``args.raw`` into ``args.out``; returns the meta written."""
    if (args.raw / "raw_sample.csv").is_file():
        return _run_alimama(args)
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
          filled: Dict[str, int]) -> Dict[str, Any]:
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
    columns = _read_impressions(paths[0], bad, args)
    sort_by_user_time(columns)
    n = len(columns[LABEL])
    ad_table = _read_table(paths[1], "adgroup_id", ("cate_id", *AD_IDS, "price"), _ad_columns, bad)
    ads, ad_found = _join(columns[ITEM_ID], ad_table)
    profile_table = _read_table(paths[2], "userid", PROFILE_CODES, _profile_columns, bad)
    users, user_found = _join(columns[USER_ID], profile_table)
    columns[CATEGORY_ID] = ads.pop("cate_id")
    columns.update(ads)
    columns.update(users)
    click = columns[LABEL] == 1
    logger.info("%d impressions, %d clicks; building histories", n, int(click.sum()))
    offsets, (items, categories) = build_histories(
        columns[USER_ID][click], columns[TIMESTAMP][click],
        [columns[ITEM_ID][click], columns[CATEGORY_ID][click]],
        columns[USER_ID], columns[TIMESTAMP], args.max_history,
    )
    split, rule = split_by_local_date(columns[TIMESTAMP], args.tz, args.val_days, args.test_days)
    protocol = (
        "one row per impression of raw_sample.csv; label = clk; history = the user's last "
        f"{args.max_history} clicked ads strictly before the impression, most recent last"
    )
    filled = {
        "impressions whose ad is missing from ad_feature.csv (ad columns 0)": int(n - ad_found.sum()),
        "impressions whose user is missing from user_profile.csv (profile columns 0)": int(n - user_found.sum()),
    }
    return write_dataset(
        args.out, Impressions(columns, offsets, items, categories, split), extra_sparse=EXTRA_SPARSE,
        dense=DENSE, meta=_meta(args, protocol, paths, rule, filled), bad=bad,
    )


def _read_impressions(path: Path, bad: BadRows, args: argparse.Namespace) -> Dict[str, np.ndarray]:
    parts = []
    names = ["user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"]
    for block in read_csv(path, names, bad):
        columns = {USER_ID: block.ids("user"), TIMESTAMP: block.ids("time_stamp")}
        block.in_date_range("time_stamp", columns[TIMESTAMP], args.tz, args.date_range)
        columns[ITEM_ID] = block.ids("adgroup_id")
        columns["pid"] = _pid(block)
        nonclk, columns[LABEL] = block.binary("nonclk"), block.binary("clk")
        block.reject("nonclk", nonclk + columns[LABEL] != 1, "nonclk + clk != 1")
        parts.append(block.kept(columns))
        logger.info("%s: %d rows read", path.name, sum(len(p[LABEL]) for p in parts))
    if not parts:
        raise ConversionError(f"{path}: no impressions")
    return concat_columns(parts)


def _read_table(
    path: Path, key: str, names: Tuple[str, ...], parse: Callable[[Block], Dict[str, np.ndarray]], bad: BadRows
) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """A side table keyed by ``key``: sorted distinct keys (a duplicate keeps its first line) and
    the columns ``names`` as ``parse``d."""
    parts = []
    for block in read_csv(path, [key, *names], bad):
        columns = {key: block.ids(key), **parse(block)}
        parts.append(block.kept(columns))
    if not parts:
        raise ConversionError(f"{path}: no rows")
    table = concat_columns(parts)
    keys, first = np.unique(table.pop(key), return_index=True)
    return keys, {name: values[first] for name, values in table.items()}


def _join(query: np.ndarray, table: Tuple[np.ndarray, Dict[str, np.ndarray]]):
    """Columns of ``table`` for each ``query`` key (missing: 0 / 0.0), and the found mask."""
    keys, columns = table
    out, found = {}, np.zeros(len(query), bool)
    for name, values in columns.items():
        out[name], found = lookup(keys, values, query, 0.0 if values.dtype.kind == "f" else MISSING_ID)
    return out, found


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
    parts = [_read_fuxictr(path, code, bad, args) for code, path in enumerate(paths)]
    columns = concat_columns([p[0] for p in parts])
    offsets = np.zeros(len(columns[LABEL]) + 1, np.int64)
    np.cumsum(np.concatenate([p[1] for p in parts]), out=offsets[1:])
    items = np.concatenate([p[2] for p in parts])
    keys, first = np.unique(columns[ITEM_ID], return_index=True)
    categories, known = lookup(keys, columns[CATEGORY_ID][first], items, MISSING_ID)
    split = columns.pop("split")
    protocol = (
        "FuxiCTR's preprocessed TaobaoAd: one row per CSV row, splits as given (valid -> val); history "
        f"= the last {args.max_history} entries of click_sequence (assumed oldest first; their times are "
        "not in the files, so 'strictly earlier than timestamp' is as FuxiCTR built it, unchecked); "
        "history categories from the ad table of all three files"
    )
    rule = {"rule": "as given", **{s: p.name for s, p in zip(SPLITS, paths)}}
    filled = {"history items with no known category (category 0)": int((~known).sum())}
    return write_dataset(
        args.out, Impressions(columns, offsets, items, categories, split), extra_sparse=EXTRA_SPARSE,
        dense=DENSE, meta=_meta(args, protocol, paths, rule, filled), bad=bad,
    )


def _read_fuxictr(path: Path, code: int, bad: BadRows, args: argparse.Namespace):
    """One split file: (columns incl. ``split``, history lengths, history items)."""
    parts, lengths, items = [], [], []
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
        parts.append(block.kept(columns))
        lengths.append(row_lengths[block.keep])
        items.append(values[np.repeat(block.keep, row_lengths)])
    if not parts:
        raise ConversionError(f"{path}: no rows")
    return concat_columns(parts), np.concatenate(lengths), np.concatenate(items)


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
