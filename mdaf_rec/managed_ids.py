"""Managed ids: raw 64-bit ids remapped to table rows inside the model by TorchRec's managed-collision stack.

TorchRec's ``MCHManagedCollisionModule`` keeps, per table, a sorted array of the (hashed) raw ids that own a
row, the row of each, and the eviction policy's counters (LRU: last access step, LFU: counts,
distance-LFU: both); ids it has not admitted map to its last row (the "miss" row). Training batches update it
(admission and eviction every ``eviction_interval`` steps); in ``eval()`` it only remaps. Inside a
``ManagedCollisionEmbeddingCollection`` the remapping is part of the model: DMP shards it row-wise with the
table (each rank owns the ids whose hash falls in its range and the rows of its shard), its buffers are in the
``state_dict`` (``ShardedTensor`` s under DMP) and so in the DCP checkpoint.

This module holds the three pieces the project adds to that stack (``docs/architecture.md``, "Managed ids"):

* :func:`hash_ids` — the input hash: splitmix64 of the raw id (the bits of ``vocab.stable_hash``),
  so that row-wise sharding, which splits the input range ``[0, 2**63 - 1)`` into equal blocks, gets an even
  share of ids on every rank whatever the raw ids look like (unhashed, ids below ``2**62`` all land on rank
  0 of 2);
* :class:`ManagedEmbeddingCollectionSharder` — TorchRec's MC-EC sharder made to run on CPU: TorchRec resets
  the evicted rows' optimizer state with ``fbgemm::reset_weight_momentum``, which has no CPU kernel in
  fbgemm-gpu-cpu 1.8 (``NotImplementedError`` at the first eviction with ``rowwise_adagrad``), and offers the
  planner GPU-only kernels;
* :func:`remap` — the remapping frozen for serving: the admitted ids and their rows, a binary search per id, a
  miss to the miss row of the shard that owned it in training (:class:`ShardLayout`); no admission, no eviction.
  :class:`FrozenIdMap` holds it as a module (:func:`frozen_id_maps`: one per table of a model holding a
  checkpoint); an exported MODEL_DIR holds it as memory-mapped files (:mod:`mdaf_rec.tables`, ``id_maps/``);
* :func:`reshard_remapping` — a remapping trained on one world size laid out for another (each id, its counters and
  its row's embedding to the shard that owns its hashed id there), for a resume or warm start across world sizes;
* :func:`size_history_buffers` — the buffer of ids seen between eviction rounds sized from the batch, not from
  the first batch (TorchRec's choice, which silently leaves later ids out of admission);
* :func:`managed_fingerprint` / :func:`check_managed_settings` — what a checkpoint records of its managed settings
  in place of the vocabulary fingerprint, and the check of it; :func:`check_remapping_world_size` — a checkpoint's
  remapping is loaded through DCP on the world size it was trained on only.

``features.id_mapping: managed`` wires them into the models (:class:`mdaf_rec.models.embeddings.ManagedIdArch`),
the sharders, training and serving.
"""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torchrec.distributed.mc_embedding import (
    ManagedCollisionEmbeddingCollectionSharder,
    ShardedManagedCollisionEmbeddingCollection,
)
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor

from mdaf_rec.config import FeaturesConfig
from mdaf_rec.errors import UserError

#: Eviction policy names -> TorchRec's MCH policies.
EVICTION_POLICIES = {
    "lru": LRU_EvictionPolicy,
    "lfu": LFU_EvictionPolicy,
    "distance_lfu": DistanceLFU_EvictionPolicy,
}

#: The hashed ids' range ``[0, INPUT_HASH_SIZE)``; ``INPUT_HASH_SIZE`` itself (int64 max) marks an empty slot.
INPUT_HASH_SIZE = (1 << 63) - 1

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 ``x``."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash_ids(ids: torch.Tensor, input_hash_size: int = INPUT_HASH_SIZE) -> torch.Tensor:
    """splitmix64 of int64 ids reduced to ``[0, input_hash_size)``: ``[N] -> [N]`` int64.

    Bit-identical to ``mdaf_rec.data.vocab.stable_hash`` (int64 arithmetic wraps around like uint64), then the
    sign bit dropped and the remainder taken. The signature is TorchRec's ``input_hash_func``.
    """
    x = ids.long() + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (x & INPUT_HASH_SIZE) % input_hash_size


#: Prefix of the id-mapping fingerprint a checkpoint records under ``managed`` (``TrainState.vocab_fingerprint``).
MANAGED_FINGERPRINT_PREFIX = "managed:"


class ManagedSettingsError(UserError, ValueError):
    """A checkpoint was trained with other managed id settings (or with vocabularies) than the config asks."""


def managed_fingerprint(cfg: FeaturesConfig) -> str:
    """What a checkpoint records in place of the vocabulary fingerprint under ``managed``: the prefix and a sha256 of
    every id space's column, history column, rows and eviction settings (config order); the remapping itself is in
    the checkpoint."""
    settings = {name: [s.column, s.history_column, s.rows, s.eviction, s.eviction_interval]
                for name, s in cfg.id_spaces.items()}
    return MANAGED_FINGERPRINT_PREFIX + hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def check_managed_settings(recorded: Optional[str], cfg: FeaturesConfig, what: str) -> None:
    """Raises :class:`ManagedSettingsError` unless ``recorded`` (a checkpoint's fingerprint; ``None``: not recorded,
    accepted) is :func:`managed_fingerprint` of ``cfg``."""
    if recorded is None or recorded == managed_fingerprint(cfg):
        return
    trained = "vocabularies" if not recorded.startswith(MANAGED_FINGERPRINT_PREFIX) else "other managed id settings"
    raise ManagedSettingsError(
        f"{what} was trained with {trained} than features.id_spaces (rows, eviction) of features.id_mapping=managed "
        "ask: ids would map to other rows"
    )


def check_remapping_world_size(recorded: Optional[int], world_size: int, what: str) -> None:
    """Raises :class:`ManagedSettingsError` unless ``what``, a managed checkpoint trained on ``recorded`` processes
    (``None``: not recorded, 1), is loaded into a model sharded over ``world_size``: the remapping is row-wise
    sharded by hashed id, and DCP's resharding does not move its ids (1 -> 2 processes: TorchRec refuses;
    2 -> 1: ids silently lose their rows). For loads through DCP (``mdaf-rec eval``); resume and warm start
    reshard the remapping themselves (:func:`reshard_remapping`)."""
    trained_on = recorded or 1
    if trained_on != world_size:
        raise ManagedSettingsError(
            f"{what}: its managed-id remapping was trained on {trained_on} processes and is not resharded for "
            f"{world_size} (ids would lose their rows): run on {trained_on} (`mdaf-rec export` serves it anywhere)"
        )


def managed_collision_module(
    rows: int,
    eviction: str,
    eviction_interval: int,
    device: torch.device,
    name: Optional[str] = None,
    buckets: int = 1,
) -> MCHManagedCollisionModule:
    """An MCH module over hashed raw ids for a table of ``rows`` rows (the last one is the miss row).

    Args:
        rows: table rows (``rows - 1`` ids can own a row).
        eviction: a key of :data:`EVICTION_POLICIES`.
        eviction_interval: training steps between admission/eviction rounds.
        device: device of its buffers.
        name: the table it maps for.
        buckets: equal blocks of the hashed input range that row-wise sharding hands to the ranks; TorchRec's
            planner refuses to shard the table over a world size that does not divide it.
    """
    if eviction not in EVICTION_POLICIES:
        raise ValueError(f"eviction policy {eviction!r} is not one of {sorted(EVICTION_POLICIES)}")
    policy: MCHEvictionPolicy = EVICTION_POLICIES[eviction]()
    return MCHManagedCollisionModule(
        zch_size=rows,
        device=device,
        eviction_policy=policy,
        eviction_interval=eviction_interval,
        input_hash_size=INPUT_HASH_SIZE,
        input_hash_func=hash_ids,
        name=name,
        buckets=buckets,
    )


def size_history_buffers(mch: MCHManagedCollisionModule, ids_per_step: int) -> None:
    """Sizes ``mch``'s buffer of the ids seen between eviction rounds for ``ids_per_step`` ids a training step.

    TorchRec sizes it at the first training batch (1.25 x its ids x ``eviction_interval``) and silently leaves
    out of admission the ids of a later round beyond it (a batch with longer histories), so what is admitted
    would depend on which batch came first (a resumed run starts on another one). Sized here from the most ids a
    step can bring (batch size x ids per sample), the same in every run and never exceeded.
    """
    mch._init_history_buffers({"bound": JaggedTensor(values=torch.empty(ids_per_step, dtype=torch.int64),
                                                     lengths=torch.tensor([ids_per_step]))})


class _HostResetShardedMCEC(ShardedManagedCollisionEmbeddingCollection):
    """TorchRec's sharded MC-EC; on CPU, evicted rows are reset here instead of by ``reset_weight_momentum``.

    An evicted row gets its table's initial values again (as TorchRec does) and zero optimizer state (what
    ``fbgemm::reset_weight_momentum`` does on GPU), through the views FBGEMM's ``split_embedding_weights`` and
    ``split_optimizer_states`` give of the host buffers.
    """

    def _evict(self, evictions_per_table: Dict[str, Optional[torch.Tensor]]) -> None:
        if self._device.type != "cpu":
            super()._evict(evictions_per_table)
            return
        for table, rows in evictions_per_table.items():
            if rows is None or rows.numel() == 0:
                continue
            rows = rows.long()
            tbe, table_index = self._table_to_tbe_and_index[table]
            index = int(table_index)
            with torch.no_grad():
                states = tbe.split_optimizer_states()  # [] for sgd, which keeps no state
                for state in states[index] if states else ():
                    state[rows] = 0
                weight = tbe.split_embedding_weights()[index]
                init_fn = self._embedding_module._table_name_to_config[table].init_fn
                weight[rows] = init_fn(weight[rows].clone())


class ManagedEmbeddingCollectionSharder(ManagedCollisionEmbeddingCollectionSharder):
    """TorchRec's ``ManagedCollisionEmbeddingCollectionSharder`` (row-wise only) made to work on CPU.

    * Its sharded module also evicts on CPU (see :class:`_HostResetShardedMCEC`).
    * It offers the planner only the compute kernels the embedding sharder has on the device: TorchRec's lists
      ``fused_uvm_caching`` / ``fused_uvm`` / ``key_value`` on every device, and the planner's CPU estimator
      stops on them ("Unrecognized or unsupported compute kernel: fused_uvm").
    """

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        available = set(self._e_sharder.compute_kernels(sharding_type, compute_device_type))
        return [k for k in super().compute_kernels(sharding_type, compute_device_type) if k in available]

    def shard(
        self,
        module: ManagedCollisionEmbeddingCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedManagedCollisionEmbeddingCollection:
        return _HostResetShardedMCEC(
            module,
            params,
            ec_sharder=self._e_sharder,  # type: ignore[arg-type]
            mc_sharder=self._mc_sharder,
            env=env,
            device=device or torch.device("cuda"),
        )


class ShardLayout(NamedTuple):
    """Where a remapping sends the ids it has no row for: the miss row of the shard that owns the hashed id.

    Row-wise sharding over ``W`` processes hands shard ``k`` the ``k``-th ``W``-th of the ``buckets`` equal blocks of
    the hashed range (bucket ``h // bucket_size``) and rows ``[segments[k], segments[k + 1])``; its miss row is the
    last of them. Unsharded (``W = 1``) that is the table's last row, what the MCH module does in ``eval()``.

    Attributes:
        miss_rows: ``[W]`` the miss row of each shard.
        bucket_size: ``ceil(INPUT_HASH_SIZE / buckets)``.
        buckets_per_shard: ``buckets / W``.
    """

    miss_rows: List[int]
    bucket_size: int
    buckets_per_shard: int


def shard_layout(rows: int, buckets: int, segments: Sequence[int]) -> ShardLayout:
    """The :class:`ShardLayout` of a remapping of ``rows`` rows in ``buckets`` buckets trained on shards whose row
    boundaries are ``segments`` (``[0, ..., rows]``; ``[k R / W]`` for ``W`` processes)."""
    shards = len(segments) - 1
    if shards < 1 or segments[0] != 0 or segments[-1] != rows or buckets % shards:
        raise ValueError(f"shard boundaries {list(segments)} do not split {rows} rows in {buckets} buckets")
    return ShardLayout([int(s) - 1 for s in segments[1:]], -(-INPUT_HASH_SIZE // buckets), buckets // shards)


def world_segments(rows: int, world_size: int) -> List[int]:
    """The row boundaries ``[k R / W]`` row-wise sharding gives ``world_size`` processes (rows are a multiple of the
    world size)."""
    return [rows * k // world_size for k in range(world_size + 1)]


def remap(
    hashed: torch.Tensor, sorted_ids: torch.Tensor, rows: torch.Tensor, miss_rows: torch.Tensor, layout: ShardLayout
) -> torch.Tensor:
    """The frozen remapping: hashed ids -> table rows, no admission, no eviction.

    Args:
        hashed: :func:`hash_ids` of raw ids, any shape.
        sorted_ids: ``[N]`` the hashed ids that own a row, ascending (no empty slots).
        rows: ``[N]`` the row of each.
        miss_rows: ``layout.miss_rows`` as an int64 tensor.
        layout: where an id without a row goes.
    Returns:
        int64 rows, the shape of ``hashed``: an id's own row, else its shard's miss row.
    """
    shard = torch.div(hashed, layout.bucket_size, rounding_mode="floor") // layout.buckets_per_shard
    miss = miss_rows[shard]
    if sorted_ids.numel() == 0:
        return miss
    position = torch.searchsorted(sorted_ids, hashed).clamp(max=sorted_ids.numel() - 1)
    return torch.where(sorted_ids[position] == hashed, rows[position], miss)


#: An MCH module's buffers of the ids with a row and of their rows (its ``_mch_<metadata>`` counters align with them).
SORTED_IDS, ROW_MAPPING = "_mch_sorted_raw_ids", "_mch_remapped_ids_mapping"


def reshard_remapping(
    buffers: Dict[str, torch.Tensor], source_segments: Sequence[int], target_segments: Sequence[int], buckets: int
) -> tuple[Dict[str, torch.Tensor], torch.Tensor, int]:
    """A remapping trained row-wise sharded with row boundaries ``source_segments``, laid out for
    ``target_segments`` (another world size): each id with a row moves to the shard that owns its hashed id there,
    with its counters.

    Target shard ``j`` (rows ``[a, b)``) takes its ids in ascending order on rows ``a, a + 1, ...``, keeping at most
    ``b - a - 1`` (its last row is its miss row): when more of them had rows, those the eviction policy values most
    are kept (highest ``_mch_counts``, then most recent ``_mch_last_access_iter``, then the smaller hashed id); the
    others lose their row (as an evicted id). Its empty slots map to its unused rows, as a fresh module's do.

    Args:
        buffers: the full arrays (every shard's, one after the other) of ``_mch_sorted_raw_ids``,
            ``_mch_remapped_ids_mapping`` and the ``_mch_<metadata>`` counters, ``[R]`` each.
        source_segments: the source shards' row boundaries ``[0, ..., R]``.
        target_segments: the target shards' row boundaries.
        buckets: the module's buckets (:func:`shard_layout`).
    Returns:
        ``(the buffers in the target layout, source_rows [R]: the source row each target row takes its embedding
        from (a miss row the miss row of the source shard that owned the start of its hashed range; an unused row
        itself), ids that lost their row)``.
    """
    ids, rows = buffers[SORTED_IDS], buffers[ROW_MAPPING]
    total = ids.numel()
    source = shard_layout(total, buckets, source_segments)
    target = shard_layout(total, buckets, target_segments)
    owned = ids != INPUT_HASH_SIZE
    shard = torch.div(ids[owned], target.bucket_size, rounding_mode="floor") // target.buckets_per_shard
    counters = [name for name in ("_mch_counts", "_mch_last_access_iter") if name in buffers]
    out = {name: torch.zeros_like(value) for name, value in buffers.items()}
    out[SORTED_IDS] = torch.full_like(ids, INPUT_HASH_SIZE)
    out[ROW_MAPPING] = torch.arange(total, dtype=rows.dtype)
    source_rows = torch.arange(total, dtype=torch.int64)
    dropped = 0
    for j, (a, b) in enumerate(zip(target_segments[:-1], target_segments[1:])):
        mine = torch.nonzero(owned).flatten()[shard == j]  # slots of the ids target shard j owns
        order = torch.argsort(ids[mine], stable=True)  # tie-break: the smaller hashed id
        for name in reversed(counters):  # most valued first: counts, then last access
            order = order[torch.argsort(buffers[name][mine][order], descending=True, stable=True)]
        kept = mine[order[: b - a - 1]]
        dropped += mine.numel() - kept.numel()
        kept = kept[torch.argsort(ids[kept])]
        n = kept.numel()
        out[SORTED_IDS][a : a + n] = ids[kept]
        for name in buffers:
            if name not in (SORTED_IDS, ROW_MAPPING):
                out[name][a : a + n] = buffers[name][kept]
        source_rows[a : a + n] = rows[kept]
        first_bucket = j * target.buckets_per_shard
        source_rows[b - 1] = source.miss_rows[first_bucket // source.buckets_per_shard]
    return out, source_rows, dropped


class FrozenIdMap(nn.Module):
    """The remapping of an MCH module frozen for serving: raw ids -> table rows (:func:`remap` of :func:`hash_ids`).

    Built from the module's (unsharded) state: the hashed ids that own a row and their rows. An id with a row maps
    to it; an id without one (new, or evicted) maps to the miss row it had in training (:class:`ShardLayout`).

    Args:
        mch: the trained module, unsharded (its ``_mch_sorted_raw_ids`` / ``_mch_remapped_ids_mapping`` are
            copied; a state loaded from ``W`` shards is the shards' arrays one after the other).
        segments: the row boundaries of the ``W`` shards it was trained in, ``[0, ..., rows]`` (the
            checkpoint's ``_output_segments_tensor`` up to its ``-1`` padding); default: unsharded.
    """

    def __init__(self, mch: MCHManagedCollisionModule, segments: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        rows = mch.output_size()
        self.layout = shard_layout(rows, mch.buckets(), list(segments) if segments is not None else [0, rows])
        ids = mch._mch_sorted_raw_ids.detach().cpu()
        owned = ids != INPUT_HASH_SIZE  # INPUT_HASH_SIZE: an empty slot
        order = torch.argsort(ids[owned], stable=True)  # a state loaded from shards is sorted per shard only
        self.register_buffer("sorted_ids", ids[owned][order].clone())  # [N] hashed ids
        self.register_buffer("rows", mch._mch_remapped_ids_mapping.detach().cpu()[owned][order].clone())  # [N]
        self.register_buffer("miss_rows", torch.tensor(self.layout.miss_rows, dtype=torch.int64))  # [W]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids: raw int64 ids, any shape.
        Returns:
            int64 rows, the shape of ``ids``.
        """
        return remap(hash_ids(ids), self.sorted_ids, self.rows, self.miss_rows, self.layout)


def frozen_id_maps(model: nn.Module, world_size: int) -> Dict[str, FrozenIdMap]:
    """Table name -> :class:`FrozenIdMap` of each remapping in ``model``, an unsharded model holding a trained
    checkpoint's state (its MCH buffers are the shards' arrays one after the other), trained on ``world_size``
    processes: row-wise sharding gave process ``k`` rows ``[k R / W, (k + 1) R / W)`` (rows are a multiple of the
    world size), and its miss row the last of them."""
    maps: Dict[str, FrozenIdMap] = {}
    for module in model.modules():
        if isinstance(module, MCHManagedCollisionModule):
            maps[str(module._name)] = FrozenIdMap(module, world_segments(module.output_size(), world_size))
    return maps
