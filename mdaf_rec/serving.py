"""The serving module: a trained CTR model behind a forward that takes plain tensors.

:class:`ServingModule` is what ``mdaf-rec export`` hands to ``torch.export``. Its inputs are dense,
fixed-rank tensors of vocabulary indices (0 = padding, 1 = out-of-vocabulary), so a server needs
no TorchRec types::

    static_ids   [B, F]     int64   one index per static field, in feature_spec.json's order
    dense        [B, N]     float32 dense features (N may be 0)
    target_ids   [B, S]     int64   target index per sequence id space (item, category, ...)
    history_ids  [B, S, L]  int64   history per id space, most recent last, right-padded with 0
    → probability [B] float32, gate [B, G] float32

``L`` is the model's ``max_history``; a history's length is its number of non-zero entries (indices
of real ids are never 0). Inside, the module builds the ``KeyedJaggedTensor`` s of a loader
:class:`~mdaf_rec.data.batch.Batch` and runs the model's own ``score``: the static KJT has one id
per sample and key, the sequence KJT the padded histories (``L`` ids per sample). Two drop-in
lookups on the trained tables keep every shape static but the batch size: :class:`StaticLookup`
(a sum-pooled bag of one id is that id's row) for the ``EmbeddingBagCollection`` and
:class:`PaddedSequenceEmbedding` (padding masked instead of dropped) for the
:class:`~mdaf_rec.models.embeddings.SequenceEmbeddingArch`. ``G`` is 1 or ``D`` (``model.gate``)
for MDAF models; models without a fusion gate return zeros ``[B, 1]``.

Under ``features.id_mapping: managed`` the inputs hold raw ids (histories right-padded with -1,
``spec.padding_id``): the model's managed-collision lookup is swapped for the same two drop-ins over its tables,
each table behind a :class:`~mdaf_rec.managed_ids.FrozenIdMap` (:class:`MappedTable`): raw ids map to the rows
training gave them, without admission or eviction.

``--quantize int8`` swaps every table for a row-wise 8-bit copy (:func:`quantize_tables`): per row,
``w ≈ q · scale + bias`` with ``q`` uint8 (FBGEMM's 8-bit row-wise layout), dequantized on lookup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mdaf_rec.data.batch import Batch
from mdaf_rec.features import FeatureSpec, ManagedSpace, SequenceSpace, StaticField
from mdaf_rec.managed_ids import FrozenIdMap, frozen_id_maps
from mdaf_rec.models.ctr import CTRModel
from mdaf_rec.models.embeddings import SequenceEmbeddingArch, StaticEmbeddingArch, append_target
from mdaf_rec.models.sequence_branch import SequenceBranch
from mdaf_rec.ops.selective_scan import keep_compiled_ops
from mdaf_rec.output import ArchiveFile

INPUT_NAMES: Tuple[str, ...] = ("static_ids", "dense", "target_ids", "history_ids")


def _shared_embedding(weight: nn.Parameter) -> nn.Embedding:
    """An ``nn.Embedding`` over ``weight`` (the parameter is shared, not copied)."""
    return nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)


class MappedTable(nn.Module):
    """Columns ``[lo, hi)`` of a managed table's rows for raw ids: the frozen remapping in front of the lookup.

    Args:
        table: the trained table (``nn.Embedding`` over its weight; quantized with the others).
        id_map: its remapping frozen at the checkpoint.
        columns: the part of the rows an arch reads (static ``[0, static_dim)``, sequence after it).
    """

    def __init__(self, table: nn.Module, id_map: FrozenIdMap, columns: Tuple[int, int]) -> None:
        super().__init__()
        self.table = table
        self.id_map = id_map
        self.lo, self.hi = columns

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` raw ids -> ``[..., hi - lo]`` rows."""
        return self.table(self.id_map(ids))[..., self.lo : self.hi]


def managed_tables(model: CTRModel, spec: FeatureSpec, world_size: int) -> Dict[str, MappedTable]:
    """The managed tables of ``model`` (checkpoint loaded, trained on ``world_size`` processes) as the vocab-mode
    tables the archs' drop-ins read: ``static_<space>`` (the rows' static part) and ``sequence_<space>`` (their
    sequence part), each behind its :class:`~mdaf_rec.managed_ids.FrozenIdMap`; empty under ``vocab``."""
    arch = model.managed_ids
    if arch is None:
        return {}
    maps = frozen_id_maps(arch, world_size)
    spaces = {s.table_name: s.name for s in spec.managed_spaces}
    tables: Dict[str, MappedTable] = {}
    for collection in arch.mc_embedding_collections.values():
        for table, embedding in collection._embedding_module.embeddings.items():
            space = spaces[table]
            static_width, sequence_width = arch.parts[space]
            if static_width:
                columns = (0, static_width)
                tables[f"static_{space}"] = MappedTable(_shared_embedding(embedding.weight), maps[table], columns)
            if sequence_width:
                columns = (static_width, static_width + sequence_width)
                tables[f"sequence_{space}"] = MappedTable(_shared_embedding(embedding.weight), maps[table], columns)
    return tables


class StaticLookup(nn.Module):
    """Drop-in for the static ``EmbeddingBagCollection`` on :class:`ServingModule`'s static KJT.

    The KJT holds one id per sample for each static field, then (``spec.pooled_history``) each history
    padded to exactly ``max_history`` ids (key-major). A bag of one id is that id's row, so each static
    field is a plain row lookup; a padded history is the mean of its non-padding rows (zeros when empty),
    what the collection's mean pooling gives for the unpadded history. Only static shapes.

    Args:
        ebc: the trained collection (its tables are shared, not copied; ``None``: no table of its own).
        spec: the feature spec (key order and key -> table).
        managed: the managed tables (:func:`managed_tables`) by the names of the static tables they stand for.
    """

    def __init__(
        self, ebc: Optional[EmbeddingBagCollection], spec: FeatureSpec, managed: Optional[Dict[str, nn.Module]] = None
    ) -> None:
        super().__init__()
        own = {name: _shared_embedding(bag.weight) for name, bag in ebc.embedding_bags.items()} if ebc is not None else {}
        self.tables = nn.ModuleDict({**own, **{n: t for n, t in (managed or {}).items() if n.startswith("static_")}})
        self.padding = spec.padding_id
        self._keys: List[Tuple[str, str]] = [(f.name, f.table_name) for f in spec.static_fields]
        self._history_keys: List[Tuple[str, str]] = [(key, f.table_name) for key, f in spec.pooled_history_fields]
        self.max_history = spec.max_history
        self.dim = spec.static_dim

    def forward(self, static_features: KeyedJaggedTensor) -> KeyedTensor:
        """
        Args:
            static_features: one id per sample and static field, then the padded pooled histories.
        Returns:
            ``KeyedTensor`` of ``[B, static_dim]`` per key (values ``[B, F * static_dim]``).
        """
        num_fields, num_histories = len(self._keys), len(self._history_keys)
        values = static_features.values()
        # [F, B] one-id fields, then [P, B, L] padded histories
        ids = values.view(num_fields + num_histories * self.max_history, -1)[:num_fields]
        pooled = [self.tables[table](ids[k]) for k, (_, table) in enumerate(self._keys)]  # [B, d] each
        if num_histories:
            batch_size = ids.shape[1]
            histories = values[num_fields * batch_size :].view(num_histories, batch_size, self.max_history)
            for p, (_, table) in enumerate(self._history_keys):
                valid = (histories[p] != self.padding).unsqueeze(-1).to(torch.float32)  # [B, L, 1]
                rows = self.tables[table](histories[p]) * valid  # [B, L, d]
                pooled.append(rows.sum(dim=1) / valid.sum(dim=1).clamp(min=1.0))  # [B, d]
        keys = [key for key, _ in self._keys + self._history_keys]
        return KeyedTensor(keys=keys, length_per_key=[self.dim] * len(keys), values=torch.cat(pooled, 1))


class PaddedSequenceEmbedding(nn.Module):
    """``history ⊕ target`` tokens from right-padded histories (drop-in for ``SequenceEmbeddingArch``).

    Reads a sequence KJT whose keys are, per id space, the target (1 id per sample) then the history
    (exactly ``max_history`` ids per sample, padding 0 included), key-major. Looks up the same tables,
    zeroes the padded positions and writes the target right after the last history entry, giving the
    tokens and lengths ``SequenceEmbeddingArch`` gives for the unpadded histories.

    Args:
        arch: the trained sequence arch (its tables are shared, not copied).
        spec: the feature spec (id spaces and their tables).
        managed: the managed tables (:func:`managed_tables`) by the names of the sequence tables they stand for.
    """

    def __init__(
        self, arch: SequenceEmbeddingArch, spec: FeatureSpec, managed: Optional[Dict[str, nn.Module]] = None
    ) -> None:
        super().__init__()
        ec: Optional[EmbeddingCollection] = arch.embedding_collection
        own = {name: _shared_embedding(emb.weight) for name, emb in ec.embeddings.items()} if ec is not None else {}
        self.tables = nn.ModuleDict({**own, **{n: t for n, t in (managed or {}).items() if n.startswith("sequence_")}})
        self._tables: List[str] = [s.table_name for s in spec.sequence_spaces]
        self.max_history = arch.max_history
        self.padding = spec.padding_id

    def forward(self, sequence_features: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            sequence_features: per id space, the target (1 id) and the padded history (``L`` ids).
        Returns:
            tokens: ``[B, L + 1, sequence_dim]``, right-padded with zeros.
            lengths: ``[B]`` int64 number of valid tokens (history length + 1).
        """
        max_len = self.max_history
        per_space = sequence_features.values().view(len(self._tables), -1)  # [S, B * (1 + L)]
        batch_size = per_space.shape[1] // (1 + max_len)
        targets = per_space[:, :batch_size]  # [S, B]
        histories = per_space[:, batch_size:].reshape(len(self._tables), batch_size, max_len)  # [S, B, L]
        valid = histories[0] != self.padding  # [B, L]
        mask = valid.unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        history = sum(self.tables[t](histories[s]) * mask for s, t in enumerate(self._tables))  # [B, L, D]
        target = sum(self.tables[t](targets[s]) for s, t in enumerate(self._tables))  # [B, D]
        return append_target(history, target, valid.sum(dim=1))


class ServingModule(nn.Module):
    """A :class:`CTRModel` behind plain-tensor inputs (see the module docstring).

    Args:
        model: the trained, unsharded model (modified in place: its table lookups become
            :class:`StaticLookup` / :class:`PaddedSequenceEmbedding` over the same tables; under ``managed`` they
            read its managed tables through their frozen remappings, and its managed-collision lookup is removed).
        spec: the feature spec the model was built with.
        world_size: processes the checkpoint was trained on (the managed tables' shards; unused under ``vocab``).
    """

    def __init__(self, model: CTRModel, spec: FeatureSpec, world_size: int = 1) -> None:
        super().__init__()
        managed = managed_tables(model, spec, world_size)
        model.managed_ids = None
        for module in model.modules():
            if isinstance(module, StaticEmbeddingArch):
                module.embedding_bag_collection = StaticLookup(module.embedding_bag_collection, spec, managed)
            if isinstance(module, SequenceBranch):
                module.embeddings = PaddedSequenceEmbedding(module.embeddings, spec, managed)
        self.model = model.eval()
        self.static_keys: List[str] = spec.static_keys
        self.pooled_history_keys: List[str] = spec.pooled_history_keys
        self.sequence_keys: List[str] = spec.sequence_keys
        self.max_history = spec.max_history
        self.user_field: Optional[int] = spec.user_field

    def forward(
        self, static_ids: torch.Tensor, dense: torch.Tensor, target_ids: torch.Tensor, history_ids: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            static_ids: ``[B, F]`` int64 static-field indices.
            dense: ``[B, N]`` float32 dense features.
            target_ids: ``[B, S]`` int64 target index per sequence id space.
            history_ids: ``[B, S, L]`` int64 histories, most recent last, right-padded with 0.
        Returns:
            probability ``[B]`` float32 and gate ``[B, G]`` (zeros ``[B, 1]`` without a fusion gate).
        """
        batch_size = static_ids.shape[0]
        user = static_ids[:, self.user_field] if self.user_field is not None else static_ids.new_zeros(batch_size)
        for name, x in (("dense", dense), ("target_ids", target_ids), ("history_ids", history_ids)):
            torch._check(x.shape[0] == batch_size, lambda: f"{name} has another batch size than static_ids")
        batch = Batch(
            static_features=self._static_kjt(static_ids, history_ids),
            sequence_features=self._sequence_kjt(target_ids, history_ids),
            dense_features=dense,
            labels=dense.new_zeros(batch_size),  # labels, user_id, row_index: not read by score()
            user_id=user,
            row_index=user,
        )
        out = self.model.score(batch)
        gate = out.gate if out.gate is not None else out.logit.new_zeros(batch_size, 1)
        return torch.sigmoid(out.logit), gate

    def _static_kjt(self, static_ids: torch.Tensor, history_ids: torch.Tensor) -> KeyedJaggedTensor:
        """``[B, F]`` -> KJT with one id per sample and key (key-major values), then, with pooled histories,
        each id space's padded history ``[B, L]`` (``L`` ids per sample)."""
        batch_size, num_keys = static_ids.shape
        num_histories = len(self.pooled_history_keys)
        values = [static_ids.t().reshape(-1)] + [history_ids[:, p, :].reshape(-1) for p in range(num_histories)]
        per_key = [batch_size] * num_keys + [batch_size * self.max_history] * num_histories
        return KeyedJaggedTensor(
            keys=self.static_keys + self.pooled_history_keys,
            values=torch.cat(values),
            lengths=torch.cat([
                torch.ones(num_keys * batch_size, dtype=torch.int32),
                torch.full((num_histories * batch_size,), self.max_history, dtype=torch.int32),
            ]),
            stride=batch_size,
            length_per_key=per_key,
            offset_per_key=[sum(per_key[:k]) for k in range(len(per_key) + 1)],
        )

    def _sequence_kjt(self, target_ids: torch.Tensor, history_ids: torch.Tensor) -> KeyedJaggedTensor:
        """Targets ``[B, S]`` and padded histories ``[B, S, L]`` -> KJT (target, history) per id space."""
        batch_size = target_ids.shape[0]
        values: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        per_key: List[int] = []
        for s in range(len(self.sequence_keys) // 2):
            values += [target_ids[:, s], history_ids[:, s, :].reshape(-1)]
            lengths += [
                torch.ones(batch_size, dtype=torch.int32),
                torch.full((batch_size,), self.max_history, dtype=torch.int32),
            ]
            per_key += [batch_size, batch_size * self.max_history]
        offsets = [0]
        for n in per_key:
            offsets.append(offsets[-1] + n)
        return KeyedJaggedTensor(
            keys=self.sequence_keys,
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            stride=batch_size,
            length_per_key=per_key,
            offset_per_key=offsets,
        )


def serving_inputs(batch: Batch, spec: FeatureSpec) -> Dict[str, torch.Tensor]:
    """A loader :class:`Batch` as :class:`ServingModule` inputs.

    Args:
        batch: a batch from :class:`~mdaf_rec.data.loader.BatchConverter` (histories already truncated
            to ``max_history``).
        spec: its feature spec.
    Returns:
        ``static_ids [B, F]``, ``dense [B, N]``, ``target_ids [B, S]``, ``history_ids [B, S, L]``.
    """
    static = batch.static_features.to_dict()
    sequence = batch.sequence_features.to_dict()
    spaces = spec.sequence_spaces
    return {
        "static_ids": torch.stack([static[k].values() for k in spec.static_keys], dim=1).long(),
        "dense": batch.dense_features.float(),
        "target_ids": torch.stack([sequence[s.name].values() for s in spaces], dim=1).long(),
        "history_ids": torch.stack(
            [sequence[s.history_key].to_padded_dense(desired_length=spec.max_history, padding_value=spec.padding_id)
             for s in spaces],
            dim=1,
        ).long(),
    }


def example_inputs(spec: FeatureSpec, batch_size: int) -> Tuple[torch.Tensor, ...]:
    """Inputs of ``batch_size`` rows (every id the OOV index 1, histories half full), in forward order."""
    num_spaces = len(spec.sequence_spaces)
    history = torch.full((batch_size, num_spaces, spec.max_history), spec.padding_id, dtype=torch.int64)
    history[:, :, : max(1, spec.max_history // 2)] = 1
    return (
        torch.ones(batch_size, len(spec.static_fields), dtype=torch.int64),
        torch.zeros(batch_size, len(spec.dense_features)),
        torch.ones(batch_size, num_spaces, dtype=torch.int64),
        history,
    )


def export_program(module: ServingModule, spec: FeatureSpec) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``module`` with a dynamic batch dimension on every input."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = {name: {0: batch} for name in INPUT_NAMES}
    with torch.no_grad():
        return torch.export.export(module, example_inputs(spec, 4), dynamic_shapes=dynamic, strict=False)


def compile_program(program: torch.export.ExportedProgram, path: Path) -> Path:
    """AOTInductor: ``program`` compiled to a shared library for this machine, packaged at ``path`` (``.pt2``).

    The package loads with torch alone (``torch._inductor.aoti_load_package(path)``, a callable on the
    program's inputs returning its outputs). Compiling needs a C++ compiler; the library uses this CPU's
    instruction set (e.g. AVX-512), so it runs on machines with the same one, and with the same torch version.
    """
    from torch._inductor import aoti_compile_and_package

    with ArchiveFile(path) as fh:  # a refused write raises here, not in the packager's C++ destructor
        aoti_compile_and_package(program, package_path=fh)
    return path


def export_cpu_program(module: ServingModule, spec: FeatureSpec, path: Path) -> bool:
    """The fast CPU form of ``module``: exported with the compiled CPU operators of :mod:`mdaf_rec.ops` kept as
    single nodes (the selective scan keeps its state in registers instead of going through memory at every
    time step) and compiled by AOTInductor to ``path``.

    Returns:
        Whether the program calls the compiled operators (then a server loads their library,
        :func:`~mdaf_rec.ops.scan_cpu.library_path`, with ``torch.ops.load_library`` before the package).
    """
    with keep_compiled_ops():
        program = export_program(module, spec)
    compile_program(program, path)
    return any(str(node.target).startswith("mdaf_rec.") for node in program.graph.nodes)


# --------------------------------------------------------------------------------------------------
# Row-wise int8 tables
# --------------------------------------------------------------------------------------------------


def quantize_rowwise(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit row-wise quantization: ``weight ≈ q * scale + bias``.

    Args:
        weight: ``[N, D]`` float table.
    Returns:
        ``q [N, D]`` uint8, ``scale [N, 1]`` and ``bias [N, 1]`` float32 (bias = row minimum,
        scale = row range / 255; the rounding error is at most ``scale / 2`` per entry).
    """
    w = weight.detach().float()
    lo = w.min(dim=1, keepdim=True).values
    scale = (w.max(dim=1, keepdim=True).values - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((w - lo) / scale).clamp_(0, 255).to(torch.uint8)
    return q, scale, lo


class Int8Embedding(nn.Module):
    """Row-wise 8-bit replacement of ``nn.Embedding`` (the call TorchRec's ``EmbeddingCollection`` makes).

    Args:
        weight: ``[N, D]`` float table to quantize.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale, bias = quantize_rowwise(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``[n]`` int64 row indices.
        Returns:
            ``[n, D]`` float32 dequantized rows.
        """
        return self.qweight[input].to(torch.float32) * self.scale[input] + self.bias[input]


def quantize_tables(module: nn.Module) -> int:
    """Swaps every ``nn.Embedding`` in ``module`` (the tables of :class:`StaticLookup` and
    :class:`PaddedSequenceEmbedding`) for an :class:`Int8Embedding`; returns the bytes saved."""
    saved = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding):
                weight = child.weight
                setattr(parent, name, Int8Embedding(weight))
                saved += weight.numel() * (weight.element_size() - 1) - 8 * weight.shape[0]
    return saved


# --------------------------------------------------------------------------------------------------
# feature_spec.json -> FeatureSpec (the folder itself: mdaf_rec.artifact)
# --------------------------------------------------------------------------------------------------


def spec_from_json(doc: Dict[str, Any]) -> FeatureSpec:
    """The :class:`FeatureSpec` recorded in a ``feature_spec.json``."""
    return FeatureSpec(
        static_fields=tuple(StaticField(f["key"], f["column"], f["table_rows"]) for f in doc["static_fields"]),
        sequence_spaces=tuple(
            SequenceSpace(s["key"], s["history_column"], s["table_rows"]) for s in doc["sequence_spaces"]
        ),
        dense_features=tuple(doc["dense_features"]),
        dense_log1p=doc["dense_log1p"],
        static_dim=doc["static_dim"],
        sequence_dim=doc["sequence_dim"],
        max_history=doc["max_history"],
        pooled_history=doc.get("pooled_history", False),
        managed_spaces=tuple(ManagedSpace(**s) for s in doc.get("managed_spaces", ())),
    )
