"""Warm start: a new run begins with the weights of another run's checkpoint (``mdaf-rec train --init-from``,
``train.init_from``), e.g. yesterday's model continued on today's data.

The source is ``RUN`` (its best checkpoint), ``RUN:last`` / ``RUN:best``, or a checkpoint folder
``RUN/checkpoints/epoch_K`` (:func:`resolve_source`); its run directory provides the vocabularies the
checkpoint's tables are indexed by (``RUN/vocab/``, checked against the checkpoint's fingerprint), which the
new run grows by the ids of its own training split (:meth:`~mdaf_rec.data.vocab.Vocabularies.grown`).

The model state is taken generically by state-dict key (:func:`load_model_state`), so every parameter and
buffer comes along — tables, dense weights, and module state such as managed-collision remapping buffers —
with one rule: every entry of the new model must be in the checkpoint with the same shape, except an
embedding table's weight (a key ``....<table>.weight``), which may have more rows than the source's (a grown
vocabulary): its first rows, the source's, are copied bit-exact and the others keep the new model's fresh
initialisation (as a fresh table of that size would have them). Any other difference, and any checkpoint
entry the new model lacks, is refused with one line naming the key: the source was trained with another
model or features config. The optimizer state (``train.init_optimizer``, :func:`load_optimizer_state`) is
taken where the shapes allow by the same rule; entries that do not fit keep their fresh state (counted in a
log line). The new run keeps its own seeds, learning-rate schedule and position (epoch 1, step 0).

Under ``features.id_mapping: managed`` the remapping (the MCH modules' sorted ids, rows and eviction counters) is
model state and comes along by the same rule, so right after loading every raw id maps to the row, and the row
holds the embedding, it had in the source. A source trained on another world size has its remapping resharded on
load (:func:`~mdaf_rec.managed_ids.reshard_remapping`: each id, its counters and its table row move to the shard
that owns its hashed id now; a shard with more ids than rows keeps those its eviction policy values most).
:func:`check_id_mapping` refuses first, in one line, what would map ids to other rows: a source trained with the
other mapping mode or with other managed settings (the key named); and ``train.init_optimizer`` across world sizes.

Each rank reads the source tensors whole (not only its own shards) into host memory, one entry at a time
in DCP's load: the source model's size once per rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import Config, ConfigError, load_config
from mdaf_rec.data.vocab import VocabMismatchError, Vocabularies
from mdaf_rec.errors import UserError
from mdaf_rec.features import FeatureSpec
from mdaf_rec.managed_ids import MANAGED_FINGERPRINT_PREFIX, managed_fingerprint, reshard_remapping
from mdaf_rec.manifest import MANIFEST_FILE
from mdaf_rec.run_dir import CHECKPOINTS_DIR, RunDir

logger = logging.getLogger(__name__)

#: ``RUN:<which>`` suffixes of a source.
CHECKPOINT_CHOICES = ("best", "last")


class WarmStartError(UserError, ValueError):
    """The source of a warm start is missing or does not fit the new model (the message names the key)."""


@dataclass(frozen=True)
class InitSource:
    """A resolved warm-start source.

    Attributes:
        given: the source as given (``train.init_from``).
        run: its run directory (its vocabularies, config).
        checkpoint: the checkpoint folder.
    """

    given: str
    run: RunDir
    checkpoint: Path


def resolve_source(text: str) -> InitSource:
    """``RUN`` (best checkpoint), ``RUN:best``, ``RUN:last`` or a checkpoint folder of a run -> :class:`InitSource`."""
    base, _, which = text.rpartition(":")
    if not base or which not in CHECKPOINT_CHOICES:
        base, which = text, None
    path = Path(base)
    try:
        if which is None and (path / MANIFEST_FILE).is_file() and (path / ckpt.STATE_FILE).is_file():
            run = RunDir(path.parent.parent)
            if path.parent.name != CHECKPOINTS_DIR or not run.is_run():
                raise WarmStartError(f"train.init_from {text!r}: a checkpoint folder outside a run directory's "
                                     f"{CHECKPOINTS_DIR}/ (its run's vocab/ is needed)")
            ckpt.checkpoint_manifest(path)
            return InitSource(text, run, path)
        if not RunDir(path).is_run():
            raise WarmStartError(f"train.init_from {text!r}: not a run directory of `mdaf-rec train` (RUN, RUN:best, "
                                 "RUN:last) nor a checkpoint folder RUN/checkpoints/<name>")
        return InitSource(text, RunDir(path), ckpt.checkpoint_path(path, which or "best"))
    except ckpt.CheckpointError as e:
        raise WarmStartError(f"train.init_from {text!r}: {e}") from None


def source_vocabularies(source: InitSource) -> Vocabularies:
    """The vocabularies the source checkpoint's tables are indexed by (its run's ``vocab/``, checked)."""
    vocabs = Vocabularies.load(source.run.vocab)
    try:
        ckpt.check_vocabularies(source.checkpoint, vocabs)
    except VocabMismatchError as e:
        raise WarmStartError(f"train.init_from {source.given!r}: {e}") from None
    return vocabs


#: The settings of an id space a managed remapping depends on (``managed_ids.managed_fingerprint``'s).
MANAGED_KEYS = ("column", "history_column", "rows", "eviction", "eviction_interval")


def check_id_mapping(source: InitSource, config: Config, world_size: int) -> None:
    """Refuses, naming the key, a source whose ids map to rows otherwise than this run's would: another
    ``features.id_mapping``; under ``managed``, other managed settings of an id space (its run's ``config.yaml``),
    or ``train.init_optimizer`` with another world size (the remapping and its table are resharded on load, the
    optimizer state is not)."""
    cfg = config.features
    state = ckpt.read_state(source.checkpoint)
    recorded = state.get("vocab_fingerprint") or ""
    mode = "managed" if recorded.startswith(MANAGED_FINGERPRINT_PREFIX) else "vocab"
    if mode != cfg.id_mapping:
        raise WarmStartError(f"train.init_from {source.given!r}: trained with features.id_mapping: {mode}, this run "
                             f"has {cfg.id_mapping}: its tables are indexed otherwise (start this run fresh, or keep "
                             f"features.id_mapping: {mode})")
    if mode == "vocab":
        return
    if recorded != managed_fingerprint(cfg):
        try:
            theirs = load_config(source.run.config).features
        except ConfigError as e:
            raise WarmStartError(f"train.init_from {source.given!r}: {e}") from None
        for name in sorted(set(cfg.id_spaces) | set(theirs.id_spaces)):
            mine, other = cfg.id_spaces.get(name), theirs.id_spaces.get(name)
            if mine is None or other is None:
                raise WarmStartError(f"train.init_from {source.given!r}: 'features.id_spaces.{name}' is in "
                                     f"{'the source' if mine is None else 'this run'} only (see {source.run.config})")
            for key in MANAGED_KEYS:
                if getattr(mine, key) != getattr(other, key):
                    raise WarmStartError(
                        f"train.init_from {source.given!r}: 'features.id_spaces.{name}.{key}': {getattr(mine, key)!r} "
                        f"here, {getattr(other, key)!r} in the source (see {source.run.config}): its remapping maps "
                        "ids to other rows")
        raise WarmStartError(f"train.init_from {source.given!r}: the checkpoint was trained with other managed id "
                             f"settings than its run's config {source.run.config}")
    trained_on = int(state.get("world_size") or 1)
    if trained_on != world_size and config.train.init_optimizer:
        raise WarmStartError(f"'train.init_optimizer': the source {source.given!r} was trained on {trained_on} "
                             f"processes, this run has {world_size}: its managed-id remapping and tables are resharded "
                             "on load, their optimizer state is not (warm-start without it, or on the same world size)")


def table_key_rule(spec: FeatureSpec) -> Callable[[str], bool]:
    """Whether a state-dict (or optimizer-state) key belongs to one of ``spec``'s embedding tables, whose rows
    may grow: it contains ``.<table name>.weight``."""
    markers = [f".{f.table_name}.weight" for f in spec.static_fields]
    markers += [f".{s.table_name}.weight" for s in spec.sequence_spaces]
    return lambda key: any(m in key for m in markers)


def load_model_state(source: InitSource, model: torch.nn.Module, is_table: Callable[[str], bool]) -> Dict[str, List[int]]:
    """Loads the source checkpoint's model state into ``model`` (DMP or unsharded), by key (module docstring).

    Returns:
        table key -> ``[source rows, rows]`` of every table that grew.
    Raises:
        WarmStartError: a key missing on either side, or a shape that does not fit, named.
    """
    stored = ckpt.stored_tensors(source.checkpoint)
    state = model.state_dict()
    extra = sorted(k[len("model."):] for k in stored if k.startswith("model.") and k[len("model."):] not in state)
    if extra:
        raise WarmStartError(f"{source.checkpoint}: holds {extra[0]!r}, which this model lacks{_more(extra)}: the "
                             f"source run has another model or features config (see {source.run.config})")
    grown: Dict[str, List[int]] = {}
    targets: Dict[str, torch.Tensor] = {}
    for key, value in _tensor_leaves(state).items():
        if f"model.{key}" not in stored:
            raise WarmStartError(f"{source.checkpoint}: has no {key!r}, which this model has: the source run has "
                                 f"another model or features config (see {source.run.config})")
        size, dtype = stored[f"model.{key}"]
        if not _fits(size, value.shape, is_table(key)):
            raise WarmStartError(
                f"{source.checkpoint}: {key!r} is {list(size)} there and {list(value.shape)} here: the source run has "
                f"another model or features config (see {source.run.config})"
            )
        if size != value.shape:
            grown[key] = [int(size[0]), int(value.shape[0])]
        targets[key] = torch.empty(size, dtype=dtype)
    ckpt.load_checkpoint(source.checkpoint, {"model": targets}, restore_rng=False)
    _reshard_remappings(state, targets)
    for key, value in _tensor_leaves(state).items():
        _copy_rows(value, targets[key])
    model.load_state_dict(state)
    return grown


SEGMENTS = "._output_segments_tensor"  # an MCH module's row boundaries of its shards, padded with -1


def _reshard_remappings(state: Dict[str, Any], targets: Dict[str, torch.Tensor]) -> None:
    """Rewrites, in ``targets`` (the source's tensors, whole), each managed remapping trained on another world size
    than ``state``'s (the model's) into the model's layout, with its table's rows
    (:func:`~mdaf_rec.managed_ids.reshard_remapping`); the model keeps its own shard boundaries."""
    for key in [k for k in state if k.endswith(SEGMENTS)]:
        mine = [int(x) for x in state[key] if x >= 0]  # a plain tensor on every rank (TorchRec does not shard it)
        theirs = [int(x) for x in targets[key] if x >= 0]
        if mine == theirs:
            continue
        prefix, table = key[: -len(SEGMENTS)], key[: -len(SEGMENTS)].rsplit(".", 1)[1]
        names = [k[len(prefix) + 1:] for k in targets if k.startswith(f"{prefix}._mch_")]
        weight = prefix.replace(f"._managed_collision_collection._managed_collision_modules.{table}",
                                f"._embedding_module.embeddings.{table}.weight")
        # buckets = rows: ManagedIdArch builds every remapping so (any world size dividing the rows shards it)
        moved, source_rows, dropped = reshard_remapping({n: targets[f"{prefix}.{n}"] for n in names}, theirs, mine,
                                                        buckets=mine[-1])
        targets.update({f"{prefix}.{n}": value for n, value in moved.items()})
        targets[weight] = targets[weight][source_rows]
        targets[key] = state[key].clone()
        logger.info("managed ids %s: remapping of %d shards resharded to %d (%d ids lost their row: no room in the "
                    "shard that now owns them)", table, len(theirs) - 1, len(mine) - 1, dropped)


def load_optimizer_state(source: InitSource, state: Dict[str, Any], is_table: Callable[[str], bool]) -> Tuple[int, int]:
    """Copies the source checkpoint's optimizer state into ``state`` (an optimizer ``state_dict()``, its tensors
    updated in place; 0-d ones replaced) where the shapes fit; returns ``(entries taken, entries left fresh)``."""
    stored = ckpt.stored_tensors(source.checkpoint)
    leaves = _tensor_leaves(state.get("state", {}), "state.")
    targets: Dict[str, torch.Tensor] = {}
    for key, value in leaves.items():
        entry = stored.get(f"optim.{key}")
        if entry is not None and _fits(entry[0], value.shape, is_table(key)):
            targets[key] = torch.empty(entry[0], dtype=entry[1])
    if targets:
        ckpt.load_checkpoint(source.checkpoint, {"optim": targets}, restore_rng=False)
    for key, src in targets.items():
        node, leaf = _parent(state, key)
        if node[leaf].dim() == 0 and not isinstance(node[leaf], ShardedTensor):
            node[leaf] = src.to(node[leaf].device, node[leaf].dtype)
        else:
            _copy_rows(node[leaf], src)
    return len(targets), len(leaves) - len(targets)


def _fits(stored: torch.Size, current: torch.Size, table: bool) -> bool:
    """Same shape; or, for a table, the same row width and at most as many rows in the source."""
    if tuple(stored) == tuple(current):
        return True
    return table and len(stored) == len(current) >= 1 and stored[1:] == current[1:] and stored[0] <= current[0]


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies ``src`` into the leading part of ``dst`` (same rank; ``dst`` a tensor or a ShardedTensor whose
    local shards receive the part of ``src`` they cover)."""
    if isinstance(dst, ShardedTensor):
        for shard in dst.local_shards():
            offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            part = src[tuple(slice(o, min(o + n, s)) for o, n, s in zip(offsets, sizes, src.shape))]
            shard.tensor[tuple(slice(0, n) for n in part.shape)].copy_(part)
        return
    with torch.no_grad():
        dst[tuple(slice(0, n) for n in src.shape)].copy_(src)


def _tensor_leaves(tree: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Dotted key -> tensor of every tensor leaf of a nested state dict (DCP's key spelling)."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_tensor_leaves(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def _parent(tree: Dict[str, Any], dotted: str) -> Tuple[Dict[str, Any], str]:
    """The dict holding the leaf ``dotted`` of :func:`_tensor_leaves` and its key there (keys may hold dots)."""
    node, rest = tree, dotted
    while rest not in node:
        key = next(k for k in node if isinstance(node[k], dict) and rest.startswith(f"{k}."))
        node, rest = node[key], rest[len(key) + 1:]
    return node, rest


def _more(keys: List[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
