"""``selective_scan_fn``: the one entry point to the selective scan, choosing the implementation.

======================  ==========================================================================
backend                 used when
======================  ==========================================================================
``"export"``            under ``torch.export`` / fx tracing / TorchScript: plain aten ops, few and
                        large (:mod:`~mdaf_rec.ops.scan_export`; the exported program loads with
                        torch alone and keeps a dynamic batch size)
``"mamba_ssm"``         CUDA tensors and ``mamba_ssm`` importable (:mod:`~mdaf_rec.ops.cuda_kernels`):
                        its fused CUDA kernel
``"torch_gpu"``         other non-CPU tensors: the pure PyTorch scan, whole batch per time step
                        (:func:`~mdaf_rec.ops.scan_torch.gpu_blocks`)
``"cpp"``               CPU tensors and the compiled kernel built (:mod:`~mdaf_rec.ops.scan_cpu`)
``"torch_cpu"``         CPU tensors otherwise: the pure PyTorch scan in cache-sized blocks
======================  ==========================================================================

All compute the same function (tested against the float64 reference,
:func:`~mdaf_rec.ops.scan_reference.selective_scan_reference`, also a backend: ``"reference"``);
see :mod:`~mdaf_rec.ops.scan_reference` for the recurrence.
"""

import contextlib
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F

from mdaf_rec.ops import cuda_kernels, scan_cpu
from mdaf_rec.ops.scan_export import selective_scan_unrolled
from mdaf_rec.ops.scan_reference import ScanOutput, check_scan_args, selective_scan_reference
from mdaf_rec.ops.scan_torch import selective_scan_torch, selective_scan_torch_gpu

# mamba-ssm's CUDA kernel; None where it does not import (CPU machines, a broken build: see cuda_kernels).
mamba_ssm_selective_scan_fn = cuda_kernels.selective_scan_fn

__all__ = ["BACKENDS", "exporting", "forced_backend", "keep_compiled_ops", "scan_backend", "selective_scan_fn"]

_keep_compiled = False


@contextlib.contextmanager
def keep_compiled_ops() -> Iterator[None]:
    """Within the block, ``torch.export`` records the compiled CPU operators (``mdaf_rec::selective_scan_fwd``,
    ``mdaf_rec::causal_conv1d_silu_fwd``) as single nodes instead of tracing the portable forms: the program
    for AOTInductor (:func:`mdaf_rec.serving.export_cpu_program`), which then needs the operators' library."""
    global _keep_compiled
    previous, _keep_compiled = _keep_compiled, True
    try:
        yield
    finally:
        _keep_compiled = previous


def exporting() -> bool:
    """Under torch.export, fx symbolic tracing or TorchScript (not under plain torch.compile,
    where the compiled CPU operator is a single node of the graph), unless within :func:`keep_compiled_ops`."""
    if _keep_compiled:
        return False
    if torch.jit.is_scripting():
        return True
    if torch.compiler.is_exporting():
        return True
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


# Backends taking ``positions`` themselves; the others compute every position and gather.
_READ_AT_POSITIONS = {"cpp", "export"}

BACKENDS: Dict[str, Callable[..., ScanOutput]] = {
    "reference": selective_scan_reference,
    "export": selective_scan_unrolled,
    "mamba_ssm": lambda *a, **k: mamba_ssm_selective_scan_fn(*a, **k),
    "torch_gpu": selective_scan_torch_gpu,
    "cpp": scan_cpu.selective_scan_cpu,
    "torch_cpu": selective_scan_torch,
}


_forced: Optional[str] = None


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Within the block, ``selective_scan_fn`` uses backend ``name`` (benchmarks, tests)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown selective scan backend {name!r}; known: {sorted(BACKENDS)}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def scan_backend(u: torch.Tensor) -> str:
    """The :data:`BACKENDS` key ``selective_scan_fn`` uses for input ``u`` here and now."""
    if _forced is not None:
        return _forced
    if exporting():
        return "export"
    if u.device.type == "cuda" and mamba_ssm_selective_scan_fn is not None:
        return "mamba_ssm"
    if u.device.type != "cpu":
        return "torch_gpu"
    return "cpp" if scan_cpu.available() else "torch_cpu"


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    positions: Optional[torch.Tensor] = None,
) -> ScanOutput:
    """Selective scan with ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``'s signature.

    Args:
        u (torch.Tensor): ``(batch, dim, length)`` input.
        delta (torch.Tensor): ``(batch, dim, length)`` step sizes (before bias/softplus).
        A (torch.Tensor): ``(dim, d_state)`` real state matrix (negative for a stable scan).
        B (torch.Tensor): ``(dim, d_state)`` constant, ``(batch, d_state, length)`` variable, or
            ``(batch, groups, d_state, length)`` variable shared by ``dim // groups`` channels.
        C (torch.Tensor): same forms as ``B``.
        D (Optional[torch.Tensor]): ``(dim,)`` skip connection ``y += D * u``.
        z (Optional[torch.Tensor]): ``(batch, dim, length)`` gate, ``y *= silu(z)``;
            ``(batch, dim)`` with ``positions``.
        delta_bias (Optional[torch.Tensor]): ``(dim,)`` added to ``delta``.
        delta_softplus (bool): apply softplus to ``delta`` after the bias.
        return_last_state (bool): also return the ``(batch, dim, d_state)`` final state (not
            differentiable, as in ``mamba_ssm``).
        positions (Optional[torch.Tensor]): ``(batch,)`` int64 in ``[0, length)``: return only
            ``y[b, :, positions[b]]``, ``(batch, dim)`` (not with ``return_last_state``). The
            compiled CPU kernel then skips the output contraction elsewhere and every step
            after the position, the export form contracts at the position only; the other
            backends compute all steps and gather.

    Returns:
        torch.Tensor or Tuple[torch.Tensor, torch.Tensor]: the output in ``u``'s dtype and, if
        ``return_last_state``, the last state in the compute dtype (float32, or float64 for
        float64 inputs).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, positions)
    backend = scan_backend(u)
    if positions is None:
        return BACKENDS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 return_last_state)
    if return_last_state:
        raise ValueError("selective_scan_fn: positions and return_last_state are exclusive")
    if backend in _READ_AT_POSITIONS:
        return BACKENDS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 positions=positions)
    y = BACKENDS[backend](u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    index = positions.view(-1, 1, 1).expand(-1, y.shape[1], 1)
    y = y.gather(2, index).squeeze(2)  # (batch, dim)
    return y if z is None else y * F.silu(z.to(y.dtype))
