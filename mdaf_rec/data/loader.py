"""The batch loader: Parquet split -> :class:`~mdaf_rec.data.batch.Batch`, sharded over ranks and workers.

Order of one epoch (see ``docs/data.md``, "Vocabularies and loading"):

* The unit of reading is a Parquet row group (:class:`RowGroup`, "block"). Without ``shuffle`` the rows
  come in split order (files in name order, rows in file order). With ``shuffle`` the blocks are permuted
  (seeded by ``(seed, epoch)``), grouped in that order into shuffle windows of at least
  ``shuffle_rows`` rows, and the rows of each window permuted (seeded by ``(seed, epoch, window)``).
* That row stream is cut into GLOBAL batches of ``batch_size`` rows. Rank ``r`` of ``world_size``
  ``W`` gets the contiguous slice ``[r * b, (r + 1) * b)`` (``b = batch_size / W``) of every global
  batch, so one step of W processes sees exactly the rows of one 1-process step, and every row is
  read by exactly one rank per epoch.
* The last partial global batch (``m < batch_size`` rows) is dropped with ``drop_last``; otherwise
  it is split as evenly as possible (the first ``m % W`` ranks get one row more), so every rank
  has the same number of batches. No rank ever gets a 0-row batch (its mean loss would be NaN, and
  mamba-ssm's CUDA kernels refuse an empty grid): a last batch of fewer rows than ranks
  (``0 < m < W``) joins the batch before it (one global batch of ``batch_size + m`` rows, one step
  fewer), and a split of fewer rows than ranks is refused (:class:`~mdaf_rec.errors.UserError`).
* With ``num_workers = K > 0`` worker ``k`` builds global batches ``start_batch + k``,
  ``start_batch + k + K``, ...; torch's DataLoader returns them round-robin, i.e. in exactly the
  order of ``num_workers = 0``. Each worker reads the blocks its batches touch.
* ``start_batch`` resumes mid-epoch: the skipped batches are neither read nor built.

Every block read is validated (:mod:`mdaf_rec.data.validate`) and raw ids are mapped through the
vocabularies; histories are truncated to the most recent ``max_history`` ids with vectorised
offset arithmetic on the Arrow list offsets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mdaf_rec.data.batch import Batch, build_batch
from mdaf_rec.data.dataset import Dataset, ParquetFile, open_parquet
from mdaf_rec.data.schema import LABEL, TIMESTAMP
from mdaf_rec.data.validate import ColumnRules, validate
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.errors import UserError
from mdaf_rec.features import TIME_FIELDS, FeatureSpec
from mdaf_rec.interrupts import raise_if_interrupted, workers_ignore_sigint

logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_ROWS = 524_288


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a split.

    Attributes:
        file: index into the split's files.
        row_group: row group within the file.
        rows: its rows.
        split_row: row number within the split of its first row.
        file_row: row number within its file of its first row.
    """

    file: int
    row_group: int
    rows: int
    split_row: int
    file_row: int


def split_row_groups(dataset: Dataset, split: str) -> List[RowGroup]:
    """The row groups of ``split`` in split order, from the Parquet footers."""
    blocks: List[RowGroup] = []
    split_row = 0
    for f, path in enumerate(dataset.split_files(split)):
        meta = open_parquet(path).metadata
        file_row = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            blocks.append(RowGroup(f, g, rows, split_row, file_row))
            split_row += rows
            file_row += rows
    return blocks


class EpochPlan:
    """The row stream of one epoch (blocks, shuffle windows) and its cut into global batches.

    Args:
        blocks: the split's row groups.
        batch_size: global batch size, divisible by ``world_size``.
        world_size: number of ranks.
        shuffle: permute blocks and rows (else split order).
        seed, epoch: seed the permutations.
        shuffle_rows: minimum rows of a shuffle window.
        drop_last: drop the last partial global batch (else: its own batch, or, with fewer rows than
            ranks, part of the batch before it).
    """

    def __init__(
        self,
        blocks: Sequence[RowGroup],
        batch_size: int,
        world_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        shuffle_rows: int,
        drop_last: bool,
    ) -> None:
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(
                f"global batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})"
            )
        self.batch_size = batch_size
        self.world_size = world_size
        self._shuffle = shuffle
        self._seed = seed
        self._epoch = epoch
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks)) if shuffle else range(len(blocks))
        self.windows: List[List[RowGroup]] = []
        rows = 0
        for i in order:
            if not self.windows or not shuffle or rows >= shuffle_rows:
                self.windows.append([])
                rows = 0
            self.windows[-1].append(blocks[i])
            rows += blocks[i].rows
        sizes = [sum(b.rows for b in w) for w in self.windows]
        self.window_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_rows = int(self.window_start[-1])
        self.num_full, self.remainder = divmod(self.num_rows, batch_size)
        if self.num_full and 0 < self.remainder < world_size and not drop_last:
            # A last batch of fewer rows than ranks would leave ranks without a row: it joins the batch before it.
            self.num_full, self.remainder = self.num_full - 1, self.remainder + batch_size
        self.num_batches = self.num_full + int(self.remainder > 0 and not drop_last)

    def window_order(self, w: int) -> np.ndarray:
        """Row permutation ``[rows of window w]``: stream position -> row of the concatenated blocks."""
        n = int(self.window_start[w + 1] - self.window_start[w])
        if not self._shuffle:
            return np.arange(n)
        return np.random.default_rng([self._seed, self._epoch, w]).permutation(n)

    def rank_span(self, batch: int, rank: int) -> Tuple[int, int]:
        """Stream positions ``[lo, hi)`` of ``rank``'s slice of global batch ``batch``."""
        size = self.batch_size if batch < self.num_full else self.remainder
        base, extra = divmod(size, self.world_size)
        lo = batch * self.batch_size + rank * base + min(rank, extra)
        return lo, lo + base + int(rank < extra)

    def windows_of(self, lo: int, hi: int) -> range:
        """Windows overlapping stream positions ``[lo, hi)`` (the one holding ``lo`` if empty)."""
        last_window = len(self.windows) - 1
        first = min(max(int(np.searchsorted(self.window_start, lo, side="right")) - 1, 0), last_window)
        end = int(np.searchsorted(self.window_start, hi, side="left"))
        return range(first, min(max(end, first + 1), last_window + 1))


@dataclass(frozen=True)
class Rows:
    """Selected rows as numpy arrays, ready for :class:`BatchConverter`.

    Attributes:
        columns: scalar column -> ``[B]`` (int64 ids / timestamp, int8 label, float32 dense).
        histories: history column -> (lengths ``[B]`` int32, raw ids of all rows concatenated, each
            row's most recent ``max_history`` ids, most recent last).
        row_index: ``[B]`` row numbers within the split.
    """

    columns: Dict[str, np.ndarray]
    histories: Dict[str, Tuple[np.ndarray, np.ndarray]]
    row_index: np.ndarray

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        """The rows of ``parts``, in order."""
        if len(parts) == 1:
            return parts[0]
        return Rows(
            columns={c: np.concatenate([p.columns[c] for p in parts]) for c in parts[0].columns},
            histories={
                c: (np.concatenate([p.histories[c][0] for p in parts]), np.concatenate([p.histories[c][1] for p in parts]))
                for c in parts[0].histories
            },
            row_index=np.concatenate([p.row_index for p in parts]),
        )


class WindowColumns:
    """A validated table held as numpy arrays, for fast row selection (no Arrow ``take``).

    Args:
        table: validated rows (see :func:`~mdaf_rec.data.validate.validate`).
        row_index: ``[N]`` their row numbers within the split.
        history_columns: which columns are ``list<int64>`` histories.
    """

    def __init__(self, table: pa.Table, row_index: np.ndarray, history_columns: Sequence[str]) -> None:
        self.columns: Dict[str, np.ndarray] = {}
        self.histories: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for name in table.column_names:
            arr = table.column(name).combine_chunks()
            if name in history_columns:
                self.histories[name] = (arr.offsets.to_numpy(), arr.values.to_numpy())
            else:
                self.columns[name] = arr.to_numpy()
        self.row_index = row_index

    def select(self, rows: np.ndarray, max_history: int) -> Rows:
        """Rows ``rows [B]`` (positions in this window) with histories truncated to ``max_history``."""
        histories = {}
        for name, (offsets, values) in self.histories.items():
            ends = offsets[rows + 1]
            starts = np.maximum(offsets[rows], ends - max_history)
            lengths = ends - starts
            out_starts = np.cumsum(lengths) - lengths
            gather = np.repeat(starts - out_starts, lengths) + np.arange(int(lengths.sum()))
            histories[name] = (lengths.astype(np.int32), values[gather])
        return Rows({c: a[rows] for c, a in self.columns.items()}, histories, self.row_index[rows])


class BatchConverter:
    """:class:`Rows` -> :class:`Batch`: vocabulary lookups, time fields, KJTs.

    Args:
        spec: the feature spec (keys and columns).
        vocabs: the vocabularies of every non-time static field.
        timezone: IANA zone for ``hour`` (0..23) and ``dayofweek`` (Monday = 0 .. Sunday = 6).
    """

    def __init__(self, spec: FeatureSpec, vocabs: Vocabularies, timezone: str) -> None:
        self.spec = spec
        self.vocabs = vocabs
        self.timezone = timezone

    def __call__(self, rows: Rows) -> Batch:
        n = len(rows.row_index)
        static = self.static_indices(rows)
        spaces = self.spec.sequence_spaces
        histories = [rows.histories[space.history_key] for space in spaces]  # (lengths, raw ids) per space
        dense = [rows.columns[c] for c in self.spec.dense_features]
        user = self.spec.user_column
        user_ids = torch.from_numpy(rows.columns[user]) if user is not None else torch.zeros(n, dtype=torch.int64)
        return build_batch(
            self.spec,
            static_ids=[torch.from_numpy(static[k]) for k in self.spec.static_keys],
            target_ids=[torch.from_numpy(static[space.name]) for space in spaces],
            history_ids=[torch.from_numpy(self.vocabs.lookup(space.name, raw)) for space, (_, raw) in zip(spaces, histories)],
            history_lengths=torch.from_numpy(histories[0][0]) if histories else torch.zeros(n, dtype=torch.int32),
            dense_features=torch.from_numpy(np.stack(dense, axis=1)) if dense else torch.zeros(n, 0),
            labels=torch.from_numpy(rows.columns[LABEL].astype(np.float32)),
            row_index=torch.from_numpy(rows.row_index.astype(np.int64)),
            user_ids=user_ids,
        )

    def static_indices(self, rows: Rows) -> Dict[str, np.ndarray]:
        """Static key -> ``[B]`` int64 table indices."""
        out: Dict[str, np.ndarray] = {}
        time_fields: Dict[str, np.ndarray] = {}
        for field in self.spec.static_fields:
            if field.column in TIME_FIELDS:
                time_fields = time_fields or local_time_fields(rows.columns[TIMESTAMP], self.timezone)
                out[field.name] = time_fields[field.column]
            else:
                out[field.name] = self.vocabs.lookup(field.name, rows.columns[field.column])
        return out


def local_time_fields(timestamp: np.ndarray, timezone: str) -> Dict[str, np.ndarray]:
    """``hour`` (0..23) and ``dayofweek`` (Monday = 0) ``[B]`` int64 of UTC epoch seconds ``[B]``."""
    local = pa.array(timestamp, pa.timestamp("s", tz=timezone))
    return {
        "hour": pc.hour(local).to_numpy().astype(np.int64),
        "dayofweek": pc.day_of_week(local).to_numpy().astype(np.int64),
    }


class BatchLoader:
    """Iterable of :class:`Batch` over one split for one rank (see the module docstring).

    Args:
        dataset: the opened dataset.
        split: ``train``, ``val`` or ``test``.
        spec: feature spec.
        vocabs: vocabularies (built from the training split).
        batch_size: GLOBAL batch size (all ranks together), divisible by ``world_size``.
        rank, world_size: this process's shard.
        shuffle, seed, epoch: seeded per-epoch permutation (see :class:`EpochPlan`).
        drop_last: drop the last partial global batch.
        num_workers: DataLoader worker processes (0 = build batches in this process).
        start_batch: first global batch of the epoch to produce (resume); reset by :meth:`set_epoch`.
        timezone: for hour / day of week; default: the dataset's ``meta.json``, else UTC.
        shuffle_rows: minimum rows of a shuffle window (the shuffle buffer).
        pin_memory: return batches in page-locked memory (for a CUDA device: ``batch.to(device,
            non_blocking=True)`` then copies while the device computes).
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        spec: FeatureSpec,
        vocabs: Vocabularies,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        start_batch: int = 0,
        timezone: Optional[str] = None,
        shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset = dataset
        self.split = split
        self.files = dataset.split_files(split)
        self.blocks = split_row_groups(dataset, split)
        self.converter = BatchConverter(spec, vocabs, dataset.timezone(timezone))
        self.rules = ColumnRules.from_spec(spec)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.shuffle_rows = shuffle_rows
        self.pin_memory = pin_memory
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch (its permutation) and the global batch to start from."""
        self.epoch = epoch
        self.plan = EpochPlan(
            self.blocks, self.batch_size, self.world_size, self.shuffle, self.seed, epoch,
            self.shuffle_rows, self.drop_last,
        )
        if self.plan.num_batches and self.plan.num_rows < self.world_size:
            raise UserError(
                f"{self.dataset.root}: the {self.split} split has {self.plan.num_rows} rows, fewer than the "
                f"{self.world_size} ranks: every rank needs at least one row per batch; run with at most "
                f"{self.plan.num_rows} processes"
            )
        if not 0 <= start_batch <= self.plan.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside [0, {self.plan.num_batches}]")
        self.start_batch = start_batch
        logger.debug(
            "%s %s epoch %d: %d rows, %d windows, %d batches of %d (rank %d/%d), starting at %d",
            self.dataset.root, self.split, epoch, self.plan.num_rows, len(self.plan.windows),
            self.plan.num_batches, self.batch_size, self.rank, self.world_size, start_batch,
        )

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank; ``start_batch`` not subtracted)."""
        return self.plan.num_batches

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            batches = _stoppable_batches(self.worker_batches(0, 1))
        else:
            batches = _stoppable_batches(_worker_batches(DataLoader(_WorkerShards(self), batch_size=None,
                                                                    num_workers=self.num_workers)))
        return map(Batch.pin_memory, batches) if self.pin_memory else batches

    def worker_batches(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """This rank's slices of global batches ``start_batch + worker + j * num_workers``."""
        reader = _WindowReader(self)
        max_history = self.converter.spec.max_history
        for batch in range(self.start_batch + worker, self.plan.num_batches, num_workers):
            lo, hi = self.plan.rank_span(batch, self.rank)
            parts = []
            for w in self.plan.windows_of(lo, hi):
                columns, order = reader.window(w)
                start = int(self.plan.window_start[w])
                local = order[max(lo - start, 0) : max(min(hi - start, len(order)), 0)]
                parts.append(columns.select(local, max_history))
            reader.evict_before(lo)
            yield self.converter(Rows.concat(parts))


class _WindowReader:
    """Reads, validates and caches the shuffle windows a worker needs (oldest evicted first)."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.files: Dict[int, ParquetFile] = {}
        self.cache: Dict[int, Tuple[WindowColumns, np.ndarray]] = {}

    def window(self, w: int) -> Tuple[WindowColumns, np.ndarray]:
        """Window ``w``: its rows (blocks concatenated) and its row order (stream -> row)."""
        if w not in self.cache:
            blocks = self.loader.plan.windows[w]
            table = pa.concat_tables([self._read(b) for b in blocks])
            row_index = np.concatenate([np.arange(b.split_row, b.split_row + b.rows) for b in blocks])
            columns = WindowColumns(table, row_index, self.loader.rules.history_columns)
            self.cache[w] = (columns, self.loader.plan.window_order(w))
        return self.cache[w]

    def evict_before(self, position: int) -> None:
        """Drops windows that end at or before stream ``position``."""
        for w in [w for w in self.cache if self.loader.plan.window_start[w + 1] <= position]:
            del self.cache[w]

    def _read(self, block: RowGroup) -> pa.Table:
        path = self.loader.files[block.file]
        if block.file not in self.files:
            self.files[block.file] = open_parquet(path)
        columns = list(self.loader.rules.columns)
        table = self.files[block.file].read_row_group(block.row_group, columns=columns)
        return validate(table, self.loader.rules, str(path), block.file_row)


class _WorkerShards(IterableDataset):
    """Torch IterableDataset view of a :class:`BatchLoader` for DataLoader workers."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Union[Batch, UserError]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            yield from self.loader.worker_batches(worker, num_workers)
        except UserError as e:
            # Sent as a value: raised here, torch would re-raise it with this worker's traceback in its message.
            yield e


def _stoppable_batches(batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches``; a Ctrl-C that was lost on its way is raised before the next one (:mod:`mdaf_rec.interrupts`)."""
    for batch in batches:
        raise_if_interrupted()
        yield batch


def _worker_batches(loader: DataLoader) -> Iterator[Batch]:
    """The batches of the workers; a :class:`UserError` one of them sent is raised here, its message intact.
    The workers leave Ctrl-C to this process (:func:`~mdaf_rec.interrupts.workers_ignore_sigint`)."""
    with workers_ignore_sigint():
        items = iter(loader)  # starts the workers
    for item in items:
        if isinstance(item, UserError):
            raise item
        yield item
