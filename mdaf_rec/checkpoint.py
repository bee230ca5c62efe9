"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loaded without executing pickles.

A checkpoint is a folder ``RUN_DIR/checkpoints/epoch_K/`` holding

* the DCP files of ``{"model": DMP state dict, "optim": optimizer state}`` — sharded tables are
  written by the ranks that own them and resharded on load, so a checkpoint written by one world size
  loads with another;
* ``state.json`` — training position (epochs done, global step), early-stopping state, the data
  vocabulary fingerprint, world size;
* ``rng_rank{R}.pt`` — each rank's torch RNG state (a uint8 tensor).

``RUN_DIR/checkpoints/index.json`` points at the ``last`` and ``best`` checkpoints; folders that are
neither are deleted after each save.

Loading never unpickles arbitrary objects: tensors are read with ``torch.load(weights_only=True)``,
DCP's metadata file with an unpickler that only admits DCP's own metadata classes, and optimizer
``param_groups`` (plain hyper-parameters, rebuilt from the config) are not stored in the DCP files.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from mdaf_rec.errors import UserError

if TYPE_CHECKING:
    from mdaf_rec.data.vocab import Vocabularies

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
STATE_FILE = "state.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or incompatible (the message names the file)."""


# --------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------

_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
_ALLOWED_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP's dataclasses, torch dtypes/sizes and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_ALLOWED_MODULE_PREFIXES) or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read with :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Refuses pickled (non-tensor) entries: a checkpoint written by this module has none."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; refusing to load it")


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def tensor_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """Drops non-tensor leaves (optimizer ``param_groups``) so that DCP stores tensors only."""
    out: Dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            nested = tensor_state(value)
            if nested:
                out[key] = nested
        elif isinstance(value, torch.Tensor):
            out[key] = value
    return out


def save_checkpoint(
    run_dir: Path, name: str, app_state: Dict[str, Any], state: Dict[str, Any], *, is_best: bool
) -> Path:
    """Collectively writes checkpoint ``name`` and updates ``index.json``.

    Args:
        run_dir: the run directory.
        name: checkpoint folder name (``epoch_3``).
        app_state: ``{"model": ..., "optim": ...}`` state dicts (sharded tensors allowed).
        state: JSON-serialisable training state (written by rank 0).
        is_best: also point ``best`` at this checkpoint.
    Returns:
        The checkpoint folder.
    """
    root = run_dir / "checkpoints"
    path = root / name
    rank = dist.get_rank() if dist.is_initialized() else 0
    dcp.save(tensor_state(app_state), checkpoint_id=str(path))
    torch.save(torch.get_rng_state(), path / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (path / STATE_FILE).write_text(json.dumps(state, indent=2))
        index = read_index(run_dir) if (root / INDEX_FILE).exists() else {}
        index["last"] = name
        if is_best or "best" not in index:
            index["best"] = name
        _write_json_atomic(root / INDEX_FILE, index)
        for child in root.iterdir():
            if child.is_dir() and child.name not in index.values():
                shutil.rmtree(child)
    if dist.is_initialized():
        dist.barrier()
    return path


def read_index(run_dir: Path) -> Dict[str, str]:
    """``{"last": name, "best": name}`` of a run."""
    path = run_dir / "checkpoints" / INDEX_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint index (was the run trained to the end of an epoch?)")
    return json.loads(path.read_text())


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """The folder of the ``last`` or ``best`` checkpoint of a run."""
    index = read_index(run_dir)
    if which not in index:
        raise CheckpointError(f"{run_dir / 'checkpoints' / INDEX_FILE}: no {which!r} checkpoint")
    path = run_dir / "checkpoints" / index[which]
    for required in (STATE_FILE, ".metadata"):
        if not (path / required).exists():
            raise CheckpointError(f"{path / required}: missing from checkpoint {index[which]!r}")
    return path


def load_checkpoint(path: Path, app_state: Dict[str, Any], partial: Sequence[str] = ()) -> Dict[str, Any]:
    """Loads a checkpoint in place into ``app_state`` (same structure as saved) and returns its state.

    Args:
        path: checkpoint folder.
        app_state: ``{"model": ..., "optim": ...}`` (any subset of the saved entries).
        partial: entries allowed to be partly missing from the checkpoint (their missing tensors keep
            their current values) — the optimizer state when resuming under another sharding plan.
    Every rank restores its own RNG state if the checkpoint has one for that rank.
    """
    for name, value in app_state.items():
        target = tensor_state({name: value})
        planner = SafeLoadPlanner(allow_partial_load=name in partial)
        dcp.load(target, storage_reader=SafeFileSystemReader(str(path)), planner=planner)
        _copy_back(app_state, target)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def read_state(path: Path) -> Dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    return json.loads((path / STATE_FILE).read_text())


def check_vocabularies(path: Path, vocabs: "Vocabularies") -> None:
    """Raises ``VocabMismatchError`` unless ``vocabs`` are the ones checkpoint ``path`` was trained with."""
    expected = read_state(path).get("vocab_fingerprint")
    if expected is not None:
        vocabs.check_fingerprint(expected, what=f"checkpoint {path}")


def _copy_back(dst: Dict[str, Any], src: Dict[str, Any]) -> None:
    """DCP loads in place into tensors, but replaces non-in-place leaves (0-d tensors such as Adam's
    ``step``); copy the loaded leaves back into the caller's structure."""
    for key, value in src.items():
        if isinstance(value, dict):
            _copy_back(dst[key], value)
        else:
            dst[key] = value


def _write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)

