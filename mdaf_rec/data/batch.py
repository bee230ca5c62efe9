"""The model input: one mini-batch of impressions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

if TYPE_CHECKING:
    from mdaf_rec.features import FeatureSpec

_IS_FX_TRACING_NOTICE = "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"


class _DropIsFxTracingNotice(logging.Filter):
    """Drops torch.fx's "is_fx_tracing will return true for both ..." warning, and only that record.

    Its caller is torch itself: ``torch.fx.ProxyableClassMeta.__call__``, the metaclass of TorchRec's
    ``KeyedJaggedTensor``, calls the deprecated ``is_fx_tracing()`` on every KJT construction (this module
    builds the KJTs of train, eval and predict), and its first call in each process logs this advice meant
    for torch's own code. Nothing here can act on it; torch 2.13, torchrec 1.8.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_IS_FX_TRACING_NOTICE)


logging.getLogger("torch.fx._symbolic_trace").addFilter(_DropIsFxTracingNotice())


@dataclass
class Batch(Pipelineable):
    """A mini-batch as the loader produces it and every model consumes it.

    Ids are vocabulary indices (0 = padding, 1 = out-of-vocabulary), never raw ids; under
    ``features.id_mapping: managed`` the ids of managed id spaces are raw ids (the model remaps them) and
    ``static_features`` holds every history too (the managed lookup reads that one KJT).

    Attributes:
        static_features: pooled lookups for the static branch, one key per static field (``user``,
            ``item``, ``category``, ``hour``, ``dayofweek``, extras; one id per sample), then, with
            ``features.pooled_history`` or ``managed``, each history (key ``item_history``, 0..max_history
            ids; with ``pooled_history`` mean-pooled in the id space's static table), then each
            ``features.pooled_lists`` column (key = column, 0..max_history ids, mean-pooled the same way). Batch B.
        sequence_features: unpooled lookups for the sequential branch: for each id space with a
            history, its target (key ``item``, length 1) and its history (key ``item_history``,
            length 0..max_history, most recent last). Target and history share one table.
        dense_features: ``[B, num_dense]`` float32 (``num_dense`` may be 0).
        labels: ``[B]`` float32 in {0, 1}.
        user_id: ``[B]`` int64 RAW user id (the ``user`` column, not its table index; zeros without a
            ``user`` space), the group of per-user metrics (GAUC): ids that share a table row (unseen,
            out-of-vocabulary, hashed or evicted users) stay apart.
        row_index: ``[B]`` int64 row number within the split, to join predictions back.
    """

    static_features: KeyedJaggedTensor
    sequence_features: KeyedJaggedTensor
    dense_features: torch.Tensor
    labels: torch.Tensor
    user_id: torch.Tensor
    row_index: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            static_features=self.static_features.to(device=device, non_blocking=non_blocking),
            sequence_features=self.sequence_features.to(device=device, non_blocking=non_blocking),
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            user_id=self.user_id.to(device=device, non_blocking=non_blocking),
            row_index=self.row_index.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.static_features.record_stream(stream)
        self.sequence_features.record_stream(stream)
        self.dense_features.record_stream(stream)
        self.labels.record_stream(stream)
        self.user_id.record_stream(stream)
        self.row_index.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            static_features=self.static_features.pin_memory(),
            sequence_features=self.sequence_features.pin_memory(),
            dense_features=self.dense_features.pin_memory(),
            labels=self.labels.pin_memory(),
            user_id=self.user_id.pin_memory(),
            row_index=self.row_index.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


def build_kjt(keys: List[str], values: List[torch.Tensor], lengths: List[torch.Tensor]) -> KeyedJaggedTensor:
    """A KJT from per-key ids and per-key lengths.

    Args:
        keys: feature keys, in order.
        values: per key, the ids of all samples concatenated (int64).
        lengths: per key, ``[B]`` number of ids of each sample.
    Returns:
        The ``KeyedJaggedTensor`` (values key-major, then sample-major, as TorchRec expects).
    """
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values).long(), lengths=torch.cat(lengths).int()
    )


def build_batch(
    spec: "FeatureSpec",
    static_ids: Sequence[torch.Tensor],
    target_ids: Sequence[torch.Tensor],
    history_ids: Sequence[torch.Tensor],
    history_lengths: torch.Tensor,
    dense_features: torch.Tensor,
    labels: torch.Tensor,
    row_index: torch.Tensor,
    user_ids: torch.Tensor,
    list_ids: Sequence[torch.Tensor] = (),
    list_lengths: Sequence[torch.Tensor] = (),
) -> Batch:
    """A :class:`Batch` from vocabulary indices (raw ids for managed spaces): the one place the feature KJTs are
    laid out.

    Args:
        spec: the feature spec (keys, ``pooled_history``).
        static_ids: per static field (``spec.static_fields`` order), ``[B]`` indices.
        target_ids: per sequence id space (``spec.sequence_spaces`` order), ``[B]`` target indices.
        history_ids: per sequence id space, the histories of all samples concatenated (most recent last).
        history_lengths: ``[B]`` history length of each sample (shared by the id spaces).
        dense_features: ``[B, N_dense]`` float32.
        labels: ``[B]`` float32.
        row_index: ``[B]`` int64 row numbers.
        user_ids: ``[B]`` int64 raw user ids (``Batch.user_id``; zeros without a ``user`` space).
        list_ids: per ``spec.pooled_lists`` column, its indices of all samples concatenated (most recent last).
        list_lengths: per ``spec.pooled_lists`` column, ``[B]`` list length of each sample (each list its own).
    Returns:
        The batch: static KJT (one id per field, then the histories and lists ``spec.static_history_keys``),
        sequence KJT (target, history per id space), ``user_id`` = ``user_ids``.
    """
    ones = torch.ones_like(history_lengths)
    static_values, static_lengths = list(static_ids), [ones] * len(static_ids)
    if spec.pooled_history or spec.managed:
        static_values += list(history_ids)
        static_lengths += [history_lengths] * len(history_ids)
    static_values += list(list_ids)
    static_lengths += list(list_lengths)
    sequence_values: List[torch.Tensor] = []
    sequence_lengths: List[torch.Tensor] = []
    for target, history in zip(target_ids, history_ids):
        sequence_values += [target, history]
        sequence_lengths += [ones, history_lengths]
    return Batch(
        static_features=build_kjt(spec.static_input_keys, static_values, static_lengths),
        sequence_features=build_kjt(spec.sequence_keys, sequence_values, sequence_lengths),
        dense_features=dense_features,
        labels=labels,
        user_id=user_ids.long(),
        row_index=row_index,
    )
