"""Validation of Arrow data against the canonical schema (see :mod:`mdaf_rec.data.schema`).

:func:`validate` checks one table or record batch, casts integer columns of other widths to the
canonical types (losslessly; an overflowing value is an error) and raises :class:`DataError` naming
the file, the column and the row (row number within the file) of the first problem. All checks are
vectorised ``pyarrow.compute`` kernels. A training job validates each file once
(:mod:`mdaf_rec.data.validated`); its loaders then only cast (:func:`cast_canonical`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdaf_rec.data.dataset import Dataset, open_parquet
from mdaf_rec.data.schema import (
    CATEGORY_HISTORY, CATEGORY_ID, ITEM_HISTORY, ITEM_ID, LABEL, SPLITS, TIMESTAMP, USER_ID,
)
from mdaf_rec.errors import UserError
from mdaf_rec.features import TIME_FIELDS, FeatureSpec

ArrowData = Union[pa.Table, pa.RecordBatch]
Column = Union[pa.Array, pa.ChunkedArray]
#: Plausible ``timestamp`` values, unix seconds: [1990-01-01, 2100-01-01). Any time after 1970-02-17 in
#: milliseconds (or finer) lies above it, so a column in another unit is never taken for seconds; garbage such as
#: 2**62 (it overflowed the local-time arithmetic of ``hour`` / ``dayofweek`` mid-epoch) is refused too.
TIMESTAMP_RANGE = (631_152_000, 4_102_444_800)
# Only uint64 values can overflow int64; compare them as uint64.
_INT64_MAX = pa.scalar(np.iinfo(np.int64).max, pa.uint64())


class DataError(UserError, ValueError):
    """Input data violates the schema; the message names the file, column and row."""


@dataclass(frozen=True)
class ColumnRules:
    """Which columns to check, and how.

    Attributes:
        id_columns: scalar integer id columns: non-null, >= 0, cast to int64.
        history_columns: ``list<integer>`` columns: non-null lists of non-null ids >= 0, cast to
            ``list<int64>``, all of equal length within a row.
        dense_columns: numeric columns: non-null, finite, cast to float32.
        list_columns: ``list<integer>`` columns of their own length (``features.pooled_lists``): checked and cast
            as histories, without the equal-length rule.
    """

    id_columns: Tuple[str, ...]
    history_columns: Tuple[str, ...]
    dense_columns: Tuple[str, ...] = ()
    list_columns: Tuple[str, ...] = ()

    @staticmethod
    def build(
        extra_ids: Sequence[str] = (), extra_histories: Sequence[str] = (), dense: Sequence[str] = (),
        lists: Sequence[str] = (),
    ) -> "ColumnRules":
        """The canonical columns plus configured extra id / history / dense / own-length list columns."""
        ids = tuple(dict.fromkeys((USER_ID, ITEM_ID, CATEGORY_ID, *extra_ids)))
        histories = tuple(dict.fromkeys((ITEM_HISTORY, CATEGORY_HISTORY, *extra_histories)))
        return ColumnRules(id_columns=ids, history_columns=histories, dense_columns=tuple(dense),
                           list_columns=tuple(lists))

    @staticmethod
    def from_spec(spec: FeatureSpec) -> "ColumnRules":
        """The canonical columns plus every column the feature spec reads."""
        return ColumnRules.build(
            extra_ids=[f.column for f in spec.static_fields if f.column not in TIME_FIELDS],
            extra_histories=[s.history_key for s in spec.sequence_spaces],
            dense=spec.dense_features,
            lists=spec.pooled_list_keys,
        )

    @property
    def columns(self) -> Tuple[str, ...]:
        """Every column these rules check (and the loader reads)."""
        return (*self.id_columns, TIMESTAMP, LABEL, *self.history_columns, *self.dense_columns, *self.list_columns)

    @property
    def all_lists(self) -> Tuple[str, ...]:
        """Every ``list<int64>`` column: the histories, then the own-length lists (the loader truncates them)."""
        return (*self.history_columns, *self.list_columns)


def validate(
    data: ArrowData, rules: ColumnRules, source: str, row_offset: int = 0, columns: Optional[Sequence[str]] = None
) -> pa.Table:
    """Checks and casts ``data``.

    Args:
        data: a table or record batch (extra columns pass through untouched).
        rules: what to check.
        source: file name for messages.
        row_offset: row number of ``data``'s first row within ``source``.
        columns: check only these columns of ``rules`` (default: all of them).
    Returns:
        A table with the checked columns cast to canonical types (int64 ids and timestamp, int8
        label, ``list<int64>`` histories, float32 dense). Raises :class:`DataError` otherwise.
    """
    wanted = tuple(columns) if columns is not None else rules.columns
    missing = [c for c in wanted if c not in data.schema.names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing} (has {data.schema.names})")
    where = _Where(source, row_offset)
    out: Dict[str, Column] = {}
    for name in wanted:
        column = data.column(name)
        if name in rules.all_lists:
            out[name] = _check_history(column, name, where)
        elif name in rules.dense_columns:
            out[name] = _check_dense(column, name, where)
        elif name == LABEL:
            out[name] = _check_label(column, where)
        elif name == TIMESTAMP:
            out[name] = _check_timestamp(column, where)
        else:
            out[name] = _check_integer(column, name, where, non_negative=name in rules.id_columns)
    histories = [out[c] for c in wanted if c in rules.history_columns]
    _check_equal_lengths(histories, [c for c in wanted if c in rules.history_columns], where)
    names = data.schema.names
    return pa.table({n: out.get(n, data.column(n)) for n in names})


def cast_canonical(data: ArrowData, rules: ColumnRules) -> pa.Table:
    """``data`` with the columns of ``rules`` cast to the canonical types (as :func:`validate` returns them),
    unchecked: for data that passed :func:`validate` before (see :mod:`mdaf_rec.data.validated`)."""
    def canonical(name: str) -> pa.DataType:
        if name in rules.all_lists:
            return pa.list_(pa.int64())
        if name in rules.dense_columns:
            return pa.float32()
        return pa.int8() if name == LABEL else pa.int64()

    columns = set(rules.columns)
    return pa.table({n: data.column(n).cast(canonical(n)) if n in columns else data.column(n)
                     for n in data.schema.names})


@dataclass(frozen=True)
class _Where:
    source: str
    row_offset: int

    def error(self, column: str, mask: Column, problem: str) -> DataError:
        row = int(np.flatnonzero(_bools(mask))[0]) + self.row_offset
        return DataError(f"{self.source}: column {column!r}, row {row}: {problem}")

    def type_error(self, column: str, arr: Column, expected: str) -> DataError:
        return DataError(f"{self.source}: column {column!r} has type {arr.type}, expected {expected}")


def _bools(mask: Column) -> np.ndarray:
    return mask.fill_null(True).to_numpy(zero_copy_only=False)


def _cast(arr: Column, target: pa.DataType, column: str, where: _Where) -> Column:
    """Lossless cast of an integer (or list of integer) array; an overflowing value is an error."""
    if arr.type == target:
        return arr
    try:
        return arr.cast(target, safe=True)
    except pa.ArrowInvalid:
        if pa.types.is_integer(target):
            raise where.error(column, pc.greater(arr, _INT64_MAX), "value does not fit int64") from None
        too_big = pc.greater(pc.list_flatten(arr), _INT64_MAX)
        raise where.error(column, _rows_of(arr, too_big), "value does not fit int64") from None


def _rows_of(arr: Column, value_mask: Column) -> pa.Array:
    """Row mask of a list column from a mask over its flattened values (error path only)."""
    if isinstance(arr, pa.ChunkedArray):  # parent indices restart in every chunk
        arr = arr.combine_chunks()
    rows = pc.list_parent_indices(arr).to_numpy()
    mask = np.zeros(len(arr), dtype=bool)
    mask[rows[_bools(value_mask)]] = True
    return pa.array(mask)


def _check_integer(arr: Column, column: str, where: _Where, non_negative: bool) -> Column:
    if not pa.types.is_integer(arr.type):
        raise where.type_error(column, arr, "an integer type")
    arr = _cast(arr, pa.int64(), column, where)
    if arr.null_count:
        raise where.error(column, pc.is_null(arr), "null value")
    if non_negative and len(arr) and pc.min(arr).as_py() < 0:
        raise where.error(column, pc.less(arr, 0), "negative id")
    return arr


def _check_timestamp(arr: Column, where: _Where) -> Column:
    """Unix seconds within :data:`TIMESTAMP_RANGE`; a value outside is refused, naming the unit it looks like."""
    arr = _check_integer(arr, TIMESTAMP, where, non_negative=False)
    if not len(arr):
        return arr
    low, high = TIMESTAMP_RANGE
    bounds = pc.min_max(arr)
    if bounds["min"].as_py() < low or bounds["max"].as_py() >= high:
        outside = pc.or_(pc.less(arr, low), pc.greater_equal(arr, high))
        value = int(pc.filter(arr, outside)[0].as_py())
        raise where.error(TIMESTAMP, outside, f"{value} is not unix seconds of 1990..2099{_unit_hint(value)}")
    return arr


def _unit_hint(value: int) -> str:
    """``"; it looks like milliseconds (2017-11-25 ...): divide by 1000"`` when a unit fits, else ``""``."""
    low, high = TIMESTAMP_RANGE
    for unit, factor in (("milliseconds", 10**3), ("microseconds", 10**6), ("nanoseconds", 10**9)):
        if low <= value // factor < high:
            when = datetime.fromtimestamp(value // factor, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f"; it looks like {unit} ({when}): divide the column by {factor}"
    return ""


def _check_label(arr: Column, where: _Where) -> Column:
    if not (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)):
        raise where.type_error(LABEL, arr, "an integer type holding 0/1")
    if pa.types.is_integer(arr.type):
        arr = _check_integer(arr, LABEL, where, non_negative=False)
        if len(arr) and (pc.min(arr).as_py() < 0 or pc.max(arr).as_py() > 1):
            raise where.error(LABEL, pc.invert(pc.is_in(arr, pa.array([0, 1]))), "label is not 0 or 1")
    elif arr.null_count:
        raise where.error(LABEL, pc.is_null(arr), "null value")
    return arr.cast(pa.int8())


def _check_history(arr: Column, column: str, where: _Where) -> Column:
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or not pa.types.is_integer(
        arr.type.value_type
    ):
        raise where.type_error(column, arr, "list<int64>")
    if arr.null_count:
        raise where.error(column, pc.is_null(arr), "null history (use an empty list)")
    arr = _cast(arr, pa.list_(pa.int64()), column, where)
    values = pc.list_flatten(arr)
    if values.null_count or (len(values) and pc.min(values).as_py() < 0):
        bad = pc.or_kleene(pc.is_null(values), pc.less(values, 0))
        raise where.error(column, _rows_of(arr, bad), "null or negative id in history")
    return arr


def _check_dense(arr: Column, column: str, where: _Where) -> Column:
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise where.type_error(column, arr, "a numeric type")
    if arr.null_count:
        raise where.error(column, pc.is_null(arr), "null value")
    arr = arr.cast(pa.float32())
    finite = pc.is_finite(arr)
    if not pc.all(finite).as_py():
        raise where.error(column, pc.invert(finite), "non-finite value")
    return arr


def _check_equal_lengths(histories: Sequence[Column], names: Sequence[str], where: _Where) -> None:
    if len(histories) < 2:
        return
    first = pc.list_value_length(histories[0])
    for arr, name in zip(histories[1:], names[1:]):
        differs = pc.not_equal(pc.list_value_length(arr), first)
        if pc.any(differs).as_py():
            raise where.error(name, differs, f"history length differs from {names[0]!r}")


def check_timestamp_ranges(dataset: Dataset) -> None:
    """Refuses a dataset whose ``timestamp`` leaves :data:`TIMESTAMP_RANGE` in any split, before anything is built
    on it: from the Parquet footers' statistics; only a row group without them, or outside the range, is read
    (and :func:`validate` names the file, the row and the unit the value looks like)."""
    dataset.require_columns([TIMESTAMP])
    rules = ColumnRules.build()
    for split in SPLITS:
        for path in dataset.split_files(split):
            file = open_parquet(path)
            row = 0
            for g in range(file.metadata.num_row_groups):
                group = file.metadata.row_group(g)
                if not _in_range(group):
                    validate(file.read_row_group(g, columns=[TIMESTAMP]), rules, str(path), row, [TIMESTAMP])
                row += group.num_rows


def _in_range(group: pq.RowGroupMetaData) -> bool:
    """Whether a row group's ``timestamp`` statistics show integers within :data:`TIMESTAMP_RANGE`."""
    for c in range(group.num_columns):
        chunk = group.column(c)
        if chunk.path_in_schema == TIMESTAMP:
            stats = chunk.statistics
            if stats is None or not stats.has_min_max or stats.null_count:
                return False
            low, high = stats.min, stats.max
            if not (isinstance(low, int) and isinstance(high, int)):
                return False
            return TIMESTAMP_RANGE[0] <= low and high < TIMESTAMP_RANGE[1]
    return False
