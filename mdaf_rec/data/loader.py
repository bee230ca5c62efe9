"""The batch loader: Parquet split -> :class:`~mdaf_rec.data.batch.Batch`, sharded over ranks and workers.

Order of one epoch (see ``docs/data.md``, "Vocabularies and loading"):

* The unit of reading is a Parquet row group (:class:`RowGroup`, "block"). Without ``shuffle`` the rows
  come in split order (files in name order, rows in file order). With ``shuffle`` the blocks are permuted
  (seeded by ``(seed, epoch)``), grouped in that order into shuffle windows of at least
  ``shuffle_rows`` rows, and the rows of each window permuted (seeded by ``(seed, epoch, window)``).
* ``sharding`` (:data:`SHARDING_MODES`) decides which rows of that stream a rank reads:

  - ``own_share`` (default, scales): the stream of N rows is cut into W contiguous shares (rank ``r``
    gets ``N // W`` rows, one more if ``r < N % W``; a block on a share boundary is cut there), and
    rank ``r`` reads only the blocks its share touches (about ``N / W`` rows). Windows never cross a
    share boundary. Rank r's batch ``j`` is rows ``[j * b, (j + 1) * b)`` of its share
    (``b = batch_size / W``); the last is smaller. Every row is trained on by exactly one rank once per epoch.
  - ``every_rank_reads_all`` (exact, for tests and small data): the stream is cut into GLOBAL batches
    of ``batch_size`` rows and rank ``r`` gets the contiguous slice ``[r * b, (r + 1) * b)`` of every
    global batch, so one step of W processes sees exactly the rows of one 1-process step; each rank
    reads (and every worker reads) the blocks of the whole split.

  With W = 1 both modes give the same batches.
* Step counts are equal on every rank (collectives): ``ceil(N / batch_size)`` steps, the last one (the last
  partial GLOBAL batch, ``m = N % batch_size`` rows) dropped with ``drop_last``, else split as evenly as
  possible (the first ``m % W`` ranks get one row more). No rank ever gets a 0-row batch (its mean loss
  would be NaN, and mamba-ssm's CUDA kernels refuse an empty grid): a last batch of fewer rows than ranks
  (``0 < m < W``) joins the batch before it (one global batch of ``batch_size + m`` rows, one step fewer),
  and a split of fewer rows than ranks is refused (:class:`~mdaf_rec.errors.UserError`). In ``own_share``
  mode this is exactly what the shares' sizes leave for their last batch, so every row is still trained on
  once per epoch.
* With ``num_workers = K > 0`` worker ``k`` builds the batches at positions ``start_batch + k``,
  ``start_batch + k + K``, ...; torch's DataLoader returns them round-robin. In ``every_rank_reads_all``
  mode position ``p`` is global batch ``p`` (the order of ``num_workers = 0``; every worker reads the
  blocks its batches touch, i.e. nearly all). In ``own_share`` mode the rank's batches are cut into
  ``K`` contiguous lanes and position ``p`` is batch ``p // K`` of lane ``p % K``, so each worker reads
  only its lane (about ``N / (W K)`` rows); the batches' rows do not depend on ``K``, their order does.
* ``start_batch`` resumes mid-epoch: the skipped positions are neither read nor built.

Every block read is validated (:mod:`mdaf_rec.data.validate`) unless the split was validated already
(``validated=True``: the training job validates once, see :func:`~mdaf_rec.data.validated.validate_once`;
columns are then only cast) and raw ids are mapped through the vocabularies (under ``features.id_mapping:
managed`` they go into the KJTs as they are: the model remaps them); histories are truncated to
the most recent ``max_history`` ids with vectorised offset arithmetic on the Arrow list offsets.

``oov_dropout`` (``train.oov_dropout``, training loaders only) replaces a fraction of the rows' ids of named static
fields by the OOV index in the static KJT (the sequence KJT keeps them); which rows is :func:`oov_dropout_mask`, a
hash of ``(seed, epoch, field, row)``, so it does not depend on the batch size, the ranks, the workers or a resume.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mdaf_rec.data.batch import Batch, build_batch
from mdaf_rec.data.dataset import Dataset, ParquetFile, open_parquet
from mdaf_rec.data.schema import LABEL, TIMESTAMP
from mdaf_rec.data.validate import ColumnRules, cast_canonical, validate
from mdaf_rec.data.vocab import Vocabularies, stable_hash
from mdaf_rec.errors import UserError
from mdaf_rec.features import OOV_INDEX, TIME_FIELDS, FeatureSpec
from mdaf_rec.interrupts import raise_if_interrupted, workers_ignore_sigint
from mdaf_rec.registry import DATA_SHARDING

logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_ROWS = 524_288
SHARDING_MODES = DATA_SHARDING  # see the module docstring; data.sharding
OWN_SHARE, EVERY_RANK_READS_ALL = SHARDING_MODES


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


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of one block: the whole block, unless a share boundary cuts it."""

    block: RowGroup
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


def even_part(total: int, parts: int, part: int) -> Tuple[int, int]:
    """Start and size of part ``part`` of ``total`` items cut into ``parts`` contiguous parts as evenly as
    possible (the first ``total % parts`` parts one larger)."""
    base, extra = divmod(total, parts)
    return part * base + min(part, extra), base + int(part < extra)


class EpochPlan:
    """One rank's row stream of one epoch (blocks, shuffle windows) and its cut into batches.

    Args:
        blocks: the split's row groups.
        batch_size: global batch size, divisible by ``world_size``.
        world_size: number of ranks.
        shuffle: permute blocks and rows (else split order).
        seed, epoch: seed the permutations.
        shuffle_rows: minimum rows of a shuffle window.
        drop_last: drop the last partial global batch (else: its own batch, or, with fewer rows than
            ranks, part of the batch before it).
        rank: the rank whose stream this is.
        sharding: one of :data:`SHARDING_MODES`. ``own_share``: the stream is the rank's share of the
            split; ``every_rank_reads_all``: the stream is the whole split (every rank's plan is the same).
        lanes: ``own_share`` only: contiguous runs of batches the positions interleave (one per
            DataLoader worker, see :meth:`batch_at`).
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
        *,
        rank: int = 0,
        sharding: str = EVERY_RANK_READS_ALL,
        lanes: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(
                f"global batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})"
            )
        if sharding not in SHARDING_MODES:
            raise ValueError(f"sharding {sharding!r} is not one of {list(SHARDING_MODES)}")
        if lanes < 1 or (lanes > 1 and sharding != OWN_SHARE):
            raise ValueError(f"lanes ({lanes}) must be >= 1, and 1 unless sharding is {OWN_SHARE!r}")
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.sharded = sharding == OWN_SHARE
        self.lanes = lanes
        self._shuffle = shuffle
        self._seed = seed
        self._epoch = epoch
        self.num_rows = sum(b.rows for b in blocks)
        self.num_full, self.remainder = divmod(self.num_rows, batch_size)
        if self.num_full and 0 < self.remainder < world_size and not drop_last:
            # A last batch of fewer rows than ranks would leave ranks without a row: it joins the batch before it.
            self.num_full, self.remainder = self.num_full - 1, self.remainder + batch_size
        self.num_batches = self.num_full + int(self.remainder > 0 and not drop_last)
        mine = rank if self.sharded else 0
        sizes = [self.share_rows(r) for r in range(world_size)] if self.sharded else [self.num_rows]
        bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks)) if shuffle else range(len(blocks))
        # Windows of the whole stream, cut at share boundaries; this rank keeps its own share's, numbered
        # as in the whole stream (so the row permutations with W = 1 are the same in both modes).
        self.windows: List[List[Piece]] = []
        self._window_ids: List[int] = []
        window, rows, share, position = -1, 0, -1, 0
        for i in order:
            block = blocks[i]
            lo = 0
            while lo < block.rows:
                piece_share = int(np.searchsorted(bounds, position, side="right")) - 1
                hi = min(block.rows, lo + int(bounds[piece_share + 1]) - position)
                if piece_share != share or not shuffle or rows >= shuffle_rows:
                    window, rows, share = window + 1, 0, piece_share
                    if share == mine:
                        self.windows.append([])
                        self._window_ids.append(window)
                if share == mine:
                    self.windows[-1].append(Piece(block, lo, hi))
                rows += hi - lo
                position += hi - lo
                lo = hi
        window_sizes = [sum(p.rows for p in w) for w in self.windows]
        self.window_start = np.concatenate([[0], np.cumsum(window_sizes, dtype=np.int64)])

    def part_of_batch(self, batch: int, rank: int) -> Tuple[int, int]:
        """Offset and size of ``rank``'s part of global batch ``batch`` (``batch_size / W`` rows, the last
        partial global batch split by :func:`even_part`)."""
        size = self.batch_size if batch < self.num_full else self.remainder
        return even_part(size, self.world_size, rank)

    def share_rows(self, rank: int) -> int:
        """Rows of ``rank`` over the epoch: its parts of every global batch (the last one included even
        with ``drop_last``, so the shares cover the split)."""
        last = self.part_of_batch(self.num_full, rank)[1] if self.remainder else 0
        return self.num_full * (self.batch_size // self.world_size) + last

    def rank_span(self, batch: int) -> Tuple[int, int]:
        """Stream positions ``[lo, hi)`` of this rank's part of global batch ``batch``."""
        offset, size = self.part_of_batch(batch, self.rank)
        lo = batch * (self.batch_size // self.world_size) if self.sharded else batch * self.batch_size + offset
        return lo, lo + size

    def batch_at(self, position: int) -> int:
        """The batch at output ``position`` of the epoch: batch ``position // lanes`` of lane ``position % lanes``
        (lane ``k`` is the ``k``-th of ``lanes`` contiguous runs of the batches, :func:`even_part`)."""
        if self.lanes == 1:
            return position
        return even_part(self.num_batches, self.lanes, position % self.lanes)[0] + position // self.lanes

    def window_order(self, w: int) -> np.ndarray:
        """Row permutation ``[rows of window w]``: stream position -> row of the concatenated pieces."""
        n = int(self.window_start[w + 1] - self.window_start[w])
        if not self._shuffle:
            return np.arange(n)
        return np.random.default_rng([self._seed, self._epoch, self._window_ids[w]]).permutation(n)

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
        history_columns: which columns are ``list<int64>`` (histories and own-length lists).
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
        vocabs: the vocabularies of every non-time static field; ``None`` under ``managed`` (``spec.managed``):
            raw ids go into the KJTs.
        timezone: IANA zone for ``hour`` (0..23) and ``dayofweek`` (Monday = 0 .. Sunday = 6).
    """

    def __init__(self, spec: FeatureSpec, vocabs: Optional[Vocabularies], timezone: str) -> None:
        if (vocabs is None) != spec.managed:
            raise ValueError("vocabularies are needed exactly when ids are not managed (features.id_mapping)")
        self.spec = spec
        self.vocabs = vocabs
        self.timezone = timezone

    def ids(self, space: str, raw: np.ndarray) -> np.ndarray:
        """Raw ids ``[N]`` of ``space`` -> ``[N]`` int64 table indices, or the raw ids themselves under ``managed``."""
        if self.vocabs is None:
            return np.asarray(raw, dtype=np.int64)
        return self.vocabs.lookup(space, raw)

    def __call__(self, rows: Rows, to_oov: Optional[Mapping[str, np.ndarray]] = None) -> Batch:
        """
        Args:
            rows: the rows of one batch.
            to_oov: static field -> ``[B]`` bool: rows whose id of that field the static KJT gets as the OOV index
                (the sequence KJT's target keeps its id).
        """
        n = len(rows.row_index)
        static = self.static_indices(rows)
        spaces = self.spec.sequence_spaces
        static_ids = {k: np.where(to_oov[k], OOV_INDEX, v) if to_oov and k in to_oov else v for k, v in static.items()}
        histories = [rows.histories[space.history_key] for space in spaces]  # (lengths, raw ids) per space
        dense = [rows.columns[c] for c in self.spec.dense_features]
        user = self.spec.user_column
        user_ids = torch.from_numpy(rows.columns[user]) if user is not None else torch.zeros(n, dtype=torch.int64)
        return build_batch(
            self.spec,
            static_ids=[torch.from_numpy(static_ids[k]) for k in self.spec.static_keys],
            target_ids=[torch.from_numpy(static[space.name]) for space in spaces],
            history_ids=[torch.from_numpy(self.ids(space.name, raw)) for space, (_, raw) in zip(spaces, histories)],
            history_lengths=torch.from_numpy(histories[0][0]) if histories else torch.zeros(n, dtype=torch.int32),
            list_ids=[torch.from_numpy(self.ids(space, rows.histories[column][1]))
                      for column, space in self.spec.pooled_lists],
            list_lengths=[torch.from_numpy(rows.histories[column][0]) for column, _ in self.spec.pooled_lists],
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
                out[field.name] = self.ids(field.name, rows.columns[field.column])
        return out


def oov_dropout_mask(row_index: np.ndarray, rate: float, seed: int, epoch: int, field: str) -> np.ndarray:
    """``[B]`` bool: the rows (split row numbers ``row_index [B]``) whose id of static ``field`` is dropped to OOV in
    ``epoch``: a SplitMix64 hash of ``(seed, epoch, field, row)`` mapped to ``[0, 1)``, below ``rate``."""
    key = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + zlib.crc32(field.encode()) * 0x94D049BB133111EB)
    # stable_hash adds splitmix64's increment itself; uint64 arithmetic wraps around
    x = stable_hash(row_index.astype(np.uint64) + np.uint64((key - 0x9E3779B97F4A7C15) % 2**64))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < rate


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
        vocabs: vocabularies (built from the training split); ``None`` under ``managed``.
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
        sharding: which rows this rank reads, one of :data:`SHARDING_MODES` (``data.sharding``).
        validated: the split's files passed :func:`~mdaf_rec.data.validate.validate_once` for these
            columns: blocks are only cast to the canonical types, not checked again.
        oov_dropout: static field -> fraction of rows whose id the static KJT gets as OOV (``train.oov_dropout``;
            training loaders only), drawn by :func:`oov_dropout_mask`.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        spec: FeatureSpec,
        vocabs: Optional[Vocabularies],
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
        sharding: str = OWN_SHARE,
        validated: bool = False,
        oov_dropout: Optional[Mapping[str, float]] = None,
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
        self.sharding = sharding
        self.validated = validated
        self.oov_dropout = {k: r for k, r in (oov_dropout or {}).items() if r > 0}
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch (its permutation) and the global batch to start from."""
        self.epoch = epoch
        self.plan = EpochPlan(
            self.blocks, self.batch_size, self.world_size, self.shuffle, self.seed, epoch,
            self.shuffle_rows, self.drop_last, rank=self.rank, sharding=self.sharding,
            lanes=max(self.num_workers, 1) if self.sharding == OWN_SHARE else 1,
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
            "%s %s epoch %d (%s): %d rows, %d windows here, %d batches of %d (rank %d/%d), starting at %d",
            self.dataset.root, self.split, epoch, self.sharding, self.plan.num_rows, len(self.plan.windows),
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
        """This rank's parts of the batches at positions ``start_batch + worker + j * num_workers``."""
        reader = _WindowReader(self)
        max_history = self.converter.spec.max_history
        for position in range(self.start_batch + worker, self.plan.num_batches, num_workers):
            lo, hi = self.plan.rank_span(self.plan.batch_at(position))
            parts = []
            for w in self.plan.windows_of(lo, hi):
                columns, order = reader.window(w)
                start = int(self.plan.window_start[w])
                local = order[max(lo - start, 0) : max(min(hi - start, len(order)), 0)]
                parts.append(columns.select(local, max_history))
            reader.evict_before(lo)
            rows = Rows.concat(parts)
            to_oov = {field: oov_dropout_mask(rows.row_index, rate, self.seed, self.epoch, field)
                      for field, rate in self.oov_dropout.items()}
            yield self.converter(rows, to_oov)


class _WindowReader:
    """Reads, validates and caches the shuffle windows a worker needs (oldest evicted first)."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.files: Dict[int, ParquetFile] = {}
        self.cache: Dict[int, Tuple[WindowColumns, np.ndarray]] = {}

    def window(self, w: int) -> Tuple[WindowColumns, np.ndarray]:
        """Window ``w``: its rows (pieces concatenated) and its row order (stream -> row)."""
        if w not in self.cache:
            pieces = self.loader.plan.windows[w]
            table = pa.concat_tables([self._read(p) for p in pieces])
            row_index = np.concatenate([np.arange(p.block.split_row + p.lo, p.block.split_row + p.hi) for p in pieces])
            columns = WindowColumns(table, row_index, self.loader.rules.all_lists)
            self.cache[w] = (columns, self.loader.plan.window_order(w))
        return self.cache[w]

    def evict_before(self, position: int) -> None:
        """Drops windows that end at or before stream ``position``."""
        for w in [w for w in self.cache if self.loader.plan.window_start[w + 1] <= position]:
            del self.cache[w]

    def _read(self, piece: Piece) -> pa.Table:
        block = piece.block
        path = self.loader.files[block.file]
        if block.file not in self.files:
            self.files[block.file] = open_parquet(path)
        columns = list(self.loader.rules.columns)
        table = self.files[block.file].read_row_group(block.row_group, columns=columns)
        if piece.lo or piece.hi < block.rows:
            table = table.slice(piece.lo, piece.hi - piece.lo)
        if self.loader.validated:
            return cast_canonical(table, self.loader.rules)
        return validate(table, self.loader.rules, str(path), block.file_row + piece.lo)


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
