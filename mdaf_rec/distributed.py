"""Process-group set-up: one code path for 1 process, N local processes (torchrun) or N nodes.

Under ``torchrun`` / TorchX ``dist.ddp`` the launcher exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; a plain ``mdaf-rec train`` has none of them
and runs as a world of one (a process group is still created, because DMP needs one, on an in-process store:
no TCP port).

The backend is ``cpu:gloo,cuda:nccl`` when CUDA is available (NCCL for CUDA tensors, Gloo for CPU
tensors, so CPU-side collectives -- metric gathering, ``broadcast_object_list``, ``barrier`` -- stay
legal; a CPU tensor handed to an NCCL-only group raises), ``gloo`` otherwise.
:func:`collective_device` says on which device a collective's tensors must live.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from mdaf_rec.errors import UserError


CPU_BACKEND = "gloo"
GPU_BACKEND = "cpu:gloo,cuda:nccl"
_BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}
# Set to "1" by launch/components.py:train in a job that asked for no GPU (``--gpu 0``) without ``--cpu_only``.
NO_GPU_REQUESTED = "MDAF_NO_GPU_REQUESTED"
# Environment variables that say a process runs under a cluster scheduler, and the scheduler's name.
_SCHEDULER_MARKERS = {"SLURM_JOB_ID": "Slurm", "KUBERNETES_SERVICE_HOST": "Kubernetes"}


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str  # the default group's: "gloo" on CPU machines, "cpu:gloo,cuda:nccl" on CUDA machines

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> DistEnv:
    """Initialises the default process group from the launcher's environment (or as a world of one).

    Returns:
        The process's :class:`DistEnv`; its ``device`` is ``cuda:LOCAL_RANK`` on GPU machines, its
        ``backend`` the default group's (an existing group is kept as it is).
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = default_backend()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            # A plain single process: an in-process store, no TCP port (a port picked free and then bound by
            # the store can be taken by another process in between: EADDRINUSE).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif restart is None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            # torchrun's static rendezvous keeps one store for all attempts of a job: without a prefix per
            # attempt, a restarted worker can read the addresses the previous attempt's (dead) workers left
            # there and fail to connect ("Connection refused").
            store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"mdaf_rec/attempt_{restart}", store),
                                    rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank, world_size, local_rank, local_world_size, device, str(dist.get_backend()))


def check_gpu_request() -> None:
    """Refuses to train on CPU a job of the TorchX component that, on Slurm or Kubernetes, asked for no GPU
    (``--gpu`` defaults to 0, so the scheduler gives it none and it would train with gloo on CPUs for hours
    without a word); ``--cpu_only`` allows it."""
    if os.environ.get(NO_GPU_REQUESTED) != "1" or torch.cuda.is_available():
        return
    for marker, scheduler in _SCHEDULER_MARKERS.items():
        if marker in os.environ:
            raise UserError(
                f"this job runs on {scheduler} without a GPU: launch/components.py:train was given no --gpu (default 0), "
                "so it would train on CPU with gloo; pass --gpu N (N = --nproc_per_node) to train on GPUs, or "
                "--cpu_only True to train on CPUs"
            )


def default_backend() -> str:
    """``cpu:gloo,cuda:nccl`` on a CUDA machine (CPU tensors go through Gloo), ``gloo`` otherwise."""
    return GPU_BACKEND if torch.cuda.is_available() else CPU_BACKEND


def collective_device(
    group: Optional[dist.ProcessGroup] = None, preferred: Optional[torch.device] = None
) -> torch.device:
    """The device for the tensors of a collective on ``group``.

    Args:
        group: the process group (default: the world).
        preferred: where the data already is; kept when the group's backend takes tensors of its type.

    Returns:
        ``preferred`` if the backend handles its device type; otherwise the CPU when the backend has a
        CPU part (``gloo``, ``cpu:gloo,cuda:nccl``), else the current CUDA device (``nccl`` alone).
    """
    types = backend_device_types(str(dist.get_backend(group)))
    if preferred is not None and preferred.type in types:
        return preferred
    if "cpu" in types:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def backend_device_types(backend: str) -> Tuple[str, ...]:
    """Device types a backend string routes: ``gloo`` -> ``("cpu",)``, ``nccl`` -> ``("cuda",)``,
    ``cpu:gloo,cuda:nccl`` -> ``("cpu", "cuda")``. (Gloo can also move CUDA tensors, slowly through
    the host; the CPU is the device it is used for here.)"""
    if ":" in backend:
        return tuple(pair.split(":", 1)[0] for pair in backend.split(","))
    if backend not in _BACKEND_DEVICE:
        raise ValueError(
            f"unsupported torch.distributed backend {backend!r} (expected gloo, nccl or device:backend pairs)"
        )
    return (_BACKEND_DEVICE[backend],)


def shutdown_distributed() -> None:
    """Destroys the default process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0, or when no process group exists."""
    return not dist.is_initialized() or dist.get_rank() == 0
