"""Causal depthwise conv1d + SiLU, the input stage of a Mamba block, with one entry point.

:func:`causal_conv1d_silu` computes ``F.silu(F.conv1d(x, weight, bias, padding=K - 1,
groups=dim)[..., :L])`` (``mamba_ssm``'s ``causal_conv1d_fn(..., activation="silu")``): on CPU
with the compiled kernels built (:mod:`mdaf_rec.ops.scan_cpu`) as the custom operator
``mdaf_rec::causal_conv1d_silu_fwd`` (one pass over a strided input, lane-wise over channels; its
backward recomputes the pre-activation), elsewhere -- other devices, other dtypes, under
``torch.export`` -- with those two aten ops. Same values either way (tested).
"""

import threading
from typing import Optional

import torch
import torch.nn.functional as F

from mdaf_rec.ops import scan_cpu
from mdaf_rec.ops.selective_scan import exporting

__all__ = ["causal_conv1d_silu"]

_registered = False
_register_lock = threading.Lock()


def _register_python_parts() -> None:
    """Fake kernels and the autograd formula of the compiled operator (once per process)."""

    @torch.library.register_fake("mdaf_rec::causal_conv1d_silu_fwd")
    def _fwd_fake(x, weight, bias):
        return torch.empty_like(x)  # x's dimension order, as the C++ side

    @torch.library.register_fake("mdaf_rec::causal_conv1d_silu_bwd")
    def _bwd_fake(dy, x, weight, bias):
        return torch.empty_like(x), weight.new_empty(weight.shape), weight.new_empty(
            0 if bias is None else bias.shape[0])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.mdaf_rec.causal_conv1d_silu_bwd(dy, x, weight, bias)
        return dx, dweight, None if bias is None else dbias

    torch.library.register_autograd(
        "mdaf_rec::causal_conv1d_silu_fwd", backward, setup_context=setup_context
    )


def _compiled_op_usable(x: torch.Tensor) -> bool:
    global _registered
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or exporting():
        return False
    if not scan_cpu.available():
        return False
    with _register_lock:
        if not _registered:
            _register_python_parts()
            _registered = True
    return True


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """
    Args:
        x (torch.Tensor): ``(batch, dim, length)``, any strides.
        weight (torch.Tensor): ``(dim, 1, K)`` depthwise kernel (``nn.Conv1d(groups=dim)``'s).
        bias (Optional[torch.Tensor]): ``(dim,)``.

    Returns:
        torch.Tensor: ``(batch, dim, length)`` (in ``x``'s dimension order); position ``t`` depends on
        ``x[..., t - K + 1 : t + 1]``.
    """
    dim, _, width = weight.shape
    if _compiled_op_usable(x) and weight.dtype == x.dtype:
        return torch.ops.mdaf_rec.causal_conv1d_silu_fwd(x, weight[:, 0], bias)
    return F.silu(F.conv1d(x, weight, bias, padding=width - 1, groups=dim)[..., : x.shape[-1]])
