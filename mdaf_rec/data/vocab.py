"""Vocabularies: raw ids -> embedding-table indices, one vocabulary per id space.

Built from the TRAINING split only, counted out of core (a DuckDB ``GROUP BY`` over the Parquet files,
:func:`count_ids`). An id space with a history counts its target column and its
history column together (one vocabulary, one table); every extra sparse field is its own space.
Time fields (``hour``, ``dayofweek``) need none. Index 0 is padding, 1 is out-of-vocabulary (OOV);
known ids (seen at least ``min_count`` times) get ``2, 3, ...`` in ascending raw-id order. A space
with ``hash_buckets = K`` has no vocabulary: ``index = 2 + splitmix64(id) % K`` (stable across
processes and runs), table size ``K + 2``.

A run warm-started from another (``mdaf-rec train --init-from``) grows that run's vocabularies instead
(:meth:`Vocabularies.grown`): the source run's ids keep their indices, and the ids of the new training
split it lacks follow them, in ascending raw-id order. A vocabulary's ids are therefore kept in INDEX
order (``index = 2 + position``), which is ascending for a vocabulary built from data.

On disk (``DATASET/vocab/`` by default, see :meth:`Vocabularies.load_or_build`; a run keeps its own in
``RUN_DIR/vocab/``): one ``<space>.npy`` per enumerated space (int64 raw ids in index order) and
``vocab.json`` with the settings
(min_count, columns, hashing), the table sizes, the training files they were built from (name, size,
mtime and the sha256 of the Parquet footer: the cache key, so a rewritten file is noticed), and a
``fingerprint`` of settings and contents that checkpoints record to detect a mismatch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import duckdb
import numpy as np
import pyarrow as pa

from mdaf_rec.config import FeaturesConfig
from mdaf_rec.data.dataset import READ_BATCH_ROWS, Dataset, DatasetError, atomic_write, file_identity, open_parquet
from mdaf_rec.data.schema import SPLITS
from mdaf_rec.data.validate import ColumnRules, validate
from mdaf_rec.data.validated import validate_once
from mdaf_rec.errors import UserError
from mdaf_rec.features import NUM_RESERVED_INDICES, OOV_INDEX, TIME_FIELDS

logger = logging.getLogger(__name__)

VOCAB_DIR = "vocab"
VOCAB_FILE = "vocab.json"
FORMAT_VERSION = 1
# Spaces whose largest raw id is below this use a direct-index table (int32, at most 64 MiB)
# instead of a binary search: ~10x faster lookups (see docs/benchmarks.md).
DIRECT_LOOKUP_MAX_ID = 1 << 24


class VocabMismatchError(UserError, ValueError):
    """Vocabularies differ from the ones a model or run expects (fingerprint mismatch)."""


class VocabFileError(UserError, ValueError):
    """Saved vocabularies are missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class SpaceSettings:
    """What defines one id space's vocabulary.

    Attributes:
        name: id space (``item``) or extra sparse field name.
        column: target column (``item_id``).
        history_column: history column (``item_history``) counted into the same vocabulary, if any.
        hash_buckets: hash into this many buckets instead of enumerating ids.
    """

    name: str
    column: str
    history_column: Optional[str]
    hash_buckets: Optional[int]

    @property
    def columns(self) -> Tuple[str, ...]:
        return (self.column,) if self.history_column is None else (self.column, self.history_column)

    def to_json(self) -> Dict[str, Any]:
        return {"column": self.column, "history_column": self.history_column, "hash_buckets": self.hash_buckets}


def space_settings(cfg: FeaturesConfig) -> Tuple[SpaceSettings, ...]:
    """Every id space of ``cfg`` that needs a vocabulary (all but the time fields), config order."""
    spaces = [
        SpaceSettings(name, s.column, s.history_column, s.hash_buckets)
        for name, s in cfg.id_spaces.items()
        if s.column not in TIME_FIELDS
    ]
    return tuple(spaces + [SpaceSettings(name, name, None, None) for name in cfg.extra_sparse])


def column_rules(cfg: FeaturesConfig) -> ColumnRules:
    """The columns the features of ``cfg`` read, and their checks (the loader's
    :meth:`~mdaf_rec.data.validate.ColumnRules.from_spec` for the spec built on ``cfg``)."""
    spaces = space_settings(cfg)
    return ColumnRules.build(
        extra_ids=[s.column for s in spaces],
        extra_histories=[s.history_column for s in spaces if s.history_column],
        dense=cfg.dense,
        lists=list(cfg.pooled_lists),
    )


def derived_folders(dataset: Dataset, cache_dir: Optional[Union[str, Path]] = None) -> List[Path]:
    """Where data derived from ``dataset`` (vocabularies, the validation record) is kept, first choice first:
    ``DATASET/vocab/``, then ``cache_dir/<dataset key>/`` (the key hashes the dataset's absolute path)."""
    folders = [dataset.root / VOCAB_DIR]
    if cache_dir is not None:
        key = hashlib.sha1(str(dataset.root.resolve()).encode()).hexdigest()[:16]
        folders.append(Path(cache_dir) / f"{dataset.root.name}-{key}")
    return folders


def stable_hash(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of int64 ids: ``[N] -> [N]`` uint64, identical in every process and run."""
    x = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Vocabulary:
    """One id space: ``lookup`` maps raw ids to table indices.

    Args:
        settings: the space.
        ids: unique known raw ids (int64) in index order (``ids[i]`` has index ``i + 2``): ascending for a
            vocabulary built from data, a grown one's appended ids after its source's; None for a hashed space.
        direct_max_id: use a direct-index table if the largest id is below this, else binary search.
    """

    def __init__(
        self, settings: SpaceSettings, ids: Optional[np.ndarray], direct_max_id: int = DIRECT_LOOKUP_MAX_ID
    ) -> None:
        if (ids is None) != (settings.hash_buckets is not None):
            raise ValueError(f"vocabulary {settings.name!r}: ids must be given iff the space is not hashed")
        self.settings = settings
        if ids is not None:
            ids = np.array(ids, dtype=np.int64)  # our own copy, read-only: the vocabulary never changes
            ids.setflags(write=False)
        self.ids = ids
        # Binary search: the ids sorted, and each sorted id's position in ``ids`` (None: ``ids`` is sorted).
        self._sorted, self._positions = ids, None
        if ids is not None and len(ids) > 1 and bool((ids[1:] < ids[:-1]).any()):
            self._positions = np.argsort(ids, kind="stable")
            self._sorted = ids[self._positions]
        self._direct: Optional[np.ndarray] = None
        if ids is not None and len(ids) and self._sorted[-1] < direct_max_id:
            # direct[raw] = index; the extra last entry catches every raw id above the largest known.
            self._direct = np.full(int(self._sorted[-1]) + 2, OOV_INDEX, dtype=np.int32)
            self._direct[ids] = np.arange(NUM_RESERVED_INDICES, NUM_RESERVED_INDICES + len(ids), dtype=np.int32)

    @property
    def size(self) -> int:
        """Table rows, padding and OOV included."""
        known = self.settings.hash_buckets if self.ids is None else len(self.ids)
        return int(known) + NUM_RESERVED_INDICES

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        """Raw ids ``[N]`` (non-negative int64) -> table indices ``[N]`` int64 (OOV = 1)."""
        raw = np.asarray(raw, dtype=np.int64)
        if self.ids is None:
            buckets = np.uint64(self.settings.hash_buckets)
            return (stable_hash(raw) % buckets).astype(np.int64) + NUM_RESERVED_INDICES
        if self._direct is not None:
            return self._direct[np.minimum(raw, len(self._direct) - 1)].astype(np.int64)
        if not len(self.ids):
            return np.full(len(raw), OOV_INDEX, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, raw), len(self.ids) - 1)
        hit = self._sorted[pos] == raw
        if self._positions is not None:
            pos = self._positions[pos]
        return np.where(hit, pos + NUM_RESERVED_INDICES, OOV_INDEX)


class Vocabularies:
    """The vocabularies of a dataset for one features config; immutable once built or loaded (the spaces'
    mapping is read-only, so are their id arrays), which lets :attr:`fingerprint` be computed once.

    Args:
        spaces: space name -> vocabulary, config order.
        min_count: the minimum training count of a known id.
        train_files: ``[file name, bytes, mtime_ns, footer sha256]`` of the training files they were built from.
    """

    def __init__(self, spaces: Dict[str, Vocabulary], min_count: int, train_files: List[List[Any]]) -> None:
        self.spaces: Mapping[str, Vocabulary] = MappingProxyType(dict(spaces))
        self.min_count = min_count
        self.train_files = tuple(tuple(f) for f in train_files)

    def __reduce__(self) -> Tuple[Any, ...]:
        """Picklable (DataLoader workers started with ``spawn``), although ``spaces`` is a read-only view."""
        return Vocabularies, (dict(self.spaces), self.min_count, [list(f) for f in self.train_files])

    # -- queries ---------------------------------------------------------------------------------

    @property
    def sizes(self) -> Dict[str, int]:
        """Space -> table rows (the 2 reserved indices included), for :meth:`FeatureSpec.build`."""
        return {name: v.size for name, v in self.spaces.items()}

    def lookup(self, space: str, raw: np.ndarray) -> np.ndarray:
        """Raw ids ``[N]`` of ``space`` -> table indices ``[N]`` int64."""
        if space not in self.spaces:
            raise KeyError(f"no vocabulary for id space {space!r} (known: {list(self.spaces)})")
        return self.spaces[space].lookup(raw)

    def settings_json(self) -> Dict[str, Any]:
        """Everything that determines the contents, compared to decide reuse vs rebuild."""
        return {
            "version": FORMAT_VERSION,
            "min_count": self.min_count,
            "spaces": {name: v.settings.to_json() for name, v in self.spaces.items()},
            "train_files": [list(f) for f in self.train_files],
        }

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over settings (min_count, columns, hashing) and every known id, hex (computed once)."""
        h = hashlib.sha256()
        settings = {k: v for k, v in self.settings_json().items() if k != "train_files"}
        h.update(json.dumps(settings, sort_keys=True).encode())
        for name, v in self.spaces.items():
            h.update(name.encode())
            if v.ids is not None:
                h.update(np.ascontiguousarray(v.ids, dtype="<i8").tobytes())
        return h.hexdigest()

    def check_fingerprint(self, expected: str, what: str = "the checkpoint") -> None:
        """Raises :class:`VocabMismatchError` unless these vocabularies are the ones ``expected``."""
        if expected != self.fingerprint:
            raise VocabMismatchError(
                f"vocabulary fingerprint {self.fingerprint[:12]} differs from {expected[:12]} recorded by {what}: "
                "the vocabularies (data, min_count or hashing) changed since; ids would map to other rows"
            )

    def grown(self, new: "Vocabularies", source: str) -> "Vocabularies":
        """These vocabularies (a source run's) extended by the ids of ``new`` (built from the new training split)
        that they lack: every known id keeps its index, the new ids get the next indices, in ascending raw-id
        order. Hashed spaces stay as they are. The result has ``new``'s ``min_count`` and training files.

        Args:
            new: the vocabularies of the new training split (same id spaces and settings).
            source: what these vocabularies belong to, for messages (the source run's ``vocab/`` folder).
        Raises:
            VocabMismatchError: the id spaces, or one's column, history column or hashing, differ; names the
                config key.
        """
        if set(new.spaces) != set(self.spaces):
            raise VocabMismatchError(
                f"config keys 'features.id_spaces' / 'features.extra_sparse': the id spaces {sorted(new.spaces)} "
                f"differ from {sorted(self.spaces)} of {source}"
            )
        spaces: Dict[str, Vocabulary] = {}
        for name, fresh in new.spaces.items():
            old = self.spaces[name]
            for key, was, now in zip(("column", "history_column", "hash_buckets"), old.settings.to_json().values(),
                                     fresh.settings.to_json().values()):
                if was != now:
                    raise VocabMismatchError(
                        f"config key 'features.id_spaces.{name}.{key}': {now!r} here, {was!r} in {source}; "
                        "its ids would map to other rows"
                    )
            if old.ids is None:
                spaces[name] = old
                continue
            added = np.setdiff1d(fresh.ids, old.ids, assume_unique=True)  # sorted
            spaces[name] = Vocabulary(fresh.settings, np.concatenate([old.ids, added]))
        grown = Vocabularies(spaces, new.min_count, [list(f) for f in new.train_files])
        logger.info("grew the vocabularies of %s by the new training split's ids: sizes %s -> %s", source,
                    self.sizes, grown.sizes)
        return grown

    # -- building ----------------------------------------------------------------------------------

    @staticmethod
    def build(dataset: Dataset, cfg: FeaturesConfig) -> "Vocabularies":
        """Counts the training split's ids (target and history columns of each space together), out of core:
        one ``GROUP BY`` per space on DuckDB over the Parquet files (:func:`count_ids`).

        The files must have passed validation (:meth:`load_or_build` validates them first, once).
        """
        settings = space_settings(cfg)
        files = dataset.split_files("train")
        spaces = {
            s.name: Vocabulary(s, None if s.hash_buckets is not None else count_ids(files, s.columns, cfg.min_count))
            for s in settings
        }
        vocabs = Vocabularies(spaces, cfg.min_count, _file_list(dataset))
        logger.info("built vocabularies from %s train: sizes %s", dataset.root, vocabs.sizes)
        return vocabs

    @staticmethod
    def load_or_build(
        dataset: Dataset, cfg: FeaturesConfig, cache_dir: Optional[Union[str, Path]] = None
    ) -> "Vocabularies":
        """Reuses saved vocabularies with the same settings, else builds and saves them.

        A build validates the training files first (:func:`~mdaf_rec.data.validated.validate_once`: a
        file validated before is not read again). Looks in ``DATASET/vocab/``, then in ``cache_dir/<dataset key>/`` (``cache_dir`` given by the
        caller for read-only dataset folders; the key hashes the dataset's absolute path). Saved
        vocabularies whose settings (min_count, columns, hashing) or training files (name, size, mtime,
        Parquet footer hash) differ are rebuilt and overwritten, with one line saying why. A new build
        is saved to ``DATASET/vocab/`` if writable, else to the cache folder; with neither, it is kept
        in memory only (a warning says so).

        First, from the Parquet footers: a split file lacking a column the features read (ids,
        histories, ``dense``), or an empty training split, is a :class:`DatasetError` naming the file,
        so a mismatch of config and data fails before a model is built on them.
        """
        dataset.require_columns(column_rules(cfg).columns)
        if dataset.num_rows("train") == 0:
            files = ", ".join(str(f) for f in dataset.split_files("train"))
            raise DatasetError(f"dataset {dataset.root}: the train split ({files}) has no rows")
        wanted = Vocabularies._wanted_settings(dataset, cfg)
        folders = derived_folders(dataset, cache_dir)
        for folder in folders:
            try:
                stored = _read_json(folder / VOCAB_FILE)
                if stored is not None and stored.get("settings") == wanted:
                    vocabs = Vocabularies.load(folder)
                    logger.info("reusing vocabularies in %s", folder)
                    return vocabs
            except (VocabFileError, VocabMismatchError) as e:  # our own cache: rebuilt, not trusted
                logger.warning("saved vocabularies unusable (%s): rebuilding", e)
                stored = None
            if stored is not None:
                reason = _stale_reason(stored.get("settings") or {}, wanted)
                logger.info("vocabularies in %s %s: rebuilding", folder, reason)
        validate_once(dataset, column_rules(cfg), folders, splits=("train",))
        vocabs = Vocabularies.build(dataset, cfg)
        for folder in folders:
            try:
                vocabs.save(folder)
                return vocabs
            except OSError as e:
                logger.info("cannot save vocabularies to %s (%s)", folder, e)
        logger.warning(
            "vocabularies of %s kept in memory only: the dataset folder is read-only and no writable cache_dir "
            "was given, so every run rebuilds them", dataset.root
        )
        return vocabs

    @staticmethod
    def _wanted_settings(dataset: Dataset, cfg: FeaturesConfig) -> Dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "min_count": cfg.min_count,
            "spaces": {s.name: s.to_json() for s in space_settings(cfg)},
            "train_files": _file_list(dataset),
        }

    # -- persistence -------------------------------------------------------------------------------

    def save(self, folder: Union[str, Path]) -> None:
        """Writes ``<space>.npy`` per enumerated space and ``vocab.json`` (last) into ``folder``.

        Each file is written to a temporary name and renamed, so concurrent savers of identical
        vocabularies (one per rank) never leave a torn file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, v in self.spaces.items():
            if v.ids is not None:
                atomic_write(folder / f"{name}.npy", lambda fh, ids=v.ids: np.save(fh, ids))
        doc = {
            "settings": self.settings_json(),
            "sizes": self.sizes,
            "fingerprint": self.fingerprint,
            "files": {name: f"{name}.npy" for name, v in self.spaces.items() if v.ids is not None},
        }
        atomic_write(folder / VOCAB_FILE, lambda fh: fh.write(json.dumps(doc, indent=2).encode()))
        logger.info("saved vocabularies to %s (fingerprint %s)", folder, doc["fingerprint"][:12])

    @staticmethod
    def load(folder: Union[str, Path]) -> "Vocabularies":
        """Reads vocabularies saved by :meth:`save`; verifies their fingerprint.

        A missing or unreadable file is a :class:`VocabFileError` naming it; files that read but
        differ from the saved fingerprint are a :class:`VocabMismatchError`.
        """
        folder = Path(folder)
        doc = _read_json(folder / VOCAB_FILE)
        if doc is None:
            raise VocabFileError(f"no vocabularies in {folder} ({VOCAB_FILE} is missing)")
        current = folder / VOCAB_FILE
        try:
            settings = doc["settings"]
            spaces: Dict[str, Vocabulary] = {}
            for name, s in settings["spaces"].items():
                space = SpaceSettings(name, s["column"], s["history_column"], s["hash_buckets"])
                ids = None
                if name in doc["files"]:
                    current = folder / doc["files"][name]
                    ids = np.load(current)
                    current = folder / VOCAB_FILE
                spaces[name] = Vocabulary(space, ids)
            vocabs = Vocabularies(spaces, settings["min_count"], settings["train_files"])
        except (KeyError, TypeError, ValueError, OSError, EOFError) as e:
            raise VocabFileError(f"{current}: unreadable saved vocabulary ({type(e).__name__}: {e})") from None
        vocabs.check_fingerprint(doc["fingerprint"], what=str(folder / VOCAB_FILE))
        return vocabs

    # -- reporting ---------------------------------------------------------------------------------

    def oov_rates(self, dataset: Dataset, splits: Sequence[str] = SPLITS) -> Dict[str, Dict[str, float]]:
        """Share of ids mapped to OOV, ``{split: {feature: rate}}``; logged.

        Features are the space names (target column) and history columns (all history entries).
        Hashed spaces have no OOV (rate 0).
        """
        spaces = [v.settings for v in self.spaces.values()]
        features = [(s.name, s.column) for s in spaces] + [(s.history_column,) * 2 for s in spaces if s.history_column]
        space_of = {c: s.name for s in spaces for c in s.columns}
        rates: Dict[str, Dict[str, float]] = {}
        for split in splits:
            oov = {f: 0 for f, _ in features}
            total = {f: 0 for f, _ in features}
            for table in _read(dataset, split, spaces):
                for feature, column in features:
                    ids = self.lookup(space_of[column], _flat_values(table.column(column)))
                    oov[feature] += int(np.count_nonzero(ids == OOV_INDEX))
                    total[feature] += len(ids)
            rates[split] = {f: oov[f] / total[f] if total[f] else 0.0 for f, _ in features}
            logger.info("OOV rates %s: %s", split, {f: round(r, 4) for f, r in rates[split].items()})
        return rates


def count_ids(files: Sequence[Path], columns: Sequence[str], min_count: int) -> np.ndarray:
    """Sorted int64 ids that occur at least ``min_count`` times in ``columns`` of ``files`` together (scalar
    columns count each row, ``list`` columns each entry): ``GROUP BY id HAVING count(*) >= min_count`` on
    DuckDB, which streams the Parquet files and spills to a temporary folder beyond its memory limit."""
    sources = "[" + ", ".join(_sql_string(str(f)) for f in files) + "]"
    scan = f"read_parquet({sources}, union_by_name = true)"
    parts = []
    for column in columns:
        ident = '"' + column.replace('"', '""') + '"'
        parts.append(f"SELECT CAST(unnest({ident}) AS BIGINT) AS id FROM {scan}" if _is_list_column(files[0], column)
                     else f"SELECT CAST({ident} AS BIGINT) AS id FROM {scan}")
    query = f"SELECT id FROM ({' UNION ALL '.join(parts)}) GROUP BY id HAVING count(*) >= {int(min_count)} ORDER BY id"
    with tempfile.TemporaryDirectory(prefix="mdaf-vocab-") as spill, duckdb.connect() as con:
        con.execute(f"SET temp_directory = {_sql_string(spill)}")
        try:
            ids = con.execute(query).fetch_arrow_table().column("id")
        except duckdb.Error as e:
            reason = " ".join(str(e).split())
            names = ", ".join(map(str, files))
            raise DatasetError(f"{names}: counting the ids of {list(columns)} failed ({reason})") from None
    return ids.to_numpy().astype(np.int64, copy=False) if len(ids) else np.zeros(0, np.int64)


def _is_list_column(path: Path, column: str) -> bool:
    field = open_parquet(path).schema_arrow.field(column)
    return pa.types.is_list(field.type) or pa.types.is_large_list(field.type)


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _flat_values(column: Union[pa.Array, pa.ChunkedArray]) -> np.ndarray:
    """Ids of a scalar or list column as one int64 array (list entries flattened)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy()


def _read(dataset: Dataset, split: str, spaces: Sequence[SpaceSettings]) -> Iterator[pa.Table]:
    """Validated tables of the columns of ``spaces`` in ``split``, streamed in batches."""
    rules = ColumnRules.build(
        extra_ids=[s.column for s in spaces], extra_histories=[s.history_column for s in spaces if s.history_column]
    )
    columns = list(dict.fromkeys(c for s in spaces for c in s.columns))
    for path in dataset.split_files(split):
        offset = 0
        for batch in open_parquet(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            yield validate(batch, rules, str(path), offset, columns)
            offset += batch.num_rows


def _file_list(dataset: Dataset) -> List[List[Any]]:
    """``[name, bytes, mtime_ns, footer sha256]`` of each training file: the key of the saved vocabularies (a
    rewritten file changes its footer or its mtime even when its size stays; see docs/data.md)."""
    return [file_identity(dataset, p) for p in dataset.split_files("train")]


def _stale_reason(stored: Dict[str, Any], wanted: Dict[str, Any]) -> str:
    """Why saved vocabulary settings ``stored`` are not the ``wanted`` ones, in a few words."""
    def without_files(settings: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in settings.items() if k != "train_files"}

    if without_files(stored) != without_files(wanted):
        return "were built with other settings (min_count, columns or hashing)"
    old = {f[0]: f[1:] for f in stored.get("train_files", [])}
    new = {f[0]: f[1:] for f in wanted["train_files"]}
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    names = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
    return (f"were built from other training files ({names} added, removed or rewritten since: size, mtime or "
            "Parquet footer differ)")


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``; ``None`` if there is no such file."""
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise VocabFileError(f"{path}: unreadable saved vocabulary ({e})") from None
    if not isinstance(doc, dict):
        raise VocabFileError(f"{path}: unreadable saved vocabulary (not a JSON object)")
    return doc
