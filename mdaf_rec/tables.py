"""Serving tables: an exported model's embedding tables as raw row-major files, written table by table from a
checkpoint and memory-mapped by the server (``docs/serving.md``, "Tables").

One file per table, ``tables/<table>.bin``: ``rows`` rows of ``row_bytes`` bytes each, little-endian, no header;
``feature_spec.json``'s ``tables`` entry gives each file's ``dtype``, ``rows`` and ``dim``:

* ``fp32``: ``dim`` float32 per row (``row_bytes = 4 · dim``);
* ``fp16``: ``dim`` float16 per row (``2 · dim``);
* ``int8``: FBGEMM's fused 8-bit row-wise layout, ``dim`` uint8 codes then the row's float32 ``scale`` and
  float32 ``bias`` (``dim + 8``): ``w ≈ code · scale + bias`` with ``bias`` = the row's minimum and ``scale`` =
  its range / 255 (``torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized`` writes it,
  ``Fused8BitRowwiseQuantizedToFloat`` reads it).

:func:`write_table` never holds a table in memory: it reads the checkpoint's chunk (shard) of the table in blocks
of rows straight from the DCP file (:class:`CheckpointTables`: the tensor's bytes inside DCP's ``torch.save``
record, located without reading them) and writes each block where it belongs. :class:`ServingTables` maps the
files read-only (``np.memmap``) and :meth:`ServingTables.lookup` is the one place where row indices become rows.

Under ``features.id_mapping: managed`` each managed table also has its remapping frozen at the checkpoint, written
by :func:`write_id_map` from the checkpoint's MCH buffers (``id_maps/<table>.ids.bin`` / ``.rows.bin``, sorted
hashed ids and their rows) and applied by :meth:`ServingTables.lookup` to the raw ids before the rows are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Dict, Iterator, List, Mapping, NamedTuple, Tuple

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm: the fused 8-bit row-wise conversions)
import numpy as np
import torch
from torch.distributed.checkpoint.filesystem import _create_file_view
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mdaf_rec import checkpoint as ckpt
from mdaf_rec.checkpoint import CheckpointError
from mdaf_rec.managed_ids import INPUT_HASH_SIZE, ShardLayout, hash_ids, remap, shard_layout, world_segments

TABLE_DTYPES: Tuple[str, ...] = ("fp32", "fp16", "int8")
TABLES_DIR = "tables"
BLOCK_BYTES = 4 << 20  # float32 bytes of one block of rows read from the checkpoint (or converted) at a time


@dataclass(frozen=True)
class TableFile:
    """One table file of a MODEL_DIR (``feature_spec.json``'s ``tables`` entry).

    Attributes:
        file: path relative to MODEL_DIR (``tables/<table>.bin``).
        dtype: ``fp32``, ``fp16`` or ``int8`` (see the module docstring).
        rows: number of rows.
        dim: embedding dimension.
    """

    file: str
    dtype: str
    rows: int
    dim: int

    @property
    def row_bytes(self) -> int:
        return {"fp32": 4 * self.dim, "fp16": 2 * self.dim, "int8": self.dim + 8}[self.dtype]

    def doc(self) -> Dict[str, Any]:
        layout = {
            "fp32": "rows x dim float32, little-endian, row-major",
            "fp16": "rows x dim float16, little-endian, row-major",
            "int8": "rows x (dim + 8) bytes: dim uint8 codes, float32 scale, float32 bias (FBGEMM fused 8-bit "
                    "row-wise); row = code * scale + bias",
        }[self.dtype]
        return {"file": self.file, "dtype": self.dtype, "rows": self.rows, "dim": self.dim,
                "row_bytes": self.row_bytes, "layout": layout}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "TableFile":
        table = cls(str(doc["file"]), str(doc["dtype"]), int(doc["rows"]), int(doc["dim"]))
        if table.dtype not in TABLE_DTYPES:
            raise ValueError(f"table dtype {table.dtype!r} is not one of {TABLE_DTYPES}")
        if table.rows < 1 or table.dim < 1:
            raise ValueError(f"table {table.file}: {table.rows} rows of dim {table.dim}")
        return table


# --------------------------------------------------------------------------------------------------
# Writing: checkpoint -> table files
# --------------------------------------------------------------------------------------------------


class _Chunk(NamedTuple):
    """One stored chunk (shard) of a 2-D tensor: where it sits in the tensor and where its bytes are."""

    row: int
    col: int
    rows: int
    cols: int
    file: Path
    start: int  # byte offset of the chunk's first element in ``file``
    dtype: torch.dtype


class CheckpointTables:
    """Reads 2-D tensors of a checkpoint (the ``model`` entry's tables) in blocks of rows, without loading a whole
    tensor or chunk: each DCP file is checked against the checkpoint's manifest before it is read (as
    :func:`mdaf_rec.checkpoint.load_checkpoint` does), its record's tensor header is read on the ``meta`` device
    with ``torch.load(weights_only=True)`` (no bytes of the tensor), and the rows are read from where the record
    stores them.

    Args:
        path: the checkpoint folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = ckpt.checkpoint_manifest(path)
        self.metadata = ckpt.SafeFileSystemReader(str(path), self.files).read_metadata()

    def shape(self, fqn: str) -> Tuple[int, int]:
        """``(rows, dim)`` of the checkpoint's tensor ``fqn`` (e.g. ``model.model.<table weight key>``)."""
        md = self.metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, TensorStorageMetadata) or len(md.size) != 2:
            raise CheckpointError(f"{self.path}: holds no table {fqn!r} (a 2-D tensor)")
        return int(md.size[0]), int(md.size[1])

    def _extent(self, fqn: str) -> Tuple[int, int]:
        """``(rows, dim)`` of a 2-D tensor ``fqn``, ``(n, 1)`` of a 1-D one (a remapping's array)."""
        md = self.metadata.state_dict_metadata.get(fqn)
        if isinstance(md, TensorStorageMetadata) and len(md.size) == 1:
            return int(md.size[0]), 1
        return self.shape(fqn)

    def _chunks(self, fqn: str) -> List[_Chunk]:
        """The stored chunks of ``fqn`` (2-D, or 1-D as one column) in row order."""
        rows, dim = self._extent(fqn)
        ndim = len(self.metadata.state_dict_metadata[fqn].size)
        chunks = []
        for index, info in (self.metadata.storage_data or {}).items():
            if index.fqn != fqn:
                continue
            if info.transform_descriptors:
                raise CheckpointError(f"{self.path}: table {fqn!r} is stored transformed ({info.transform_descriptors});"
                                      " export reads plain DCP records only")
            file = self.path / info.relative_path
            ckpt.verify_checkpoint(self.path, [info.relative_path], self.files)
            with open(file, "rb") as fh:
                try:
                    header = torch.load(_create_file_view(fh, info.offset, info.length), map_location="meta",
                                        weights_only=True)
                except Exception as e:  # a garbled record
                    raise CheckpointError(f"{file}: table {fqn!r}: not a readable tensor record ({type(e).__name__})"
                                          ) from None
            if not isinstance(header, torch.Tensor) or header.dim() != ndim or not header.is_contiguous():
                raise CheckpointError(f"{file}: table {fqn!r}: the record is not a contiguous {ndim}-D tensor")
            row, col = int(index.offset[0]), int(index.offset[1]) if ndim == 2 else 0
            n, w = header.shape if ndim == 2 else (header.shape[0], 1)
            if row + n > rows or col + w > dim:
                raise CheckpointError(f"{file}: table {fqn!r}: chunk at {row, col} of {n}x{w} lies outside {rows}x{dim}")
            start = (info.offset + header.untyped_storage()._checkpoint_offset
                     + header.storage_offset() * header.element_size())
            chunks.append(_Chunk(row, col, int(n), int(w), file, start, header.dtype))
        if sum(c.rows * c.cols for c in chunks) != rows * dim:
            raise CheckpointError(f"{self.path}: the stored chunks of table {fqn!r} do not cover its {rows}x{dim}")
        return sorted(chunks, key=lambda c: (c.row, c.col))

    def blocks(self, fqn: str) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """``(row, col, float32 [n, w] block)`` covering tensor ``fqn``, chunk by chunk, ``BLOCK_BYTES`` at a time."""
        for row, col, block in self.stored_blocks(fqn):
            yield row, col, block.float()

    def stored_blocks(self, fqn: str) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """As :meth:`blocks`, in the stored dtype (int64 ids stay exact); a 1-D tensor ``fqn`` as ``[n, 1]`` blocks,
        in row order."""
        for chunk in self._chunks(fqn):
            size = torch.empty((), dtype=chunk.dtype).element_size()
            step = max(1, BLOCK_BYTES // (4 * chunk.cols))
            with open(chunk.file, "rb") as fh:
                for r in range(0, chunk.rows, step):
                    n = min(step, chunk.rows - r)
                    data = bytearray(n * chunk.cols * size)
                    if os.preadv(fh.fileno(), [data], chunk.start + r * chunk.cols * size) != len(data):
                        raise CheckpointError(f"{chunk.file}: ends inside table {fqn!r} (truncated)")
                    yield chunk.row + r, chunk.col, torch.frombuffer(data, dtype=chunk.dtype).view(n, chunk.cols)


def quantize_rows(rows: torch.Tensor, dtype: str) -> np.ndarray:
    """``[n, dim]`` float32 rows -> ``[n, row_bytes]`` uint8, the bytes of the table file's ``dtype`` layout."""
    if dtype == "fp32":
        out = rows.contiguous().numpy()
    elif dtype == "fp16":
        out = rows.half().numpy()
    else:
        out = torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(rows.contiguous()).numpy()
    return out.astype(out.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(rows.shape[0], -1)


def write_table(source: CheckpointTables, fqn: str, folder: Path, name: str, dtype: str) -> TableFile:
    """Writes the checkpoint's table ``fqn`` as ``folder/tables/<name>.bin`` in ``dtype``; returns its entry.

    Memory: one block of rows (``BLOCK_BYTES``). A table stored in full rows (row-wise, table-wise or unsharded
    chunks) is converted block by block; one split into column ranges (column-wise sharding) is first assembled
    in float32 in a staging file beside it (deleted after), since a quantized row needs all its columns.
    """
    rows, dim = source.shape(fqn)
    table = TableFile(f"{TABLES_DIR}/{name}.bin", dtype, rows, dim)
    path = folder / table.file
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "fp32" or all(c.cols == dim for c in source._chunks(fqn)):
        _fill(path, rows, table.row_bytes, source.blocks(fqn), dtype)
        return table
    staging = path.with_name(f".{name}.fp32")
    _fill(staging, rows, 4 * dim, source.blocks(fqn), "fp32")
    mapped = np.memmap(staging, dtype="<f4", mode="r", shape=(rows, dim))
    step = max(1, BLOCK_BYTES // (4 * dim))
    _fill(path, rows, table.row_bytes,
          ((r, 0, torch.from_numpy(np.array(mapped[r:r + step]))) for r in range(0, rows, step)), dtype)
    del mapped
    staging.unlink()
    return table


def _fill(path: Path, rows: int, row_bytes: int, blocks: Iterator[Tuple[int, int, torch.Tensor]], dtype: str) -> None:
    """Writes ``blocks`` ``(row, col, float32 [n, w])`` into the ``rows x row_bytes`` file ``path`` in ``dtype``
    (``col`` > 0 only for ``fp32``: a column range is written into each row's bytes)."""
    with open(path, "wb") as fh:
        fh.truncate(rows * row_bytes)
        for row, col, block in blocks:
            data = quantize_rows(block, dtype)
            if data.shape[1] == row_bytes:
                os.pwrite(fh.fileno(), data, row * row_bytes)
                continue
            for i in range(data.shape[0]):  # a column range of each row (column-wise shards, fp32 staging)
                os.pwrite(fh.fileno(), data[i], (row + i) * row_bytes + 4 * col)


# --------------------------------------------------------------------------------------------------
# Frozen id maps (managed ids): checkpoint -> id map files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdMapFile:
    """The frozen remapping of one managed table in a MODEL_DIR (``feature_spec.json``'s ``id_maps`` entry).

    Two raw files of ``entries`` little-endian int64 each: ``ids`` the hashed ids that own a row
    (:func:`~mdaf_rec.managed_ids.hash_ids` of the raw ids), ascending, and ``rows`` the row of each; an id not
    in ``ids`` maps to ``miss_rows[(hash // bucket_size) // buckets_per_shard]``
    (:class:`~mdaf_rec.managed_ids.ShardLayout`).

    Attributes:
        ids: path of the sorted hashed ids, relative to MODEL_DIR (``id_maps/<table>.ids.bin``).
        rows: path of their rows (``id_maps/<table>.rows.bin``).
        entries: number of ids with a row.
        table_rows: rows of the table the map points into.
        layout: where an id without a row goes.
    """

    ids: str
    rows: str
    entries: int
    table_rows: int
    layout: ShardLayout

    def doc(self) -> Dict[str, Any]:
        return {"ids": self.ids, "rows": self.rows, "entries": self.entries, "table_rows": self.table_rows,
                "miss_rows": self.layout.miss_rows, "bucket_size": self.layout.bucket_size,
                "buckets_per_shard": self.layout.buckets_per_shard,
                "rule": "h = (splitmix64(raw) & (2**63 - 1)) % (2**63 - 1) (mdaf_rec.managed_ids.hash_ids); row = "
                        "rows[i] if ids[i] == h (ids: ascending int64), else "
                        "miss_rows[(h // bucket_size) // buckets_per_shard]",
                "layout": "ids, rows: entries x int64, little-endian"}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "IdMapFile":
        layout = ShardLayout([int(r) for r in doc["miss_rows"]], int(doc["bucket_size"]), int(doc["buckets_per_shard"]))
        id_map = cls(str(doc["ids"]), str(doc["rows"]), int(doc["entries"]), int(doc["table_rows"]), layout)
        if id_map.entries < 0 or layout.bucket_size < 1 or layout.buckets_per_shard < 1 or not layout.miss_rows \
                or not all(0 <= r < id_map.table_rows for r in layout.miss_rows):
            raise ValueError(f"id map {id_map.ids}: malformed shard layout {layout}")
        return id_map


ID_MAPS_DIR = "id_maps"


def write_id_map(source: CheckpointTables, prefix: str, folder: Path, name: str, world_size: int,
                 buckets: int) -> IdMapFile:
    """Writes the frozen remapping of the checkpoint's MCH module ``prefix`` (its ``_mch_sorted_raw_ids`` and
    ``_mch_remapped_ids_mapping``) as ``folder/id_maps/<name>.{ids,rows}.bin``; returns its entry.

    The module was trained row-wise sharded over ``world_size`` processes: shard ``k`` owned rows
    ``[k R / W, (k + 1) R / W)`` and the ``k``-th ``W``-th of the ``buckets`` blocks of the hashed range, so the
    shards' sorted arrays one after the other, empty slots left out, are the ascending map (checked). Memory: one
    block of ids (``BLOCK_BYTES``), as :func:`write_table`.
    """
    ids_fqn, rows_fqn = f"{prefix}._mch_sorted_raw_ids", f"{prefix}._mch_remapped_ids_mapping"
    table_rows, _ = source._extent(ids_fqn)
    layout = shard_layout(table_rows, buckets, world_segments(table_rows, world_size))
    id_map = IdMapFile(f"{ID_MAPS_DIR}/{name}.ids.bin", f"{ID_MAPS_DIR}/{name}.rows.bin", 0, table_rows, layout)
    (folder / ID_MAPS_DIR).mkdir(parents=True, exist_ok=True)
    entries, last = 0, -1
    with open(folder / id_map.ids, "wb") as ids_fh, open(folder / id_map.rows, "wb") as rows_fh:
        for (row, _, ids), (rows_row, _, rows) in zip(source.stored_blocks(ids_fqn), source.stored_blocks(rows_fqn)):
            if row != rows_row or ids.shape != rows.shape or ids.dtype != torch.int64 or rows.dtype != torch.int64:
                raise CheckpointError(f"{source.path}: the remapping {prefix!r}: its ids and rows are stored apart")
            owned = ids[:, 0] != INPUT_HASH_SIZE  # INPUT_HASH_SIZE: an empty slot
            ids, rows = ids[owned, 0], rows[owned, 0]
            if ids.numel() and (int(ids[0]) <= last or bool((ids[1:] <= ids[:-1]).any())):
                raise CheckpointError(f"{source.path}: the remapping {prefix!r} is not sorted by shard (trained on "
                                      f"{world_size} processes?)")
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= table_rows):
                raise CheckpointError(f"{source.path}: the remapping {prefix!r} points outside its {table_rows} rows")
            ids_fh.write(ids.numpy().astype("<i8").tobytes())
            rows_fh.write(rows.numpy().astype("<i8").tobytes())
            entries += int(ids.numel())
            last = int(ids[-1]) if ids.numel() else last
    return IdMapFile(id_map.ids, id_map.rows, entries, table_rows, layout)


class IdMap:
    """A MODEL_DIR's frozen remapping of one managed table, memory-mapped (only the pages a binary search touches
    are read): raw ids -> rows (:func:`~mdaf_rec.managed_ids.remap`, the code :class:`FrozenIdMap` runs)."""

    def __init__(self, model_dir: Path, id_map: IdMapFile) -> None:
        self.id_map = id_map
        arrays = []
        for file in (id_map.ids, id_map.rows):
            path = model_dir / file
            if path.stat().st_size != 8 * id_map.entries:
                raise ValueError(f"id map {file}: has {path.stat().st_size} bytes, not {id_map.entries} int64 ids")
            # copy-on-write: a writable view for torch (nothing writes to it; the file is never changed)
            arrays.append(torch.from_numpy(np.memmap(path, dtype="<i8", mode="c", shape=(id_map.entries,)))
                          if id_map.entries else torch.empty(0, dtype=torch.int64))
        self.sorted_ids, self.rows = arrays
        self.miss_rows = torch.tensor(id_map.layout.miss_rows, dtype=torch.int64)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` raw int64 ids -> ``[...]`` int64 rows."""
        return remap(hash_ids(ids), self.sorted_ids, self.rows, self.miss_rows, self.id_map.layout)


# --------------------------------------------------------------------------------------------------
# Reading: the lookup step
# --------------------------------------------------------------------------------------------------


class Lookup(NamedTuple):
    """How one row input of the serving program is made (``feature_spec.json``'s ``lookups`` entry):
    ``rows[:, j] = table_j[index[:, j]][..., columns[j] : columns[j] + dim]`` for each ``tables[j]``, giving
    ``[B, len(tables), ..., dim]`` (``columns`` empty: every table's rows are ``dim`` wide; a managed table's rows
    are ``[static part | sequence part]``, and its index goes through the table's id map first)."""

    index: str
    tables: List[str]
    dim: int
    columns: List[int] = []


class ServingTables:
    """The table files of a verified MODEL_DIR, memory-mapped read-only: only the rows looked up are read.

    Args:
        model_dir: the MODEL_DIR.
        tables: ``feature_spec.json``'s ``tables`` (table name -> its :meth:`TableFile.doc`).
        listed: the files of MODEL_DIR's manifest (checked): a table or id map file must be one of them.
        id_maps: ``feature_spec.json``'s ``id_maps`` (managed table name -> its :meth:`IdMapFile.doc`): the raw ids
            looked up in such a table go through its :class:`IdMap` first.
    Raises:
        ValueError: a table or id map entry that is malformed, names a file the manifest does not list, or does
            not match its file's size.
    """

    def __init__(self, model_dir: Path, tables: Mapping[str, Mapping[str, Any]], listed: Collection[str],
                 id_maps: Mapping[str, Mapping[str, Any]] = {}) -> None:
        self.tables = {name: TableFile.from_doc(doc) for name, doc in tables.items()}
        self.id_maps: Dict[str, IdMap] = {}
        for name, doc in id_maps.items():
            id_map = IdMapFile.from_doc(doc)
            unlisted = [f for f in (id_map.ids, id_map.rows) if f not in listed]
            if name not in self.tables or unlisted or id_map.table_rows != self.tables[name].rows:
                raise ValueError(f"id map of {name!r}: " + (f"{unlisted[0]} is not a file of the manifest" if unlisted
                                 else "is not the map of a table of the same rows"))
            self.id_maps[name] = IdMap(model_dir, id_map)
        self._maps: Dict[str, np.memmap] = {}
        for name, table in self.tables.items():
            if table.file not in listed:
                raise ValueError(f"table {name!r}: {table.file} is not a file of the manifest")
            path = model_dir / table.file
            if path.stat().st_size != table.rows * table.row_bytes:
                raise ValueError(f"table {name!r}: {table.file} has {path.stat().st_size} bytes, not {table.rows} "
                                 f"rows of {table.row_bytes}")
            self._maps[name] = np.memmap(path, dtype=np.uint8, mode="r", shape=(table.rows, table.row_bytes))

    def lookup(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The rows of table ``name`` at ``index``: ``[...]`` int64 -> ``[..., dim]`` float32 (dequantized); a
        managed table's ``index`` holds raw ids, mapped to rows by its id map here."""
        table = self.tables[name]
        if name in self.id_maps:
            index = self.id_maps[name](index)
        raw = self._maps[name][index.reshape(-1).numpy()]  # [n, row_bytes]: a copy of the rows read
        if table.dtype == "int8":
            rows = torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(torch.from_numpy(raw))
        else:
            rows = torch.from_numpy(raw.view("<f4" if table.dtype == "fp32" else "<f2").astype(np.float32, copy=False))
        return rows.view(*index.shape, table.dim)

    def rows(self, lookups: Mapping[str, Lookup], inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The program's row inputs (input name -> ``[B, J, ..., dim]``) from its index inputs by ``lookups``."""
        out = {}
        for name, lookup in lookups.items():
            index = inputs[lookup.index]
            if not lookup.tables:
                out[name] = torch.zeros(index.shape[0], 0, *index.shape[2:], lookup.dim)
                continue
            columns = lookup.columns or [0] * len(lookup.tables)
            out[name] = torch.stack([self.lookup(t, index[:, j])[..., c : c + lookup.dim]
                                     for j, (t, c) in enumerate(zip(lookup.tables, columns))], dim=1)
        return out
