"""Pieces shared by the raw-data converters: the command line, CSV reading with a bad-row policy and
the per-row parsing helpers.

Every converter reads its raw files block-wise into numpy columns (:func:`read_csv` and
:class:`Block`, one block of about 4 MB at a time) and stages them for the out-of-core engine
(:mod:`.engine`), which joins, splits, builds the histories and negatives in SQL and writes the
canonical Parquet splits plus ``meta.json``. The layout is documented in ``docs/data.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from mdaf_rec.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 50
# Reserved id written where a raw id is missing (blank, ``NULL``, an ad without features...).
MISSING_ID = 0
# 4 MB: a block and the columns parsed from it take ~10x its size while parsed, and pyarrow's streaming CSV
# reader reads up to 32 blocks ahead on its I/O thread (its background queue), so the reader holds up to
# ~32 x this (16 MB blocks: up to 0.5 GB of raw bytes, next to DuckDB's memory)
CSV_BLOCK_BYTES = 4 << 20
_SECONDS_PER_DAY = 86_400
# Ids are at most 18 digits so that every accepted value fits int64 (Block.ids checks the same without a regex).
ID_PATTERN = r"^[0-9]{1,18}$"
_ID_DIGITS = 18
_NEGATIVE_PATTERN = r"^-[0-9]+$"
_FLOAT_PATTERN = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_NULL_STRINGS = ("", "NULL", "null", "NaN", "nan")


class ConversionError(UserError, ValueError):
    """Raw input is malformed; the message names the file, the line and the column."""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, raw_help: str, timezone: str) -> None:
    """Adds ``--raw``, ``--out``, ``--max-history``, ``--on-bad-row`` and ``--tz``."""
    parser.add_argument("--raw", type=Path, required=True, help=raw_help)
    parser.add_argument("--out", type=Path, required=True, help="output dataset folder (created)")
    parser.add_argument(
        "--max-history", type=non_negative_int, default=DEFAULT_MAX_HISTORY,
        help="keep the most recent N history entries (default %(default)s)",
    )
    parser.add_argument(
        "--on-bad-row", choices=("error", "drop"), default="error",
        help="malformed rows: stop with an error naming file, line and column (default), or drop "
        "them, counted per reason in meta.json",
    )
    parser.add_argument(
        "--tz", type=timezone_name, default=timezone, help="IANA time zone of the data (default %(default)s)"
    )


def add_local_date_split_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--val-days``, ``--test-days`` and ``--date-range`` (see :func:`split_by_local_date`)."""
    parser.add_argument(
        "--val-days", type=non_negative_int, default=1, help="local days before the test days (default 1)"
    )
    parser.add_argument("--test-days", type=positive_int, default=1, help="last local days of the data (default 1)")
    parser.add_argument(
        "--date-range", type=parse_date_range, default=None, metavar="FIRST:LAST",
        help="keep only rows whose local date is in [FIRST, LAST] (YYYY-MM-DD); others are bad rows "
        "(reason 'date out of range'), so they need --on-bad-row drop",
    )


def non_negative_int(text: str) -> int:
    """An ``int`` >= 0 (argparse type)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An ``int`` >= 1 (argparse type)."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def timezone_name(text: str) -> str:
    """An IANA time zone name known to :mod:`zoneinfo` (argparse type)."""
    try:
        ZoneInfo(text)
    except (ValueError, ZoneInfoNotFoundError):
        raise argparse.ArgumentTypeError(f"unknown time zone {text!r}") from None
    return text


def parse_date_range(text: str) -> Tuple[dt.date, dt.date]:
    """Parses ``FIRST:LAST`` (ISO dates, inclusive)."""
    try:
        first, last = (dt.date.fromisoformat(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST as YYYY-MM-DD:YYYY-MM-DD, got {text!r}") from None
    if first > last:
        raise argparse.ArgumentTypeError(f"date range {text!r} is empty")
    return first, last


# --------------------------------------------------------------------------------------------------
# Bad rows
# --------------------------------------------------------------------------------------------------


class BadRows:
    """The ``--on-bad-row`` policy: raise on the first bad row, or drop and count per reason.

    Args:
        policy: ``error`` or ``drop``.
    """

    def __init__(self, policy: str) -> None:
        if policy not in ("error", "drop"):
            raise ValueError(f"unknown bad-row policy {policy!r}")
        self.policy = policy
        self.counts: Counter = Counter()

    def reject(self, path: Path, column: str, reason: str, lines: np.ndarray, example: str = "") -> None:
        """Handles bad rows at 1-based ``lines`` of ``path``: raises, or counts them as dropped."""
        if len(lines) == 0:
            return
        shown = f" (value {example!r})" if example else ""
        if self.policy == "error":
            more = f"; {len(lines) - 1} more such rows" if len(lines) > 1 else ""
            raise ConversionError(
                f"{path}: line {int(lines[0])}: column {column!r}: {reason}{shown}{more} "
                "(use --on-bad-row drop to drop such rows)"
            )
        self.counts[f"{path.name}: {column}: {reason}"] += len(lines)
        logger.warning(
            "%s: dropped %d rows, column %r: %s, first at line %d%s", path, len(lines), column, reason,
            int(lines[0]), shown,
        )


# --------------------------------------------------------------------------------------------------
# CSV reading
# --------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One block of CSV rows, all columns as trimmed strings, parsed column by column.

    Parsing a column checks every row; a bad row is rejected through :class:`BadRows` (raise, or
    mark it dropped in ``keep``). Call :meth:`rows` last to get the kept rows of the parsed columns.

    Attributes:
        path: the file.
        lines: ``[n]`` 1-based line number of each row.
        columns: column name -> string array.
        bad: the bad-row policy.
        keep: ``[n]`` rows not rejected so far.
    """

    path: Path
    lines: np.ndarray
    columns: Dict[str, pa.Array]
    bad: BadRows
    keep: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.keep = np.ones(len(self.lines), dtype=bool)

    def __len__(self) -> int:
        return len(self.lines)

    def strings(self, name: str) -> pa.Array:
        """The raw (trimmed) strings of ``name``."""
        return self.columns[name]

    def reject(self, name: str, mask: np.ndarray, reason: str) -> None:
        """Rejects the still-kept rows in ``mask`` (each dropped row is counted once)."""
        rows = np.flatnonzero(mask & self.keep)
        if len(rows):
            example = self.columns[name][int(rows[0])].as_py() if name in self.columns else ""
            self.bad.reject(self.path, name, reason, self.lines[rows], example)
            self.keep[rows] = False

    def missing(self, name: str) -> np.ndarray:
        """Rows whose value is blank or a null marker (``NULL``, ``NaN``)."""
        return _mask(pc.is_in(self.columns[name], pa.array(_NULL_STRINGS)))

    def ids(self, name: str, missing: Optional[int] = None) -> np.ndarray:
        """A non-negative integer id column as int64.

        Args:
            missing: value for blank / ``NULL`` cells; ``None`` makes them bad rows.
        """
        s = self.columns[name]
        # ID_PATTERN, as a byte scan (a regex costs ~5x more on the 100M-row files)
        ok = _mask(pc.and_(pc.ascii_is_decimal(s), pc.less_equal(pc.binary_length(s), _ID_DIGITS)))
        if not ok.all():
            self.reject(name, ~ok & _mask(pc.match_substring_regex(s, _NEGATIVE_PATTERN)), "negative id")
        return self._numbers(name, ok, pa.int64(), missing, "not a non-negative integer")

    def binary(self, name: str) -> np.ndarray:
        """A 0/1 column (label, flag) as int8."""
        s = self.columns[name]
        ok = _mask(pc.is_in(s, pa.array(["0", "1"])))
        self.reject(name, ~ok, "value not in {0, 1}")
        return _mask(pc.equal(s, "1")).astype(np.int8)

    def floats(self, name: str, missing: Optional[float] = None) -> np.ndarray:
        """A float column as float64; ``missing`` fills blank cells (``None``: they are bad rows)."""
        ok = _mask(pc.match_substring_regex(self.columns[name], _FLOAT_PATTERN))
        return self._numbers(name, ok, pa.float64(), missing, "not a number")

    def _numbers(self, name: str, ok: np.ndarray, type_: pa.DataType, missing: Any, reason: str) -> np.ndarray:
        """Parses ``name``: blank cells get ``missing`` (``None``: bad rows), other cells not ``ok`` (the
        format's check) are bad rows (``reason``)."""
        s = self.columns[name]
        empty = self.missing(name)
        if missing is None:
            self.reject(name, empty, "missing value")
        self.reject(name, ~ok & ~empty, reason)
        valid = s if ok.all() else pc.if_else(pa.array(ok), s, "0")
        values = pc.cast(valid, type_).to_numpy(zero_copy_only=False, writable=True)
        if missing is not None:
            values[empty] = missing
        return values

    def datetimes(self, name: str, timezone: str, fmt: str = "%Y-%m-%d %H:%M:%S") -> np.ndarray:
        """Local date-time strings (``fmt``, in ``timezone``) as unix seconds (int64)."""
        s = self.columns[name]
        parsed = pc.strptime(s, format=fmt, unit="s", error_is_null=True)
        self.reject(name, _mask(pc.is_null(parsed)), f"not a date-time {fmt!r}")
        parsed = pc.fill_null(parsed, pa.scalar(0, pa.timestamp("s")))
        return pc.assume_timezone(parsed, timezone=timezone, ambiguous="earliest", nonexistent="earliest") \
            .cast(pa.int64()).to_numpy()

    def in_date_range(self, name: str, seconds: np.ndarray, timezone: str,
                      date_range: Optional[Tuple[dt.date, dt.date]]) -> None:
        """Rejects rows whose local date (of ``seconds``) is outside ``date_range`` (if given)."""
        if date_range is None:
            return
        days = local_days(seconds, timezone)
        first, last = (d.toordinal() - _EPOCH_ORDINAL for d in date_range)
        self.reject(name, (days < first) | (days > last), "date out of range")

    def rows(self, *arrays: np.ndarray) -> List[np.ndarray]:
        """The kept rows of each array."""
        if self.keep.all():
            return list(arrays)
        return [a[self.keep] for a in arrays]

    def kept(self, columns: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The kept rows of each named column."""
        return dict(zip(columns, self.rows(*columns.values())))


def _mask(arr: pa.Array) -> np.ndarray:
    return arr.fill_null(False).to_numpy(zero_copy_only=False)


def require_file(path: Path) -> Path:
    """``path`` if it is a file, else a :class:`ConversionError`."""
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    return path


def read_header(path: Path, delimiter: str = ",", encoding: str = "utf8") -> List[str]:
    """The column names of ``path``'s first line, stripped of surrounding spaces (and a BOM)."""
    with open(require_file(path), "rb") as f:
        raw = f.readline()
    try:
        first = raw.decode(encoding).rstrip("\r\n").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise ConversionError(
            f"{path}: line 1: the header is not valid {encoding} text ({e.reason} at byte {e.start})"
        ) from None
    return [name.strip().strip('"').strip() for name in first.split(delimiter)]


def read_csv(
    path: Path,
    columns: Sequence[str],
    bad: BadRows,
    *,
    names: Optional[Sequence[str]] = None,
    delimiter: str = ",",
    encoding: str = "utf8",
    quoting: bool = True,
    block_size: int = CSV_BLOCK_BYTES,
) -> Iterator[Block]:
    """Streams ``path`` in blocks of about ``block_size`` bytes, as string columns.

    Args:
        columns: the columns to read; a column missing from the header is an error naming the file.
        bad: the bad-row policy; a row with a wrong number of fields is a bad row (column ``*``).
        names: column names of a file without header; ``None`` reads them from the first line
            (names are stripped, so ``"level "`` matches ``level``).
        quoting: whether ``"`` quotes fields.

    Yields:
        :class:`Block` objects whose ``lines`` are the rows' physical line numbers (blank lines are
        bad rows, so numbering stays exact).

    Two more kinds of bad rows: a row whose text in a read column is not valid UTF-8 (reason
    ``not valid UTF-8``), and the last line when the file does not end with a line end (reason
    ``last line has no line end (file cut short?)``): a file cut mid-number would otherwise give a
    wrong value that still parses.
    """
    require_file(path)
    header = names is None
    all_names = read_header(path, delimiter, encoding) if header else list(names)
    for name in columns:
        if name not in all_names:
            raise ConversionError(f"{path}: line 1: missing column {name!r} (columns: {all_names})")
    skipped: List[int] = []
    skipped_reasons: Dict[str, List[Tuple[int, str]]] = {}
    first_error: List[Any] = []

    def on_invalid(row: Any) -> str:
        reason = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        if bad.policy == "error":
            first_error.append((row.number, reason, row.text))
            return "error"
        skipped.append(row.number)
        skipped_reasons.setdefault(reason, []).append((row.number, row.text[:80]))
        return "skip"

    first_line = 1 + int(header)
    done = 0
    last: Optional[Block] = None
    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(
                column_names=all_names, skip_rows=int(header), use_threads=False, block_size=block_size,
                encoding=encoding,
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=delimiter, quote_char='"' if quoting else False, ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            # Bytes, not strings: pyarrow would fail the whole block on one non-UTF-8 byte, naming a row
            # number within the block; :func:`_utf8_block` makes such rows bad rows at their line.
            convert_options=pcsv.ConvertOptions(
                include_columns=list(columns), column_types={c: pa.binary() for c in columns},
                strings_can_be_null=False, quoted_strings_can_be_null=False,
            ),
        )
        for batch in reader:
            n = batch.num_rows
            if n == 0:
                continue
            lines = _physical_lines(np.arange(done, done + n), first_line, skipped)
            done += n
            if last is not None:
                yield last
            last = _utf8_block(path, lines, {c: batch.column(c) for c in columns}, bad)
        if last is not None:
            if not _ends_with_line_end(path) and (not skipped or skipped[-1] < last.lines[-1]):
                at_end = np.zeros(len(last), dtype=bool)
                at_end[-1] = True
                last.reject("*", at_end, "last line has no line end (file cut short?)")
            yield last
        for reason, rows in skipped_reasons.items():
            bad.reject(path, "*", reason, np.array([line for line, _ in rows]), rows[0][1])
    except pa.ArrowInvalid as e:
        if first_error:
            number, reason, text = first_error[0]
            raise ConversionError(
                f"{path}: line {number}: column '*': {reason} (text {text[:80]!r}) "
                "(use --on-bad-row drop to drop such rows)"
            ) from None
        where = f"after line {int(last.lines[-1])}" if last is not None else f"from line {first_line}"
        raise ConversionError(f"{path}: unreadable CSV {where}: {e}") from None


def _utf8_block(path: Path, lines: np.ndarray, raw: Dict[str, pa.Array], bad: BadRows) -> Block:
    """A :class:`Block` of trimmed string columns from byte columns; rows holding bytes that are not
    UTF-8 are rejected (shown with U+FFFD where the bad bytes were)."""
    columns: Dict[str, pa.Array] = {}
    invalid: Dict[str, np.ndarray] = {}
    for name, values in raw.items():
        try:
            text = pc.cast(values, pa.string())
        except pa.ArrowInvalid:  # rare: find the rows in Python
            cells = values.to_pylist()
            invalid[name] = np.array([not _is_utf8(c) for c in cells], dtype=bool)
            text = pa.array([c.decode("utf-8", "replace") for c in cells], pa.string())
        columns[name] = pc.utf8_trim_whitespace(text)
    block = Block(path=path, lines=lines, columns=columns, bad=bad)
    for name, mask in invalid.items():
        block.reject(name, mask, "not valid UTF-8")
    return block


def _is_utf8(cell: bytes) -> bool:
    try:
        cell.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _ends_with_line_end(path: Path) -> bool:
    """Whether ``path`` ends with ``\\n`` or ``\\r`` (an empty file counts as ended)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) in (b"\n", b"\r")


def _physical_lines(kept_index: np.ndarray, first_line: int, skipped: Sequence[int]) -> np.ndarray:
    """Line numbers of the ``kept_index``-th kept rows, given the (sorted) skipped line numbers."""
    if not skipped:
        return kept_index + first_line
    s = np.asarray(skipped, dtype=np.int64)
    kept_before_skip = s - first_line - np.arange(len(s))
    return kept_index + first_line + np.searchsorted(kept_before_skip, kept_index, side="right")


# --------------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------------


def stable_hash64(strings: pa.Array) -> np.ndarray:
    """A stable non-negative int64 per string: the first 8 bytes of BLAKE2b of its UTF-8, >> 1.

    Hashes each distinct value once, so it is cheap for low-cardinality columns such as ``pid``.
    """
    encoded = pc.dictionary_encode(strings)
    uniques = encoded.dictionary.to_pylist()
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") >> 1 for u in uniques],
        dtype=np.int64,
    )
    return hashes[encoded.indices.to_numpy()] if len(uniques) else np.zeros(len(strings), np.int64)


# --------------------------------------------------------------------------------------------------
# Ranges
# --------------------------------------------------------------------------------------------------


def take_ranges(starts: np.ndarray, ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated ranges ``[starts[i], ends[i])``.

    Returns:
        ``(offsets [n + 1], index)``: range ``i`` is ``index[offsets[i]:offsets[i + 1]]``.
    """
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, lengths)
    return offsets, index


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def local_days(seconds: np.ndarray, timezone: str) -> np.ndarray:
    """Local calendar day (days since 1970-01-01) of unix ``seconds`` in ``timezone``.

    The UTC offset is looked up with :mod:`zoneinfo` once per distinct minute (offsets change on
    minute boundaries), so it is exact across daylight-saving changes.
    """
    zone = ZoneInfo(timezone)
    minutes, inverse = np.unique(seconds // 60, return_inverse=True)
    offsets = np.array(
        [dt.datetime.fromtimestamp(int(m) * 60, zone).utcoffset().total_seconds() for m in minutes],
        dtype=np.int64,
    )
    return (seconds + offsets[inverse.reshape(-1)]) // _SECONDS_PER_DAY


def iso_day(day: int) -> str:
    """ISO date of a day number (days since 1970-01-01)."""
    return dt.date.fromordinal(int(day) + _EPOCH_ORDINAL).isoformat()


def parse_fractions(text: str) -> Tuple[float, float, float]:
    """Parses ``train,val,test`` fractions summing to 1."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise argparse.ArgumentTypeError(f"expected train,val,test fractions summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------------


def cli_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The converter's command-line options, JSON-ready, for ``meta.json``."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, (Path, dt.date)) else value

    return {k: plain(v) for k, v in vars(args).items() if not callable(v)}


def source_files(paths: Sequence[Path]) -> List[Dict[str, Any]]:
    """``meta.json`` ``source`` entries: absolute path and size of each raw file."""
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths]
