"""Test guards for GPU rules that can be checked on the CPU.

* :func:`no_host_sync` fails on every device-to-host synchronisation a block of code asks for (on a GPU
  each one stalls the host until the device catches up and defeats ``TrainPipelineSparseDist``'s overlap).
  It catches them by what they are, not by device, so a CPU run finds the same ones a GPU run would:

  - ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``if t:``);
  - ops whose output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``,
    ``unique``, ``repeat_interleave`` without ``output_size``) and ``torch.equal``;
  - ``Tensor.tolist()`` / ``.numpy()`` / ``.cpu()``, which copy to the host.

  A sync belongs to the code that asked for it: the innermost frame outside torch and outside the helpers
  that only do what their caller asks (TorchRec's ``KeyedJaggedTensor`` / ``JaggedTensor``, FBGEMM's Python
  wrappers). Syncs belonging to TorchRec's embedding modules and sharding code are allowed (``allowed_code``):
  their input distribution needs the lookup counts on the host, and the train pipeline runs it ahead of
  time. A KJT method called directly by project code (``kjt.to_dict()``, ``length_per_key()``) is not, nor
  is anything the model's own forward asks for while the pipeline runs it. So a whole training step can be
  checked: ``with no_host_sync(): pipeline.progress(iter(batches))`` with ``batches`` loaded beforehand (the
  loader builds KJTs on the host, where ``tolist()`` waits for nothing; the guard cannot tell host tensors
  from device ones on a CPU run).

* :func:`record_collectives` records the device of every tensor handed to a ``torch.distributed``
  collective, to check it against the backend (:func:`mdaf_rec.distributed.backend_device_types`).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.equal.default,
    _aten._unique2.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim.default,
}
HOST_COPY_METHODS = ("tolist", "numpy", "cpu")
# Code whose own syncs are allowed: TorchRec's embedding modules and sharding (input distribution, pipeline),
# and its optimizer wrappers (torch.optim.Adam reads its step counters, host tensors unless fused/capturable).
ALLOWED_CODE = tuple(os.sep + os.path.join("torchrec", part) + os.sep for part in ("modules", "distributed", "optim"))
# Helpers whose syncs belong to their caller.
_PASS_THROUGH = (os.path.dirname(torch.__file__) + os.sep, os.sep + os.path.join("torchrec", "sparse") + os.sep,
                 os.sep + "fbgemm_gpu" + os.sep)


class HostSyncError(AssertionError):
    """A block under :func:`no_host_sync` synchronised with the device."""


def _is_sync(func: Any, kwargs: Dict[str, Any]) -> bool:
    if func in SYNC_OPS:
        return True
    # repeat_interleave(repeats_tensor) must read the repeats unless output_size is given.
    return func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None


def _owner(stack: Sequence[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame that is neither torch, a pass-through helper, nor this module."""
    for frame in reversed(stack):
        if frame.filename != __file__ and not any(part in frame.filename for part in _PASS_THROUGH):
            return frame
    return None


def _allowed(stack: Sequence[traceback.FrameSummary], allowed_code: Sequence[str]) -> bool:
    owner = _owner(stack)
    return owner is not None and any(part in owner.filename for part in allowed_code)


def _where(stack: Sequence[traceback.FrameSummary]) -> str:
    """The innermost frames outside torch and the helpers (the code that asked for the sync first)."""
    frames = [f for f in stack if f.filename != __file__ and not any(p in f.filename for p in _PASS_THROUGH)]
    return " <- ".join(f"{os.path.relpath(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


class _SyncDetector(TorchDispatchMode):
    def __init__(self, allowed_code: Sequence[str], found: List[str]) -> None:
        super().__init__()
        self.allowed_code = allowed_code
        self.found = found

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _is_sync(func, kwargs):
            stack = traceback.extract_stack()[:-1]
            if not _allowed(stack, self.allowed_code):
                self.found.append(f"{func} at {_where(stack)}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(allowed_code: Sequence[str] = ALLOWED_CODE) -> Iterator[List[str]]:
    """Fails (on exit) listing every host sync the block asked for, with the code that asked.

    Args:
        allowed_code: path fragments; a sync with a frame in a matching file on its stack is allowed.

    Yields:
        The list the syncs found are appended to (empty when the block exits cleanly).
    """
    found: List[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPY_METHODS}

    def guard(name: str) -> Any:
        original = originals[name]

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            stack = traceback.extract_stack()[:-1]
            if not _allowed(stack, allowed_code):
                found.append(f"Tensor.{name}() at {_where(stack)}")
            return original(self, *args, **kwargs)

        return method

    for name in HOST_COPY_METHODS:
        setattr(torch.Tensor, name, guard(name))
    try:
        with _SyncDetector(allowed_code, found):
            yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    if found:
        raise HostSyncError(f"{len(found)} host sync(s):\n" + "\n".join(found))


COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "send",
    "recv",
)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@contextlib.contextmanager
def record_collectives() -> Iterator[List[Tuple[str, List[torch.device]]]]:
    """Records ``(collective name, devices of every tensor argument)`` of each ``torch.distributed``
    collective called inside the block through ``torch.distributed.<name>`` (the collectives still run)."""
    calls: List[Tuple[str, List[torch.device]]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def recorder(name: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, [t.device for v in (*args, *kwargs.values()) for t in _tensors(v)]))
            return originals[name](*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, recorder(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
