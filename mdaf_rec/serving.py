"""The serving module: a trained CTR model's dense network behind a forward that takes plain tensors.

:class:`ServingModule` is what ``mdaf-rec export`` hands to ``torch.export``. The embedding tables are not in it:
they are files a server memory-maps (:mod:`mdaf_rec.tables`), and the rows it looks up there are inputs of the
program, next to the vocabulary indices (0 = padding, 1 = out-of-vocabulary) they were looked up with, so a
server needs no TorchRec types::

    static_ids    [B, F]             int64   one index per static field, in feature_spec.json's order
    dense         [B, N]             float32 dense features (N may be 0)
    target_ids    [B, S]             int64   target index per sequence id space (item, category, ...)
    history_ids   [B, S, L]          int64   history per id space, most recent last, right-padded with 0
    list_ids      [B, K, L]          int64   each features.pooled_lists column (its own length), most recent
                                             last, right-padded with 0 (K = 0 without pooled lists)
    static_rows   [B, F, d]          float32 row of static_ids[:, f] in static field f's table
    pooled_rows   [B, P, L, d]       float32 rows of history_ids[:, p] in the static table of id space p
                                             (P = S with features.pooled_history, else 0)
    target_rows   [B, S', D]         float32 row of target_ids[:, s] in id space s's sequence table
    history_rows  [B, S', L, D]      float32 rows of history_ids[:, s] in id space s's sequence table
                                             (S' = S for models with a sequential branch, else 0)
    list_rows     [B, K', L, d]      float32 rows of list_ids[:, k] in the static table of list k's id space
                                             (K' = K for models with a static branch, else 0)
    → probability [B] float32, gate [B, G] float32

(``d`` = ``static_dim``, ``D`` = ``sequence_dim``; a model without a static branch has ``F = 0`` rows in
``static_rows``.) :attr:`ServingModule.lookups` says which table fills each row input
(:class:`~mdaf_rec.tables.Lookup`). ``L`` is the model's ``max_history``; a history's length is its number
of non-zero entries (indices of real ids are never 0). Inside, the module builds the ``KeyedJaggedTensor`` s of
a loader :class:`~mdaf_rec.data.batch.Batch` and runs the model's own ``score``: the static KJT has one id per
sample and key, the sequence KJT the padded histories (``L`` ids per sample). Two drop-in lookups keep every
shape static but the batch size and take their rows from the row inputs (:class:`LookedUpRows`):
:class:`StaticLookup` (a sum-pooled bag of one id is that id's row) for the ``EmbeddingBagCollection`` and
:class:`PaddedSequenceEmbedding` (padding masked instead of dropped) for the
:class:`~mdaf_rec.models.embeddings.SequenceEmbeddingArch`. ``G`` is 1 or ``D`` (``model.gate``) for MDAF
models; models without a fusion gate return zeros ``[B, 1]``.

Under ``features.id_mapping: managed`` the id inputs hold raw ids (histories right-padded with -1,
``spec.padding_id``: raw ids are not negative, and 0 may be one), the model's managed-collision lookup is
removed, and the row inputs of a managed space come from its one table (rows ``[static part | sequence part]``):
:attr:`ServingModule.lookups` names that table and the first column of the part (:class:`~mdaf_rec.tables.Lookup`),
and the server maps the raw ids to rows with the table's frozen remapping (:class:`~mdaf_rec.tables.IdMap`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from mdaf_rec.data.batch import Batch
from mdaf_rec.features import FeatureSpec, ManagedSpace, SequenceSpace, StaticField
from mdaf_rec.models.ctr import CTRModel
from mdaf_rec.models.embeddings import ManagedIdArch, StaticEmbeddingArch, append_target
from mdaf_rec.models.sequence_branch import SequenceBranch
from mdaf_rec.ops.selective_scan import keep_compiled_ops
from mdaf_rec.output import ArchiveFile
from mdaf_rec.tables import Lookup

ID_INPUTS: Tuple[str, ...] = ("static_ids", "dense", "target_ids", "history_ids", "list_ids")
ROW_INPUTS: Tuple[str, ...] = ("static_rows", "pooled_rows", "target_rows", "history_rows", "list_rows")
INPUT_NAMES: Tuple[str, ...] = ID_INPUTS + ROW_INPUTS


class LookedUpRows:
    """The row inputs of one :class:`ServingModule` call, handed to its drop-in lookups while the model's
    ``score`` runs (:meth:`feeding`), and nothing outside it."""

    def __init__(self) -> None:
        self._rows: Dict[str, torch.Tensor] = {}

    @contextmanager
    def feeding(self, rows: Dict[str, torch.Tensor]) -> Iterator[None]:
        self._rows = rows
        try:
            yield
        finally:
            self._rows = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._rows[name]


class StaticLookup(nn.Module):
    """Drop-in for the static ``EmbeddingBagCollection`` on :class:`ServingModule`'s static KJT.

    The KJT holds one id per sample for each static field, then (``spec.pooled_history``) each history and
    (``spec.pooled_lists``) each list, padded to exactly ``max_history`` ids (key-major). A bag of one id is that
    id's row (``static_rows``), so each static field is its looked-up row; a padded history or list is the mean of
    its non-padding rows (``pooled_rows`` / ``list_rows``; zeros when empty), what the collection's mean pooling
    gives for the unpadded one. Only static shapes.

    Args:
        spec: the feature spec (key order and key -> table).
        rows: the row inputs of the current call.
    """

    def __init__(self, spec: FeatureSpec, rows: LookedUpRows) -> None:
        super().__init__()
        self._keys: List[Tuple[str, str]] = [(f.name, f.table_name) for f in spec.static_fields]
        self._history_keys: List[Tuple[str, str]] = [(k, f.table_name) for k, f in spec.pooled_histories]
        self._list_keys: List[Tuple[str, str]] = [(k, f.table_name) for k, f in spec.pooled_list_fields]
        self.max_history = spec.max_history
        self.dim = spec.static_dim
        self.padding = spec.padding_id
        self.rows = rows

    @property
    def lookups(self) -> Dict[str, Lookup]:
        """The row inputs this lookup reads and their tables."""
        return {"static_rows": Lookup("static_ids", [t for _, t in self._keys], self.dim),
                "pooled_rows": Lookup("history_ids", [t for _, t in self._history_keys], self.dim),
                "list_rows": Lookup("list_ids", [t for _, t in self._list_keys], self.dim)}

    def forward(self, static_features: KeyedJaggedTensor) -> KeyedTensor:
        """
        Args:
            static_features: one id per sample and static field, then the padded pooled histories and lists.
        Returns:
            ``KeyedTensor`` of ``[B, static_dim]`` per key (values ``[B, F * static_dim]``).
        """
        num_fields, num_histories = len(self._keys), len(self._history_keys)
        static_rows = self.rows["static_rows"]  # [B, F, d]
        pooled = [static_rows[:, k] for k in range(num_fields)]  # [B, d] each
        num_padded = num_histories + len(self._list_keys)  # histories, then lists
        if num_padded:
            batch_size = static_rows.shape[0]
            values = static_features.values()  # [F, B] one-id fields, then [P + K, B, L] padded histories, lists
            padded = values[num_fields * batch_size :].view(num_padded, batch_size, self.max_history)
            rows_of = [self.rows["pooled_rows"][:, p] for p in range(num_histories)]  # [B, L, d] each
            rows_of += [self.rows["list_rows"][:, k] for k in range(len(self._list_keys))]
            for ids, rows in zip(padded, rows_of):
                valid = (ids != self.padding).unsqueeze(-1).to(torch.float32)  # [B, L, 1]
                pooled.append((rows * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0))  # [B, d]
        keys = [key for key, _ in self._keys + self._history_keys + self._list_keys]
        return KeyedTensor(keys=keys, length_per_key=[self.dim] * len(keys), values=torch.cat(pooled, 1))


class PaddedSequenceEmbedding(nn.Module):
    """``history ⊕ target`` tokens from right-padded histories (drop-in for ``SequenceEmbeddingArch``).

    Reads a sequence KJT whose keys are, per id space, the target (1 id per sample) then the history
    (exactly ``max_history`` ids per sample, padding 0 included), key-major, and the rows looked up for them
    (``target_rows``, ``history_rows``); zeroes the padded positions and writes the target right after the
    last history entry, giving the tokens and lengths ``SequenceEmbeddingArch`` gives for the unpadded
    histories.

    Args:
        spec: the feature spec (id spaces and their tables).
        rows: the row inputs of the current call.
    """

    def __init__(self, spec: FeatureSpec, rows: LookedUpRows) -> None:
        super().__init__()
        self._tables: List[str] = [s.table_name for s in spec.sequence_spaces]
        self.max_history = spec.max_history
        self.dim = spec.sequence_dim
        self.padding = spec.padding_id
        self.rows = rows

    @property
    def lookups(self) -> Dict[str, Lookup]:
        """The row inputs this lookup reads and their tables."""
        return {"target_rows": Lookup("target_ids", list(self._tables), self.dim),
                "history_rows": Lookup("history_ids", list(self._tables), self.dim)}

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
        histories = per_space[:, batch_size:].reshape(len(self._tables), batch_size, max_len)  # [S, B, L]
        valid = histories[0] != self.padding  # [B, L]
        mask = valid.unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        history_rows, target_rows = self.rows["history_rows"], self.rows["target_rows"]  # [B, S, L, D], [B, S, D]
        history = sum(history_rows[:, s] * mask for s in range(len(self._tables)))  # [B, L, D]
        target = sum(target_rows[:, s] for s in range(len(self._tables)))  # [B, D]
        return append_target(history, target, valid.sum(dim=1))


class ServingModule(nn.Module):
    """A :class:`CTRModel`'s dense network behind plain-tensor inputs (see the module docstring).

    Args:
        model: the trained model (modified in place: its table lookups become :class:`StaticLookup` /
            :class:`PaddedSequenceEmbedding`, which read the row inputs; its tables, and under ``managed`` its
            managed-collision lookup, are dropped and may be on the ``meta`` device).
        spec: the feature spec the model was built with.
    """

    def __init__(self, model: CTRModel, spec: FeatureSpec) -> None:
        super().__init__()
        self.rows = LookedUpRows()
        self.lookups: Dict[str, Lookup] = {
            "static_rows": Lookup("static_ids", [], spec.static_dim),
            "pooled_rows": Lookup("history_ids", [], spec.static_dim),
            "target_rows": Lookup("target_ids", [], spec.sequence_dim),
            "history_rows": Lookup("history_ids", [], spec.sequence_dim),
            "list_rows": Lookup("list_ids", [], spec.static_dim),
        }
        for module in model.modules():
            if isinstance(module, StaticEmbeddingArch):
                module.embedding_bag_collection = StaticLookup(spec, self.rows)
                self.lookups.update(module.embedding_bag_collection.lookups)
            if isinstance(module, SequenceBranch):
                module.embeddings = PaddedSequenceEmbedding(spec, self.rows)
                self.lookups.update(module.embeddings.lookups)
        if model.managed_ids is not None:
            self.lookups = managed_lookups(self.lookups, spec, model.managed_ids)
            model.managed_ids = None
        self.model = model.eval()
        self.spec = spec
        self.static_keys: List[str] = spec.static_keys
        self.pooled_history_keys: List[str] = [key for key, _ in spec.pooled_histories]
        self.pooled_list_keys: List[str] = spec.pooled_list_keys
        self.sequence_keys: List[str] = spec.sequence_keys
        self.max_history = spec.max_history
        self.user_field: Optional[int] = spec.user_field

    def forward(
        self,
        static_ids: torch.Tensor,
        dense: torch.Tensor,
        target_ids: torch.Tensor,
        history_ids: torch.Tensor,
        list_ids: torch.Tensor,
        static_rows: torch.Tensor,
        pooled_rows: torch.Tensor,
        target_rows: torch.Tensor,
        history_rows: torch.Tensor,
        list_rows: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            static_ids: ``[B, F]`` int64 static-field indices.
            dense: ``[B, N]`` float32 dense features.
            target_ids: ``[B, S]`` int64 target index per sequence id space.
            history_ids: ``[B, S, L]`` int64 histories, most recent last, right-padded with 0.
            list_ids: ``[B, K, L]`` int64 pooled lists, most recent last, right-padded with 0.
            static_rows, pooled_rows, target_rows, history_rows, list_rows: the rows looked up for them (module
                docstring).
        Returns:
            probability ``[B]`` float32 and gate ``[B, G]`` (zeros ``[B, 1]`` without a fusion gate).
        """
        batch_size = static_ids.shape[0]
        user = static_ids[:, self.user_field] if self.user_field is not None else static_ids.new_zeros(batch_size)
        for name, x in (("dense", dense), ("target_ids", target_ids), ("history_ids", history_ids),
                        ("list_ids", list_ids), ("static_rows", static_rows), ("pooled_rows", pooled_rows),
                        ("target_rows", target_rows), ("history_rows", history_rows), ("list_rows", list_rows)):
            torch._check(x.shape[0] == batch_size, lambda: f"{name} has another batch size than static_ids")
        batch = Batch(
            static_features=self._static_kjt(static_ids, history_ids, list_ids),
            sequence_features=self._sequence_kjt(target_ids, history_ids),
            dense_features=dense,
            labels=dense.new_zeros(batch_size),  # labels, user_id, row_index: not read by score()
            user_id=user,
            row_index=user,
        )
        rows = {"static_rows": static_rows, "pooled_rows": pooled_rows, "target_rows": target_rows,
                "history_rows": history_rows, "list_rows": list_rows}
        with self.rows.feeding(rows):
            out = self.model.score(batch)
        gate = out.gate if out.gate is not None else out.logit.new_zeros(batch_size, 1)
        return torch.sigmoid(out.logit), gate

    def _static_kjt(self, static_ids: torch.Tensor, history_ids: torch.Tensor, list_ids: torch.Tensor
                    ) -> KeyedJaggedTensor:
        """``[B, F]`` -> KJT with one id per sample and key (key-major values), then, with pooled histories,
        each id space's padded history ``[B, L]`` (``L`` ids per sample), then each pooled list ``[B, L]``."""
        batch_size, num_keys = static_ids.shape
        num_padded = len(self.pooled_history_keys) + len(self.pooled_list_keys)  # histories, then lists
        values = ([static_ids.t().reshape(-1)] + [history_ids[:, p, :].reshape(-1)
                                                  for p in range(len(self.pooled_history_keys))]
                  + [list_ids[:, k, :].reshape(-1) for k in range(len(self.pooled_list_keys))])
        per_key = [batch_size] * num_keys + [batch_size * self.max_history] * num_padded
        return KeyedJaggedTensor(
            keys=self.static_keys + self.pooled_history_keys + self.pooled_list_keys,
            values=torch.cat(values),
            lengths=torch.cat([
                torch.ones(num_keys * batch_size, dtype=torch.int32),
                torch.full((num_padded * batch_size,), self.max_history, dtype=torch.int32),
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


def managed_lookups(lookups: Dict[str, Lookup], spec: FeatureSpec, arch: ManagedIdArch) -> Dict[str, Lookup]:
    """``lookups`` with each managed space's static and sequence table replaced by its one managed table of
    ``arch`` (rows ``[static part | sequence part]``) and the first column of the part read."""
    static_tables = {f.name: f.table_name for f in spec.static_fields}
    sequence_tables = {s.name: s.table_name for s in spec.sequence_spaces}
    stand_ins = {}  # vocab-mode table name -> (managed table, first column)
    for space in spec.managed_spaces:
        if space.name in arch.parts:
            static_width, _ = arch.parts[space.name]
            stand_ins[static_tables[space.name]] = (space.table_name, 0)
            if space.name in sequence_tables:
                stand_ins[sequence_tables[space.name]] = (space.table_name, static_width)
    return {name: Lookup(lookup.index, [stand_ins.get(t, (t, 0))[0] for t in lookup.tables], lookup.dim,
                         [stand_ins.get(t, (t, 0))[1] for t in lookup.tables])
            for name, lookup in lookups.items()}


def serving_inputs(batch: Batch, spec: FeatureSpec) -> Dict[str, torch.Tensor]:
    """A loader :class:`Batch` as :class:`ServingModule` inputs.

    Args:
        batch: a batch from :class:`~mdaf_rec.data.loader.BatchConverter` (histories already truncated
            to ``max_history``; indices, or raw ids under ``managed``).
        spec: its feature spec.
    Returns:
        ``static_ids [B, F]``, ``dense [B, N]``, ``target_ids [B, S]``, ``history_ids [B, S, L]``,
        ``list_ids [B, K, L]``.
    """
    static = batch.static_features.to_dict()
    sequence = batch.sequence_features.to_dict()
    spaces = spec.sequence_spaces
    padded = [static[k].to_padded_dense(desired_length=spec.max_history, padding_value=spec.padding_id)
              for k in spec.pooled_list_keys]  # [B, L] each
    return {
        "static_ids": torch.stack([static[k].values() for k in spec.static_keys], dim=1).long(),
        "dense": batch.dense_features.float(),
        "target_ids": torch.stack([sequence[s.name].values() for s in spaces], dim=1).long(),
        "history_ids": torch.stack(
            [sequence[s.history_key].to_padded_dense(desired_length=spec.max_history, padding_value=spec.padding_id)
             for s in spaces],
            dim=1,
        ).long(),
        "list_ids": (torch.stack(padded, dim=1).long() if padded
                     else torch.zeros(batch.batch_size, 0, spec.max_history, dtype=torch.int64)),
    }


def example_inputs(module: ServingModule, batch_size: int) -> Tuple[torch.Tensor, ...]:
    """Inputs of ``batch_size`` rows for ``module`` (every id 1: the OOV index, or a raw id; histories half full,
    rows zero), in forward order."""
    spec = module.spec
    num_spaces = len(spec.sequence_spaces)
    history = torch.full((batch_size, num_spaces, spec.max_history), spec.padding_id, dtype=torch.int64)
    history[:, :, : max(1, spec.max_history // 2)] = 1
    lists = torch.full((batch_size, len(spec.pooled_lists), spec.max_history), spec.padding_id, dtype=torch.int64)
    lists[:, :, : max(1, spec.max_history // 2)] = 1
    ids = {
        "static_ids": torch.ones(batch_size, len(spec.static_fields), dtype=torch.int64),
        "dense": torch.zeros(batch_size, len(spec.dense_features)),
        "target_ids": torch.ones(batch_size, num_spaces, dtype=torch.int64),
        "history_ids": history,
        "list_ids": lists,
    }
    rows = {name: torch.zeros(batch_size, len(lookup.tables), *ids[lookup.index].shape[2:], lookup.dim)
            for name, lookup in module.lookups.items()}
    return tuple({**ids, **rows}[name] for name in INPUT_NAMES)


def export_program(module: ServingModule) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``module`` with a dynamic batch dimension on every input."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = {name: {0: batch} for name in INPUT_NAMES}
    with torch.no_grad():
        return torch.export.export(module, example_inputs(module, 4), dynamic_shapes=dynamic, strict=False)


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


def export_cpu_program(module: ServingModule, path: Path) -> bool:
    """The fast CPU form of ``module``: exported with the compiled CPU operators of :mod:`mdaf_rec.ops` kept as
    single nodes (the selective scan keeps its state in registers instead of going through memory at every
    time step) and compiled by AOTInductor to ``path``.

    Returns:
        Whether the program calls the compiled operators (then a server loads their library,
        :func:`~mdaf_rec.ops.scan_cpu.library_path`, with ``torch.ops.load_library`` before the package).
    """
    with keep_compiled_ops():
        program = export_program(module)
    compile_program(program, path)
    return any(str(node.target).startswith("mdaf_rec.") for node in program.graph.nodes)


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
        pooled_lists=tuple((entry["column"], entry["space"]) for entry in doc.get("pooled_lists", ())),
        managed_spaces=tuple(ManagedSpace(**s) for s in doc.get("managed_spaces", ())),
    )
