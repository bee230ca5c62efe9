"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), verified and loaded without executing pickles.

A checkpoint is a folder ``RUN_DIR/checkpoints/epoch_K/`` (end of epoch K) or ``step_S/`` (inside an
epoch, after global step S) holding

* the DCP files of ``{"model": DMP state dict, "optim": optimizer state}`` — sharded tables are
  written by the ranks that own them and resharded on load, so a checkpoint written by one world size
  loads with another;
* ``state.json`` — the :class:`~mdaf_rec.train_state.TrainState` (position, early stopping, fingerprint);
* ``rng_rank{R}.pt`` — each rank's RNG states (CPU, and CUDA on GPU ranks) as uint8 tensors;
* ``manifest.json`` — size and SHA-256 of every other file, written last by rank 0 from the hashes each rank
  took of its own files while writing them; a checkpoint without it is incomplete. A rank checks each file it
  reads against it right before reading it (and only those), and a file that does not match, or is not listed,
  is refused by name before any of its bytes are parsed. A file this process already hashed is not read again
  unless it changed on disk (:func:`mdaf_rec.manifest.cached_sha256`; trust model in ``docs/launch.md``).

``RUN_DIR/checkpoints/index.json`` points at the ``last`` and ``best`` checkpoints and the kept in-epoch
ones (``steps``); the tool's own checkpoint folders that none of these name are deleted after each save.

Loading never executes a pickle: tensors are read with ``torch.load(weights_only=True)``; DCP's
``.metadata`` file (a protocol-4 pickle, which PyTorch's weights-only unpickler cannot read: it has no
``FRAME`` / ``STACK_GLOBAL`` support) with an unpickler that admits an exact list of ``(module, name)``
pairs — DCP's metadata dataclasses, torch sizes/dtypes/layouts and plain containers — and nothing else:
no module prefix rule, no dotted names, no attribute chains. Optimizer ``param_groups`` (plain
hyper-parameters, rebuilt from the config) are not stored in the DCP files.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import shutil
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from mdaf_rec.manifest import (
    MANIFEST_FILE,
    cached_sha256,
    first_mismatch,
    read_manifest,
    remember_sha256,
    sha256_file,
    write_manifest,
)
from mdaf_rec.errors import UserError
from mdaf_rec.run_dir import CHECKPOINT_NAME, RunDir

if TYPE_CHECKING:
    from mdaf_rec.data.vocab import Vocabularies

logger = logging.getLogger(__name__)

# Export and the tests read checkpoints in a plain process (no process group) on purpose; DCP warns about it on
# every call even with no_dist=True.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to",
    category=UserWarning,
)

INDEX_FILE = "index.json"
STATE_FILE = "state.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or incompatible (the message names the file)."""


# --------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
#: The exact globals a DCP ``.metadata`` pickle may name. Each is a class or a pure lookup function;
#: none can reach another object through its name (names are matched whole, never split at dots).
_ALLOWED_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
})
_TORCH_DTYPES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: exact ``(module, name)`` pairs of :data:`_ALLOWED_GLOBALS` and torch dtypes."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module == "torch" and name in _TORCH_DTYPES):
            return getattr(importlib.import_module(module), name)  # an exact, undotted attribute
        raise CheckpointError(f"{self.source}: refers to {module}.{name}, which a checkpoint may not; refusing to load it")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: holds a persistent reference, which a checkpoint may not; refusing to load it")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` that checks each file against the checkpoint's manifest right before reading it
    (only the files this rank reads) and reads the metadata with :class:`_MetadataUnpickler`.

    Args:
        path: the checkpoint folder.
        files: its manifest (:func:`checkpoint_manifest`), read here when ``None``.
    """

    def __init__(self, path: str, files: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
        super().__init__(path)
        self.files = checkpoint_manifest(Path(path)) if files is None else files

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        names = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
        verify_checkpoint(Path(self.path), names, self.files)
        return super().read_data(plan, planner)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        verify_checkpoint(Path(self.path), [Path(path).name], self.files)
        with self.fs.create_stream(path, "rb") as fh:
            try:
                metadata = _MetadataUnpickler(fh, Path(path)).load()
            except CheckpointError:
                raise
            except Exception as e:  # a truncated or garbled file
                raise CheckpointError(f"{path}: not a readable checkpoint metadata file ({type(e).__name__})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a checkpoint metadata file (holds a {type(metadata).__name__})")
        _check_storage_files(metadata, Path(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_storage_files(metadata: Metadata, path: Path) -> None:
    """Refuses a ``.metadata`` whose entries are read from a file the checkpoint's manifest does not list (one
    outside the folder, or planted in it): only files whose hashes :func:`verify_checkpoint` checked are read."""
    listed = read_manifest(path.parent, CheckpointError, missing="missing (incomplete checkpoint)")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, (str, PurePath)) or PurePath(name).as_posix() not in listed:
            raise CheckpointError(f"{path}: reads its tensors from {name!r}, a file not in the checkpoint's manifest; "
                                  "refusing to load it")


class SafeLoadPlanner(DefaultLoadPlanner):
    """Refuses pickled (non-tensor) entries: a checkpoint written by this module has none."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; refusing to load it")


# --------------------------------------------------------------------------------------------------
# Hashing while writing
# --------------------------------------------------------------------------------------------------


class _HashingStream:
    """A file open for writing that hashes the bytes written through it. A seek (or a short write) makes the
    hash unknown: the file is then hashed once it is written (:meth:`_HashingWriter.written`)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sequential = True
        self._sha = hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if not view.c_contiguous:
            self.sequential = False
            return self.raw.write(data)
        view = view.cast("B")
        n = self.raw.write(view)
        if n == view.nbytes:
            self._sha.update(view)
        else:
            self.sequential = False
        return n

    def seek(self, *args: Any) -> int:
        self.sequential = False
        return self.raw.seek(*args)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ...
        return getattr(self.raw, name)

    def hexdigest(self) -> Optional[str]:
        return self._sha.hexdigest() if self.sequential else None


class _HashingFileSystem(FileSystem):
    """DCP's local file system, hashing every file it writes (``hashes``: path -> sha256, or ``None`` when
    unknown); a rename (DCP writes ``.metadata`` as a temporary file first) carries the hash along."""

    def __init__(self) -> None:
        super().__init__()
        self.hashes: Dict[str, Optional[str]] = {}

    @contextmanager
    def create_stream(self, path: Union[str, "os.PathLike[str]"], mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream)
            yield hashing
        self.hashes[os.fspath(path)] = hashing.hexdigest()

    def rename(self, path: Union[str, "os.PathLike[str]"], new_path: Union[str, "os.PathLike[str]"]) -> None:
        super().rename(path, new_path)
        self.hashes[os.fspath(new_path)] = self.hashes.pop(os.fspath(path), None)


class _HashingWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` (same files, same defaults) that hashes the files of this rank as it writes them."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.fs = _HashingFileSystem()
        self.folder = path

    def written(self) -> Dict[str, Dict[str, Any]]:
        """``{name: {"sha256", "size"}}`` of the files this rank wrote (those still there)."""
        out = {}
        for name, digest in self.fs.hashes.items():
            file = Path(name)
            if file.is_file():
                out[file.relative_to(self.folder).as_posix()] = {"sha256": digest or sha256_file(file),
                                                                 "size": file.stat().st_size}
        return out


def _write_hashed(path: Path, data: bytes) -> Dict[str, Dict[str, Any]]:
    """Writes ``data`` to ``path``; returns its manifest entry ``{path.name: {"sha256", "size"}}``."""
    path.write_bytes(data)
    return {path.name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}


def _gather_at_rank0(files: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Every rank's manifest entries, merged, on rank 0 (``{}`` elsewhere); one ``gather_object``, which also
    makes rank 0 wait until every rank has written its files."""
    if not dist.is_initialized():
        return dict(files)
    gathered: Optional[List[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(files, gathered, dst=0)
    merged: Dict[str, Dict[str, Any]] = {}
    for part in gathered or []:
        merged.update(part)
    return merged


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
    run_dir: Path,
    name: str,
    app_state: Dict[str, Any],
    state: Dict[str, Any],
    *,
    is_best: bool,
    keep_steps: int = 0,
) -> Path:
    """Collectively writes checkpoint ``name`` and updates ``index.json``.

    Args:
        run_dir: the run directory.
        name: checkpoint folder name (``epoch_3``, ``step_120``).
        app_state: ``{"model": ..., "optim": ...}`` state dicts (sharded tensors allowed).
        state: JSON-serialisable training state (written by rank 0).
        is_best: also point ``best`` at this checkpoint.
        keep_steps: for an in-epoch checkpoint, how many of the newest in-epoch checkpoints to keep
            (``0``: this is an epoch checkpoint, which makes the in-epoch ones of this epoch obsolete).
    Returns:
        The checkpoint folder.
    """
    run = RunDir(run_dir)
    path = run.checkpoints / name
    rank = dist.get_rank() if dist.is_initialized() else 0
    writer = _HashingWriter(path)
    try:
        dcp.save(tensor_state(app_state), storage_writer=writer, no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a rank's failed write (disk full) is an OSError inside DCP's BaseException
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, OSError)]
        if not refused:
            raise
        raise refused[0] from None
    files = writer.written()  # this rank's DCP files (and rank 0's .metadata), hashed as they were written
    rng = io.BytesIO()  # torch.save into memory: its archive writer never meets a failing disk (it aborts there)
    torch.save(_rng_state(), rng)
    files.update(_write_hashed(path / f"rng_rank{rank}.pt", rng.getvalue()))
    if rank == 0:
        files.update(_write_hashed(path / STATE_FILE, json.dumps(state, indent=2).encode()))
    for file, entry in files.items():  # a later load in this process need not read them again
        remember_sha256(path / file, entry["sha256"])
    known = _gather_at_rank0(files)
    if rank == 0:
        write_manifest(path, known)
        index = read_index(run_dir) if (run.checkpoints / INDEX_FILE).exists() else {}
        index["last"] = name
        if is_best or ("best" not in index and not keep_steps):  # an in-epoch checkpoint is never "best"
            index["best"] = name
        index["steps"] = (index.get("steps", []) + [name])[-keep_steps:] if keep_steps else []
        _write_json_atomic(run.checkpoints / INDEX_FILE, index)
        kept = {index["last"], index.get("best"), *index["steps"]}
        for child in run.checkpoints.iterdir():
            obsolete = CHECKPOINT_NAME.match(child.name) and child.name not in kept
            if obsolete and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
    if dist.is_initialized():
        dist.barrier()
    return path


def read_index(run_dir: Path) -> Dict[str, Any]:
    """``{"last": name, "best": name, "steps": [names]}`` of a run."""
    path = RunDir(run_dir).checkpoints / INDEX_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint index (was the run trained to its first checkpoint?)")
    index = _read_json(path)
    if not isinstance(index.get("last"), str):
        raise CheckpointError(f"{path}: not a checkpoint index (no valid 'last' entry)")
    names = [("last", index["last"])] + ([("best", index["best"])] if "best" in index else [])
    names += [("steps", name) for name in index.get("steps", [])]
    for key, name in names:  # a folder of this run's checkpoints/, never a path to another run's
        if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
            raise CheckpointError(f"{path}: its {key!r} entry {name!r} is not a checkpoint of this run "
                                  "(expected a name such as 'epoch_3' or 'step_120'); refusing it")
    return index


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """The folder of the ``last`` or ``best`` checkpoint of a run."""
    index = read_index(run_dir)
    if which not in index:
        raise CheckpointError(f"{RunDir(run_dir).checkpoints / INDEX_FILE}: no {which!r} checkpoint")
    checkpoints = RunDir(run_dir).checkpoints
    path = checkpoints / index[which]
    if path.is_symlink():
        raise CheckpointError(f"{path}: a link to {path.resolve()}, not a checkpoint folder of this run; refusing it")
    for required in (MANIFEST_FILE, STATE_FILE, ".metadata"):
        if not (path / required).exists():
            raise CheckpointError(f"{path / required}: missing from checkpoint {index[which]!r} (incomplete checkpoint)")
    return path


def checkpoint_manifest(path: Path) -> Dict[str, Dict[str, Any]]:
    """``{name: {"sha256", "size"}}`` of checkpoint ``path``'s ``manifest.json`` (raises if missing or empty)."""
    files = read_manifest(path, CheckpointError, missing="missing (incomplete checkpoint)")
    if not files:
        raise CheckpointError(f"{path / MANIFEST_FILE}: not a checkpoint manifest (lists no file)")
    return files


def verify_checkpoint(
    path: Path, names: Optional[Sequence[str]] = None, files: Optional[Dict[str, Dict[str, Any]]] = None
) -> Dict[str, Dict[str, Any]]:
    """Checks files of checkpoint ``path`` against its manifest: ``names`` (the ones about to be read), or
    every listed file; raises naming the first bad file. A file this process already hashed (or wrote) is
    not read again unless it changed on disk (:func:`mdaf_rec.manifest.cached_sha256`).

    Args:
        path: the checkpoint folder.
        names: file names relative to ``path`` (default: all in the manifest).
        files: the manifest (:func:`checkpoint_manifest`), read here when ``None``.
    Returns:
        The manifest.
    """
    files = checkpoint_manifest(path) if files is None else files
    bad = first_mismatch(path, files, names, hasher=cached_sha256)
    if bad is not None:
        file, problem = bad
        if problem == "missing":
            raise CheckpointError(f"{file}: missing from checkpoint {path.name!r}")
        if problem == "unlisted":
            raise CheckpointError(f"{file}: not listed in the checkpoint's manifest; refusing to read it")
        raise CheckpointError(
            f"{file}: content does not match the checkpoint's manifest (corrupted or modified); refusing to load it"
        )
    return files


def load_checkpoint(
    path: Path, app_state: Dict[str, Any], partial: Sequence[str] = (), *, restore_rng: bool = True
) -> Dict[str, Any]:
    """Verifies checkpoint ``path``, loads it in place into ``app_state`` (same structure as saved) and
    returns its state.

    Args:
        path: checkpoint folder.
        app_state: ``{"model": ..., "optim": ...}`` (any subset of the saved entries).
        partial: entries allowed to be partly missing from the checkpoint (their missing tensors keep
            their current values) — the optimizer state when resuming under another sharding plan.
        restore_rng: restore this rank's RNG states from the checkpoint (a resume); off for a warm start,
            which keeps the new run's own seeds.
    Every rank restores its own RNG states if the checkpoint has them for that rank (and ``restore_rng``). Each file is checked
    against the manifest right before it is first read, and only the files this rank reads: its share of the
    DCP files (all of them when the checkpoint is resharded, e.g. by export or another world size), the
    metadata, its RNG file and ``state.json``.
    """
    files = checkpoint_manifest(path)
    SafeFileSystemReader(str(path), files).read_metadata()  # refuses a crafted .metadata by name (DCP would wrap it)
    for name, value in app_state.items():
        target = tensor_state({name: value})
        planner = SafeLoadPlanner(allow_partial_load=name in partial)
        try:
            dcp.load(target, storage_reader=SafeFileSystemReader(str(path), files), planner=planner,
                     no_dist=not dist.is_initialized())
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP wraps each rank's failure in a BaseException
            causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
            for cause in causes:
                if isinstance(cause, CheckpointError):
                    raise cause from None
            cause = causes[0] if causes else e
            raise CheckpointError(
                f"{path}: the {name!r} entry does not load ({type(cause).__name__}: {_first_line(cause)})"
            ) from None
        _copy_back(app_state, target)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = path / f"rng_rank{rank}.pt"
    if restore_rng and rng.exists():
        verify_checkpoint(path, [rng.name], files)
        _set_rng_state(rng)
    verify_checkpoint(path, [STATE_FILE], files)
    return read_state(path)


def load_model_weights(path: Path, module: torch.nn.Module) -> Dict[str, Any]:
    """Loads the model weights (not the optimizer state) of checkpoint ``path`` into ``module``; returns its state.

    ``module`` is the DMP of training and evaluation, or an unsharded :class:`~mdaf_rec.models.ctr.CTRTrain`
    (export): both have the keys of the checkpoint's ``"model"`` entry, ``model.<CTRModel key>`` (DMP's state
    dict leaves out DMP's own wrapper prefix; see :mod:`mdaf_rec.trainable`).
    """
    app_state = {"model": module.state_dict()}
    state = load_checkpoint(path, app_state)
    module.load_state_dict(app_state["model"])
    return state


def stored_tensors(path: Path) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    """Key -> (shape, dtype) of every tensor in checkpoint ``path`` (DCP keys: ``model.<state-dict key>``,
    ``optim.state.<parameter>.<state>``), from its verified metadata; no tensor is read."""
    metadata = SafeFileSystemReader(str(path)).read_metadata()
    return {fqn: (torch.Size(m.size), m.properties.dtype) for fqn, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def read_state(path: Path) -> Dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    return _read_json(path / STATE_FILE)


def check_vocabularies(path: Path, vocabs: "Vocabularies") -> None:
    """Raises ``VocabMismatchError`` unless ``vocabs`` are the ones checkpoint ``path`` was trained with."""
    expected = read_state(path).get("vocab_fingerprint")
    if expected is not None:
        vocabs.check_fingerprint(expected, what=f"checkpoint {path}")


def _rng_state() -> Dict[str, torch.Tensor]:
    """This process's RNG states: CPU, and the current CUDA device's on GPU ranks."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(path: Path) -> None:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refusals end with advice to unpickle anyway: never pass it on
        raise CheckpointError(f"{path}: not a plain tensor file ({type(e).__name__}); refusing to load it") from None
    if isinstance(state, torch.Tensor):  # checkpoints written before CUDA states were saved
        state = {"cpu": state}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in state.values()):
        raise CheckpointError(f"{path}: not an RNG state file")
    try:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except (KeyError, RuntimeError) as e:  # no "cpu" entry, or a state of the wrong size for this generator
        raise CheckpointError(f"{path}: not an RNG state of this torch's generators ({_first_line(e)})") from None


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


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
