"""The selective scan for ``torch.export``: few, large aten ops, no Python loop over the batch.

What ``selective_scan_fn`` traces under ``torch.export`` (the serving program must load with torch
alone, so it cannot hold the compiled CPU operator, and it keeps a dynamic batch size). Organised
for a traced graph, where every op costs an interpreter step:

* everything that does not depend on the state is computed for all time steps at once:
  ``dA = exp(dt A)`` and ``dBu = dt u B`` as ``(batch, dim, length, d_state)`` tensors;
* the recurrence is then one ``addcmul`` per time step, ``h_t = dBu_t + dA_t h_{t-1}``;
* the output contraction ``sum_n C_t h_t`` is one op over the stacked states, or, when only one
  position per row is read (``positions``), a gather of that state and a contraction at it.

The same function as :func:`mdaf_rec.ops.scan_reference.selective_scan_reference` (tests compare
them); it keeps ``batch * dim * length * d_state`` values alive, which is what a forward pass for
serving can afford.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from mdaf_rec.ops.scan_reference import ScanOutput, compute_dtype

__all__ = ["selective_scan_unrolled"]


def _per_channel(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as ``(batch or 1, dim or 1, length or 1, d_state)`` broadcastable against the states."""
    if M.dim() == 2:  # (dim, N): constant
        return M[None, :, None, :]
    if M.dim() == 3:  # (batch, N, L)
        return M.transpose(1, 2)[:, None]
    groups = M.shape[1]  # (batch, groups, N, L)
    return M.transpose(2, 3).repeat_interleave(dim // groups, dim=1)


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
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (batch, dim, L, N)
    dBu = (delta * u).unsqueeze(-1) * _per_channel(B.to(ct), dim)  # (batch, dim, L, N)
    h = dBu[:, :, 0]
    states = [h]
    for t in range(1, length):
        h = torch.addcmul(dBu[:, :, t], dA[:, :, t], h)
        states.append(h)
    Cc = _per_channel(C.to(ct), dim)
    if positions is not None:
        index = positions.view(-1, 1, 1, 1)
        h_at = torch.stack(states, dim=2).gather(2, index.expand(-1, dim, 1, A.shape[1]))
        c_at = Cc.expand(batch, dim, length, -1).gather(2, index.expand(-1, dim, 1, A.shape[1]))
        y = (h_at * c_at).sum(-1).squeeze(2)  # (batch, dim)
        u_at = u.gather(2, positions.view(-1, 1, 1).expand(-1, dim, 1)).squeeze(2)
        if D is not None:
            y = y + D.to(ct) * u_at
        if z is not None:
            y = y * F.silu(z.to(ct))
        return y.to(dtype_in)
    y = (torch.stack(states, dim=2) * Cc).sum(-1)  # (batch, dim, L)
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
