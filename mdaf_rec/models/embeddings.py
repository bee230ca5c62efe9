"""Sparse archs: TorchRec embedding lookups that turn a :class:`~mdaf_rec.data.batch.Batch` into tensors.

* :class:`StaticEmbeddingArch` — pooled lookups through an ``EmbeddingBagCollection`` (one table per
  static field) plus dense fields, returned as DCNv3 field embeddings ``[B, F, static_dim]``.
* :class:`SequenceEmbeddingArch` — unpooled lookups through an ``EmbeddingCollection`` (one table per
  id space, shared by target and history) returned as right-padded token sequences
  ``[B, max_history + 1, sequence_dim]`` whose last valid token is the target.
* :class:`ManagedIdArch` — under ``features.id_mapping: managed``: the lookups of every managed id space, static
  and sequence, through one ``ManagedCollisionEmbeddingCollection`` (one table per space, rows
  ``[static part | sequence part]``) over the raw ids of ``Batch.static_features``; the model runs it once and hands
  the parts to the two archs above (their own tables are then the time fields' only).

Tables are built on ``device`` (``meta`` for DMP, which materialises and shards them); the small
dense parts on the default device (set with ``with torch.device(...)``). Outputs are read by key, never by position: a sharding plan reorders
the keys of a pooled ``KeyedTensor``.

The forwards never wait for the device (no ``.item()``, ``int(t)``, ``torch.equal`` on the hot path):
ids and history lengths are validated where data enters, by :func:`check_static_features` and
:func:`check_sequence_features` (the research-code wrapper calls them; the training loader produces
vocabulary indices, in range by construction). An id outside its table on a GPU is a device-side
assert, not a one-line error, so code feeding the model from elsewhere calls them too.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from mdaf_rec.errors import UserError
from mdaf_rec.features import FeatureSpec
from mdaf_rec.managed_ids import managed_collision_module, size_history_buffers


class InputIdError(UserError, ValueError):
    """An id is outside its table's range (the message names the feature)."""


def check_id_ranges(features: KeyedJaggedTensor, sizes: List[Optional[int]], kind: str) -> None:
    """Raises :class:`InputIdError` naming the feature if any id is outside ``[0, size)``.

    Args:
        features: a KJT whose keys map, in order, to tables of ``sizes`` rows.
        sizes: table rows per key; ``None`` for a managed key (raw ids, remapped in the model: any int64).
        kind: ``static`` or ``sequence``, for the message.
    """
    values = features.values()
    if values.numel() == 0:
        return
    per_key = torch.split(values, features.length_per_key())
    for key, ids, size in zip(features.keys(), per_key, sizes):
        if ids.numel() == 0 or size is None:
            continue
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise InputIdError(
                f"{kind} feature {key!r}: id {bad} is outside its table's range [0, {size}) "
                "(ids must be vocabulary indices; unknown raw ids map to the OOV index 1)"
            )


def check_static_features(features: KeyedJaggedTensor, spec: FeatureSpec) -> None:
    """Validates the static KJT of a batch: keys in spec order (``spec.static_input_keys``), one in-range id per
    sample and static field, at most ``max_history`` in-range ids per history (managed keys: any id).

    Raises:
        InputIdError: naming the feature (host syncs: call it where data enters, not in a forward).
    """
    _check_keys(features, spec.static_input_keys, "static")
    per_key = features.to_dict()
    for key in spec.static_keys:
        if not bool((per_key[key].lengths() == 1).all()):
            raise InputIdError(f"static feature {key!r}: every sample needs exactly one id")
    for key in spec.static_history_keys:
        lengths = per_key[key].lengths()
        if lengths.numel() and int(lengths.max()) > spec.max_history:
            raise InputIdError(
                f"static feature {key!r}: a history has {int(lengths.max())} entries, more than "
                f"max_history={spec.max_history}"
            )
    check_id_ranges(features, [spec.static_table_rows(k) for k in spec.static_input_keys], "static")


def check_sequence_features(features: KeyedJaggedTensor, spec: FeatureSpec) -> None:
    """Validates the sequence KJT of a batch: keys in spec order, in-range ids, one target per sample and
    id space, at most ``max_history`` history entries, equal history lengths across id spaces.

    Raises:
        InputIdError: naming the feature (host syncs: call it where data enters, not in a forward).
    """
    _check_keys(features, spec.sequence_keys, "sequence")
    sizes = [None if spec.managed else s.num_embeddings for s in spec.sequence_spaces for _ in (0, 1)]
    check_id_ranges(features, sizes, "sequence")
    per_key = features.to_dict()
    first = spec.sequence_spaces[0].history_key
    for space in spec.sequence_spaces:
        hist_len = per_key[space.history_key].lengths()
        if hist_len.numel() and int(hist_len.max()) > spec.max_history:
            raise InputIdError(
                f"sequence feature {space.history_key!r}: a history has {int(hist_len.max())} entries, more than "
                f"max_history={spec.max_history} (the loader keeps the most recent {spec.max_history})"
            )
        if not bool((per_key[space.name].lengths() == 1).all()):
            raise InputIdError(f"sequence feature {space.name!r}: every sample needs exactly one target id")
        if not torch.equal(per_key[first].lengths(), hist_len):
            raise InputIdError(f"sequence features {first!r} and {space.history_key!r} have unequal history lengths")


def _check_keys(features: KeyedJaggedTensor, expected: List[str], kind: str) -> None:
    if list(features.keys()) != expected:
        raise InputIdError(f"{kind} features: keys {list(features.keys())}, expected {expected} (in this order)")


def append_target(
    history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Writes each target right after its history.

    Args:
        history: ``[B, L, D]`` right-padded (zeros) history embeddings.
        target: ``[B, D]`` target embeddings.
        lengths: ``[B]`` int64 history lengths.
    Returns:
        tokens ``[B, L + 1, D]`` (right-padded with zeros) and their lengths ``[B]`` (history + 1).
    """
    batch_size, _, dim = history.shape
    tokens = torch.cat([history, history.new_zeros(batch_size, 1, dim)], dim=1)  # [B, L+1, D]
    index = lengths.view(batch_size, 1, 1).expand(batch_size, 1, dim)  # [B, 1, D]
    return tokens.scatter(1, index, target.unsqueeze(1)), lengths + 1


class DenseFieldEmbedding(nn.Module):
    """Turns each dense (float) feature into a field embedding: ``e_f = t(x_f) * w_f + b_f``.

    Args:
        num_features: number of dense features ``N``.
        dim: field embedding dim ``d``.
        log1p: ``t(x) = sign(x)·log(1 + |x|)`` (for heavy-tailed values); identity otherwise.
    """

    def __init__(self, num_features: int, dim: int, log1p: bool = True) -> None:
        super().__init__()
        self.log1p = log1p
        self.weight = nn.Parameter(torch.empty(num_features, dim))
        self.bias = nn.Parameter(torch.empty(num_features, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.1)
        nn.init.zeros_(self.bias)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dense: ``[B, N]`` float.
        Returns:
            ``[B, N, d]``.
        """
        if self.log1p:
            dense = torch.sign(dense) * torch.log1p(dense.abs())
        return dense.unsqueeze(-1) * self.weight + self.bias  # [B, N, d]


class ManagedLookup(NamedTuple):
    """The managed lookups of one batch, split into the parts the two archs read.

    Attributes:
        static: key -> the rows' static parts (``[n, static_dim]`` per key, jagged), for the static arch.
        sequence: key -> the rows' sequence parts (``[n, sequence_dim]``), for the sequence arch.
    """

    static: Dict[str, JaggedTensor]
    sequence: Dict[str, JaggedTensor]


class ManagedIdArch(nn.Module):
    """The lookups of every managed id space through ``ManagedCollisionEmbeddingCollection`` s.

    One table per space (:meth:`FeatureSpec.managed_embedding_configs`), rows ``[static part | sequence part]``,
    in one MC-EC per row width (TorchRec's ``EmbeddingCollection`` needs one width for all its tables: in MDAF
    ``user`` has a static part only), each with its ``MCHManagedCollisionModule`` (:func:`~mdaf_rec.managed_ids.managed_collision_module`, ``buckets``
    = rows: any world size dividing the rows can shard it), so a space's static and sequence lookups share one
    remapping and an evicted row is reset in both parts. It reads the raw ids of ``Batch.static_features``
    (targets and histories; the time-field keys there are not its).

    Args:
        spec: the feature spec (``managed_spaces``).
        static: the model has a static arch (its rows get a ``static_dim`` part).
        sequence: the model has a sequence arch (rows of spaces with a history get a ``sequence_dim`` part).
        device: device of the table (``meta`` for DMP); the remapping's buffers are on it, or on the CPU for
            ``meta`` (DMP rebuilds them on the training device).
    """

    def __init__(self, spec: FeatureSpec, static: bool, sequence: bool, device: torch.device | None = None) -> None:
        super().__init__()
        configs = spec.managed_embedding_configs(static, sequence)
        spaces = {s.table_name: s for s in spec.managed_spaces}
        buffers = device if device is not None and device.type != "meta" else torch.device("cpu")
        remapping = {
            c.name: managed_collision_module(c.num_embeddings, spaces[c.name].eviction, spaces[c.name].eviction_interval,
                                             buffers, c.name, buckets=c.num_embeddings)
            for c in configs
        }
        widths = sorted({c.embedding_dim for c in configs})  # an EmbeddingCollection's tables share one width
        self.mc_embedding_collections = nn.ModuleDict({
            f"width_{w}": ManagedCollisionEmbeddingCollection(
                EmbeddingCollection(tables=[c for c in configs if c.embedding_dim == w], device=device),
                ManagedCollisionCollection({c.name: remapping[c.name] for c in configs if c.embedding_dim == w},
                                           [c for c in configs if c.embedding_dim == w]),
            )
            for w in widths
        })
        parts = spec.managed_parts(static, sequence)
        self.parts: Dict[str, Tuple[int, int]] = parts  # space -> (static width, sequence width) of its rows
        space_of = {s.table_name: s.name for s in spec.managed_spaces}
        self._collection_of = {key: f"width_{c.embedding_dim}" for c in configs for key in c.feature_names}
        # table -> most ids one sample brings (its target, and its history when read)
        self._ids_per_sample = {c.name: 1 + spec.max_history * (len(c.feature_names) - 1) for c in configs}
        # key -> (static width, sequence width) of the rows it reads
        self._parts: Dict[str, Tuple[int, int]] = {
            key: parts[space_of[c.name]] for c in configs for key in c.feature_names
        }

    def size_history_buffers(self, global_batch_size: int) -> None:
        """Sizes the remapping's buffer of ids seen between eviction rounds for ``global_batch_size`` samples a step
        (:func:`~mdaf_rec.managed_ids.size_history_buffers`; a shard's remapping may see every rank's ids). Call it
        once the model is sharded (DMP rebuilds the remapping modules per shard)."""
        for module in self.modules():
            if isinstance(module, MCHManagedCollisionModule):
                table = module._name
                size_history_buffers(module, global_batch_size * self._ids_per_sample[table])

    def forward(self, static_features: KeyedJaggedTensor) -> ManagedLookup:
        """
        Args:
            static_features: ``Batch.static_features`` with raw ids (``spec.static_input_keys``).
        Returns:
            The static and sequence parts of every managed key's rows.
        """
        # per collection: key -> JaggedTensor [n, static + sequence]
        looked_up = {name: collection(static_features)[0] for name, collection in self.mc_embedding_collections.items()}
        static: Dict[str, JaggedTensor] = {}
        sequence: Dict[str, JaggedTensor] = {}
        for key, (static_width, sequence_width) in self._parts.items():
            rows = looked_up[self._collection_of[key]][key]
            if static_width:
                part = rows.values()[:, :static_width].contiguous()
                static[key] = JaggedTensor(values=part, lengths=rows.lengths())
            if sequence_width:
                part = rows.values()[:, static_width:].contiguous()
                sequence[key] = JaggedTensor(values=part, lengths=rows.lengths())
        return ManagedLookup(static, sequence)


class StaticEmbeddingArch(nn.Module):
    """Pooled static-field embeddings for the static branch (DCNv3, DNN).

    With ``spec.pooled_history`` each history is one more field: the mean of its ids' rows in the id space's
    static table (zeros for an empty history), after the static fields.

    Under ``managed`` its own table collection holds the time fields only; the managed fields come from the
    :class:`ManagedIdArch` lookup (a target's row part as it is, a history's parts mean-pooled here).

    Args:
        spec: the feature spec (its ``static_fields`` give the tables, ``static_input_keys`` the field order).
        device: device of the tables (``meta`` to let DMP materialise them). Dense-field parameters
            go to the current default device.
    """

    def __init__(self, spec: FeatureSpec, device: torch.device | None = None) -> None:
        super().__init__()
        self._keys: List[str] = spec.static_keys + spec.pooled_history_keys
        self._pooled_histories: List[str] = spec.pooled_history_keys
        self._max_history = spec.max_history
        tables = spec.embedding_bag_configs()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=tables, device=device) if tables else None
        self.dense_fields = (
            DenseFieldEmbedding(len(spec.dense_features), spec.static_dim, spec.dense_log1p)
            if spec.dense_features
            else None
        )

    def forward(
        self, static_features: KeyedJaggedTensor, dense_features: torch.Tensor, managed: Optional[ManagedLookup] = None
    ) -> torch.Tensor:
        """
        Args:
            static_features: one id per sample for each static key, then the histories, in range
                (:func:`check_static_features`).
            dense_features: ``[B, N_dense]`` float (ignored when no dense features are configured).
            managed: the managed lookup of the batch (``managed`` mapping only).
        Returns:
            ``[B, F, static_dim]`` field embeddings: static keys, pooled histories (spec order), then dense fields.
        """
        pooled = {}
        if self.embedding_bag_collection is not None:
            pooled = self.embedding_bag_collection(static_features).to_dict()
        own = managed.static if managed is not None else {}

        def field(key: str) -> torch.Tensor:  # [B, d]
            if key not in own:
                return pooled[key]
            # managed: a target's row as it is, a pooled history the mean of its rows
            return _mean_rows(own[key], self._max_history) if key in self._pooled_histories else own[key].values()

        fields = torch.stack([field(key) for key in self._keys], dim=1)  # [B, F_sparse, d]
        if self.dense_fields is not None:
            fields = torch.cat([fields, self.dense_fields(dense_features)], dim=1)  # [B, F, d]
        return fields


def _mean_rows(rows: JaggedTensor, max_length: int) -> torch.Tensor:
    """``[B, d]`` mean of each sample's rows (zeros for none), as an ``EmbeddingBagCollection``'s MEAN pooling."""
    padded = rows.to_padded_dense(desired_length=max_length)  # [B, L, d]
    count = rows.lengths().clamp(min=1).unsqueeze(1).to(padded.dtype)  # [B, 1]
    return padded.sum(dim=1) / count


class SequenceEmbeddingArch(nn.Module):
    """Token sequences ``history ⊕ target`` for the sequential branch.

    A token is the sum of its id spaces' embeddings (item + category). Histories are right-padded to
    ``max_history`` and the target is written right after the last history entry, so the sequence of a
    sample with ``n`` history entries has ``n + 1`` valid tokens, the last one the target.

    Under ``managed`` it has no tables: the rows come from the :class:`ManagedIdArch` lookup.

    Args:
        spec: the feature spec (its ``sequence_spaces`` give the tables).
        device: device of the tables.
    """

    def __init__(self, spec: FeatureSpec, device: torch.device | None = None) -> None:
        super().__init__()
        self._spaces: List[Tuple[str, str]] = [(s.name, s.history_key) for s in spec.sequence_spaces]
        self.max_history = spec.max_history
        self.dim = spec.sequence_dim
        tables = spec.embedding_configs()
        self.embedding_collection = EmbeddingCollection(tables=tables, device=device) if tables else None

    def forward(
        self, sequence_features: KeyedJaggedTensor, managed: Optional[ManagedLookup] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            sequence_features: per id space, the target (length 1) and the history (length
                0..max_history, most recent last), as :func:`check_sequence_features` accepts.
            managed: the managed lookup of the batch (``managed`` mapping: read instead of ``sequence_features``).
        Returns:
            tokens: ``[B, max_history + 1, sequence_dim]``, right-padded with zeros.
            lengths: ``[B]`` int64 number of valid tokens (history length + 1).
        """
        if managed is not None:
            jagged = managed.sequence
        else:
            assert self.embedding_collection is not None
            jagged = self.embedding_collection(sequence_features)  # key -> JaggedTensor [sum(len), D]
        histories = [jagged[h].to_padded_dense(desired_length=self.max_history) for _, h in self._spaces]
        targets = [jagged[t].values() for t, _ in self._spaces]  # each [B, D]: one id per sample
        history = sum(histories[1:], histories[0])  # [B, L, D]
        target = sum(targets[1:], targets[0])  # [B, D]
        lengths = jagged[self._spaces[0][1]].lengths().long()  # [B]
        return append_target(history, target, lengths)
