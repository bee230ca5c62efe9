"""Feature and table specification: id spaces -> TorchRec tables, declared once.

The config (:class:`~mdaf_rec.config.FeaturesConfig`) names the id spaces; the training split's
vocabularies give their sizes. From both, :class:`FeatureSpec` derives

* the static (pooled) fields, one ``EmbeddingBagConfig`` table each (``static_dim``), read by the
  DCNv3 branch through an ``EmbeddingBagCollection``;
* the mean-pooled lists of the static branch (``features.pooled_history``: the histories; ``features.pooled_lists``:
  extra list columns), each read through its id space's static table;
* the sequence tables, one ``EmbeddingConfig`` per id space that has a history (``sequence_dim``),
  shared by the target (key ``item``) and its history (key ``item_history``), read through an
  ``EmbeddingCollection``.

Under ``features.id_mapping: managed`` the id spaces that are not time fields are :class:`ManagedSpace` s instead:
raw ids go into the KJTs, and one table per space (rows ``[static part | sequence part]``) is looked up through
one ``ManagedCollisionEmbeddingCollection`` (:meth:`FeatureSpec.managed_embedding_configs`), so the static and
the sequence lookups of a space share one remapping; the time fields keep their pooled tables.

Loader, models, planner and exporter all read this one object; nothing else hard-codes a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from mdaf_rec.config import ConfigError, FeaturesConfig
from mdaf_rec.registry import TIME_FIELDS  # re-exported: fields derived from ``timestamp``, fixed table sizes


#: The id space whose raw ids group rows into users (GAUC's groups, ``Batch.user_id``).
USER_SPACE = "user"

PADDING_INDEX = 0
OOV_INDEX = 1
NUM_RESERVED_INDICES = 2


@dataclass(frozen=True)
class StaticField:
    """A pooled field of the static branch.

    Attributes:
        name: KJT key and table suffix (``item``).
        column: canonical-schema column (``item_id``) or a time field (``hour``).
        num_embeddings: table rows.
    """

    name: str
    column: str
    num_embeddings: int

    @property
    def table_name(self) -> str:
        return f"static_{self.name}"


@dataclass(frozen=True)
class SequenceSpace:
    """An id space with a history: one sequence table shared by target and history.

    Attributes:
        name: id space and KJT key of the target (``item``).
        history_key: KJT key and column of the history (``item_history``).
        num_embeddings: table rows.
    """

    name: str
    history_key: str
    num_embeddings: int

    @property
    def table_name(self) -> str:
        return f"sequence_{self.name}"


@dataclass(frozen=True)
class ManagedSpace:
    """An id space under ``features.id_mapping: managed``: raw ids remapped in the model to ``rows`` rows.

    Attributes:
        name: id space and KJT key of its target (``item``).
        history_key: KJT key of its history (``item_history``), if it has one.
        rows: table rows (the last one is the miss row of ids without a row of their own).
        eviction: a name of :data:`mdaf_rec.registry.EVICTION_POLICIES`.
        eviction_interval: training steps between admission/eviction rounds.
    """

    name: str
    history_key: Optional[str]
    rows: int
    eviction: str
    eviction_interval: int

    @property
    def table_name(self) -> str:
        return f"managed_{self.name}"


@dataclass(frozen=True)
class FeatureSpec:
    """Everything derived from the features config plus vocabulary sizes.

    Attributes:
        static_fields: pooled fields in DCNv3 field order.
        sequence_spaces: id spaces with a history (at least ``item`` and ``category``).
        dense_features: dense float columns, in order.
        dense_log1p: compress dense values with a signed log1p before embedding.
        static_dim: pooled embedding dim.
        sequence_dim: sequence embedding dim.
        max_history: maximum history length.
        pooled_history: the static branch also reads each history, mean-pooled through its id space's
            static table (``features.pooled_history``).
        pooled_lists: ``(column, id space)`` per extra list column the static branch reads mean-pooled through
            that space's static table (``features.pooled_lists``, config order); each has its own length.
        table_init_scale: static table rows start uniform in ``[-s, s]`` (``None``: TorchRec's default); under
            ``managed`` whole managed rows do.
        managed_spaces: the id spaces remapped in the model (``features.id_mapping: managed``; empty under
            ``vocab``), config order. Their static fields and sequence spaces have ``rows`` rows.
    """

    static_fields: Tuple[StaticField, ...]
    sequence_spaces: Tuple[SequenceSpace, ...]
    dense_features: Tuple[str, ...]
    dense_log1p: bool
    static_dim: int
    sequence_dim: int
    max_history: int
    pooled_history: bool = False
    table_init_scale: Optional[float] = None
    managed_spaces: Tuple[ManagedSpace, ...] = ()
    pooled_lists: Tuple[Tuple[str, str], ...] = ()

    @staticmethod
    def build(cfg: FeaturesConfig, vocab_sizes: Mapping[str, int]) -> "FeatureSpec":
        """Combines the config with table sizes.

        Args:
            cfg: the features config.
            vocab_sizes: id space name -> number of table rows (padding and OOV included) for every
                id space and extra sparse field that is not a time field (unused under ``managed``, where the
                config's ``rows`` size the tables).
        Returns:
            The spec. Raises :class:`ConfigError` naming the id space whose size is missing.
        """
        static: List[StaticField] = []
        sequence: List[SequenceSpace] = []
        managed: List[ManagedSpace] = []
        for name, space in list(cfg.id_spaces.items()) + [(n, None) for n in cfg.extra_sparse]:
            column = space.column if space is not None else name
            if cfg.id_mapping == "managed" and space is not None and column not in TIME_FIELDS:
                if space.rows is None:
                    raise ConfigError(f"config key 'features.id_spaces.{name}.rows': needed by features.id_mapping=managed")
                managed.append(ManagedSpace(name, space.history_column, space.rows, space.eviction,
                                            space.eviction_interval))
                size = space.rows
            else:
                size = _table_size(name, column, vocab_sizes)
            static.append(StaticField(name=name, column=column, num_embeddings=size))
            if space is not None and space.history_column is not None:
                sequence.append(SequenceSpace(name=name, history_key=space.history_column, num_embeddings=size))
        return FeatureSpec(
            static_fields=tuple(static),
            sequence_spaces=tuple(sequence),
            dense_features=tuple(cfg.dense),
            dense_log1p=cfg.dense_log1p,
            static_dim=cfg.static_dim,
            sequence_dim=cfg.sequence_dim,
            max_history=cfg.max_history,
            pooled_history=cfg.pooled_history,
            table_init_scale=cfg.table_init_scale,
            managed_spaces=tuple(managed),
            pooled_lists=tuple(cfg.pooled_lists.items()),
        )

    # -- keys ------------------------------------------------------------------------------------

    @property
    def static_keys(self) -> List[str]:
        """Keys of ``Batch.static_features``, in order."""
        return [f.name for f in self.static_fields]

    @property
    def sequence_keys(self) -> List[str]:
        """Keys of ``Batch.sequence_features``, in order: target then history per id space."""
        keys: List[str] = []
        for s in self.sequence_spaces:
            keys += [s.name, s.history_key]
        return keys

    @property
    def pooled_history_fields(self) -> List[Tuple[str, StaticField]]:
        """``(key, the static field whose table mean-pools it)`` per mean-pooled list of the static branch, in
        ``Batch.static_features`` order: :attr:`pooled_histories`, then :attr:`pooled_list_fields`."""
        return self.pooled_histories + self.pooled_list_fields

    @property
    def pooled_histories(self) -> List[Tuple[str, StaticField]]:
        """``(history key, its id space's static field)`` per id space with a history (empty unless
        ``pooled_history``)."""
        if not self.pooled_history:
            return []
        fields = {f.name: f for f in self.static_fields}
        return [(s.history_key, fields[s.name]) for s in self.sequence_spaces]

    @property
    def pooled_list_fields(self) -> List[Tuple[str, StaticField]]:
        """``(column, its id space's static field)`` per ``pooled_lists`` column, config order."""
        fields = {f.name: f for f in self.static_fields}
        return [(column, fields[space]) for column, space in self.pooled_lists]

    @property
    def pooled_history_keys(self) -> List[str]:
        """Keys of the mean-pooled lists in ``Batch.static_features``: the histories (``pooled_history``), then
        :attr:`pooled_list_keys`."""
        return [key for key, _ in self.pooled_history_fields]

    @property
    def pooled_list_keys(self) -> List[str]:
        """Keys (= columns) of the ``pooled_lists``, config order."""
        return [column for column, _ in self.pooled_lists]

    @property
    def managed(self) -> bool:
        """Whether ids are remapped in the model (``features.id_mapping: managed``)."""
        return bool(self.managed_spaces)

    @property
    def padding_id(self) -> int:
        """The id that pads a history in fixed-size (serving) inputs: index 0, or -1 under ``managed`` (raw ids are
        non-negative, and 0 may be one)."""
        return -1 if self.managed else PADDING_INDEX

    @property
    def static_history_keys(self) -> List[str]:
        """History keys of ``Batch.static_features``: the pooled histories, and under ``managed`` every history
        (the managed lookup reads targets and histories from that one KJT)."""
        if self.managed:
            return [s.history_key for s in self.sequence_spaces]
        return self.pooled_history_keys

    @property
    def static_input_keys(self) -> List[str]:
        """Keys of ``Batch.static_features``, in order: one id per sample for each static field, then the
        histories :attr:`static_history_keys` (0..max_history ids per sample)."""
        return self.static_keys + self.static_history_keys

    @property
    def num_static_fields(self) -> int:
        """Fields seen by the static branch: pooled sparse fields, pooled histories, dense fields."""
        return len(self.static_fields) + len(self.pooled_history_keys) + len(self.dense_features)

    def static_table_rows(self, key: str) -> Optional[int]:
        """Rows of the static table that ``key`` (a static field or a history of the static KJT) reads; ``None``
        for a managed key (a raw id, any int64)."""
        managed = {s.name for s in self.managed_spaces} | {s.history_key for s in self.managed_spaces}
        if key in managed:
            return None
        fields = [(f.name, f) for f in self.static_fields] + self.pooled_history_fields
        return {name: f.num_embeddings for name, f in fields}[key]

    @property
    def user_field(self) -> Optional[int]:
        """Position of the :data:`USER_SPACE` field in :attr:`static_keys`, ``None`` when there is none."""
        keys = self.static_keys
        return keys.index(USER_SPACE) if USER_SPACE in keys else None

    @property
    def user_column(self) -> Optional[str]:
        """Column of the :data:`USER_SPACE` field (its raw ids are ``Batch.user_id``), ``None`` when there is none."""
        position = self.user_field
        return self.static_fields[position].column if position is not None else None

    # -- TorchRec tables -------------------------------------------------------------------------

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """One pooled table per static field. With ``pooled_history`` the table of an id space with a history
        also serves that history, and with ``pooled_lists`` the lists of that space (features
        ``[item, item_history]``, mean pooling: the bag of the single target id is its row, a list's bag the mean of
        its rows)."""
        lists: Dict[str, List[str]] = {}
        for key, f in self.pooled_history_fields if not self.managed else []:
            lists.setdefault(f.name, []).append(key)
        managed = {s.name for s in self.managed_spaces}
        return [
            EmbeddingBagConfig(
                name=f.table_name,
                embedding_dim=self.static_dim,
                num_embeddings=f.num_embeddings,
                feature_names=[f.name, *lists.get(f.name, [])],
                pooling=PoolingType.MEAN if f.name in lists else PoolingType.SUM,
                **self._init_range(),
            )
            for f in self.static_fields
            if f.name not in managed
        ]

    def embedding_configs(self) -> List[EmbeddingConfig]:
        """One unpooled table per id space with a history, shared by target and history (none under ``managed``)."""
        if self.managed:
            return []
        return [
            EmbeddingConfig(
                name=s.table_name,
                embedding_dim=self.sequence_dim,
                num_embeddings=s.num_embeddings,
                feature_names=[s.name, s.history_key],
            )
            for s in self.sequence_spaces
        ]

    def managed_parts(self, static: bool, sequence: bool) -> Dict[str, Tuple[int, int]]:
        """Managed space -> widths ``(static part, sequence part)`` of its rows for a model with a static and/or a
        sequence arch: ``static_dim`` for every space the static arch reads, ``sequence_dim`` for spaces with a
        history the sequence arch reads; spaces neither reads are left out."""
        parts = {}
        for s in self.managed_spaces:
            widths = (self.static_dim if static else 0, self.sequence_dim if sequence and s.history_key else 0)
            if sum(widths):
                parts[s.name] = widths
        return parts

    def managed_embedding_configs(self, static: bool, sequence: bool) -> List[EmbeddingConfig]:
        """One table per managed space a model with a static and/or a sequence arch reads (:meth:`managed_parts`),
        rows ``[static part | sequence part]``, for one ``ManagedCollisionEmbeddingCollection``: features its target
        key and, when an arch reads it, its history key (the sequence arch, or the static one with
        ``pooled_history``)."""
        spaces = {s.name: s for s in self.managed_spaces}
        configs = []
        for name, (static_width, sequence_width) in self.managed_parts(static, sequence).items():
            history = spaces[name].history_key
            reads_history = history is not None and (sequence_width > 0 or (static and self.pooled_history))
            configs.append(EmbeddingConfig(
                name=spaces[name].table_name,
                embedding_dim=static_width + sequence_width,
                num_embeddings=spaces[name].rows,
                feature_names=[name, history] if reads_history else [name],
                **self._init_range(),
            ))
        return configs

    def _init_range(self) -> Dict[str, float]:
        """``weight_init_min/max`` of ``table_init_scale`` (empty: TorchRec's default)."""
        if self.table_init_scale is None:
            return {}
        return {"weight_init_min": -self.table_init_scale, "weight_init_max": self.table_init_scale}


def _table_size(name: str, column: str, vocab_sizes: Mapping[str, int]) -> int:
    if column in TIME_FIELDS:
        return TIME_FIELDS[column]
    size: Optional[int] = vocab_sizes.get(name)
    if size is None:
        raise ConfigError(
            f"config key 'features.id_spaces.{name}': no vocabulary/table size for id space {name!r} "
            f"(known: {sorted(vocab_sizes)})"
        )
    if size < NUM_RESERVED_INDICES + 1:
        raise ConfigError(f"config key 'features.id_spaces.{name}': table size {size} is too small")
    return int(size)
