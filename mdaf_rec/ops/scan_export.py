"""The selective scan for ``torch.export``: plain aten ops, no Python loop over the batch.

What ``selective_scan_fn`` traces under ``torch.export`` (the serving program must load with torch
alone, so it cannot hold the compiled CPU operator, and it keeps a dynamic batch size). One time
step is five ops on ``(batch, dim, d_state)`` tensors that stay in cache (``exp(dt_t A)``, the
input term, one ``addcmul`` for ``h_t = dA_t h_{t-1} + dt_t u_t B_t``, and the output contraction
as one batched matmul), against ~10 in the reference loop. Nothing of size
``batch * dim * length * d_state`` is materialised: computing ``exp(dt A)`` for all steps at once
looks cheaper in op count but is several times slower on a CPU (each full-size op streams ~90 MB
through memory at batch 512). When only one position per row is read (``positions``), the state
there is kept by one ``where`` per step and contracted once.

The same function as :func:`mdaf_rec.ops.scan_reference.selective_scan_reference` (tests compare
them).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from mdaf_rec.ops.scan_reference import ScanOutput, compute_dtype

__all__ = ["selective_scan_unrolled"]


def _per_channel(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as ``(batch or 1, dim or 1, length or 1, d_state)``, broadcastable against the states."""
    if M.dim() == 2:  # (dim, N): constant
        return M[None, :, None, :]
    if M.dim() == 3:  # (batch, N, L)
        return M.transpose(1, 2)[:, None]
    groups = M.shape[1]  # (batch, groups, N, L)
    return M.transpose(2, 3).repeat_interleave(dim // groups, dim=1)


def _step(M: torch.Tensor, t: int) -> torch.Tensor:
    """Time step ``t`` of a :func:`_per_channel` tensor: ``(batch or 1, dim or 1, d_state)``."""
    return M[:, :, t if M.shape[2] > 1 else 0]


def selective_scan_unrolled(
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
    positions: Optional[torch.Tensor] = None,
) -> ScanOutput:
    """``selective_scan_fn``'s arguments (checked by the caller); see the module docstring."""
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    batch, dim, length = u.shape
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dtu = (delta * u).unsqueeze(-1)  # (batch, dim, L, 1)
    dt = delta.unsqueeze(-1)
    Bc, Cc = _per_channel(B.to(ct), dim), _per_channel(C.to(ct), dim)
    h = torch.zeros(batch, dim, A.shape[1], dtype=ct, device=u.device)
    ys = []
    h_read = h
    for t in range(length):
        h = torch.addcmul(dtu[:, :, t] * _step(Bc, t), torch.exp(dt[:, :, t] * A), h)
        if positions is not None:
            h_read = torch.where((positions == t).view(-1, 1, 1), h, h_read)
        else:  # (batch, dim, N) x (batch or 1, N, 1) per channel: sum_n C_t h_t
            ys.append((h * _step(Cc, t)).sum(-1))
    if positions is not None:
        index = positions.view(-1, 1, 1, 1).expand(-1, dim, 1, A.shape[1])
        c_read = Cc.expand(batch, dim, length, -1).gather(2, index).squeeze(2)
        y = (h_read * c_read).sum(-1)  # (batch, dim)
        u = u.gather(2, positions.view(-1, 1, 1).expand(-1, dim, 1)).squeeze(2)
        D = None if D is None else D.to(ct)
    else:
        y = torch.stack(ys, dim=-1)  # (batch, dim, L)
        D = None if D is None else D.to(ct)[:, None]
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
