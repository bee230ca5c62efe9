"""The selective scan as a plain per-time-step loop: the ground truth, and the shared argument checks.

Recurrence, per batch row ``b``, channel ``d`` and state ``n``::

    delta_t = softplus(delta_t + delta_bias)        (each step optional)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t,    h_{-1} = 0
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t     = y_t * silu(z_t)                        (optional)

with the signature, ``(batch, dim, length)`` layout and semantics of ``mamba_ssm``'s
``selective_scan_fn`` (real ``A``). :func:`selective_scan_reference` is written directly from
these equations; the tests compare every other implementation with it, and ``torch.export``
traces it (it has no Python loop over the batch, so the exported program keeps a dynamic batch).
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["ScanOutput", "check_scan_args", "compute_dtype", "selective_scan_reference"]

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    positions: Optional[torch.Tensor] = None,
) -> None:
    """Raises ValueError naming the first argument whose shape does not fit ``u``'s.

    ``positions`` (``(batch,)`` int64, see ``mdaf_rec.ops.selective_scan_fn``) makes ``z``
    ``(batch, dim)``: the gate at the read positions only.
    """
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported (mamba_ssm's Mamba uses real A)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, d_state), got shape {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            if tuple(M.shape) != (dim, d_state):
                raise ValueError(f"{name} must be ({dim}, {d_state}), got {tuple(M.shape)}")
        elif M.dim() == 3:
            if tuple(M.shape) != (batch, d_state, length):
                raise ValueError(
                    f"{name} must be ({batch}, {d_state}, {length}), got {tuple(M.shape)}"
                )
        elif M.dim() == 4:
            if (M.shape[0], M.shape[2], M.shape[3]) != (batch, d_state, length) or (
                dim % M.shape[1] != 0
            ):
                raise ValueError(
                    f"{name} must be ({batch}, groups, {d_state}, {length}) with groups "
                    f"dividing {dim}, got {tuple(M.shape)}"
                )
        else:
            raise ValueError(f"{name} must have 2, 3 or 4 dims, got {tuple(M.shape)}")
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must be ({dim},), got {tuple(D.shape)}")
    if positions is not None:
        if tuple(positions.shape) != (batch,) or positions.dtype != torch.long:
            raise ValueError(
                f"positions must be int64 ({batch},), got {positions.dtype} {tuple(positions.shape)}"
            )
        if z is not None and tuple(z.shape) != (batch, dim):
            raise ValueError(f"with positions, z must be ({batch}, {dim}), got {tuple(z.shape)}")
    elif z is not None and z.shape != u.shape:
        raise ValueError(f"z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must be ({dim},), got {tuple(delta_bias.shape)}")


def selective_scan_reference(
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
) -> ScanOutput:
    """Selective scan as a plain per-timestep loop (ground truth; slow).

    Written directly from the recurrence in the module docstring; differentiable by autograd.
    Computes in float64 for float64 inputs and in float32 otherwise.

    Args:
        u (torch.Tensor): ``(batch, dim, length)`` input.
        delta (torch.Tensor): ``(batch, dim, length)`` step sizes (before bias/softplus).
        A (torch.Tensor): ``(dim, d_state)`` real state matrix (diagonal per channel).
        B (torch.Tensor): ``(dim, d_state)`` constant, ``(batch, d_state, length)`` variable, or
            ``(batch, groups, d_state, length)`` variable shared by ``dim // groups`` channels.
        C (torch.Tensor): same forms as ``B``.
        D (Optional[torch.Tensor]): ``(dim,)`` skip connection.
        z (Optional[torch.Tensor]): ``(batch, dim, length)`` gate; output is ``y * silu(z)``.
        delta_bias (Optional[torch.Tensor]): ``(dim,)`` added to ``delta``.
        delta_softplus (bool): apply softplus to ``delta`` (after the bias).
        return_last_state (bool): also return the final state.

    Returns:
        torch.Tensor or Tuple[torch.Tensor, torch.Tensor]: ``(batch, dim, length)`` output in
        ``u``'s dtype, and, if ``return_last_state``, the ``(batch, dim, d_state)`` last state.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    batch, dim, length = u.shape
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def per_channel(M: torch.Tensor, t: int) -> torch.Tensor:
        # -> (batch, dim, d_state) or (dim, d_state) for step t
        if M.dim() == 2:
            return M
        if M.dim() == 3:
            return M[:, None, :, t]
        return M[:, :, :, t].repeat_interleave(dim // M.shape[1], dim=1)

    h = u.new_zeros(batch, dim, A.shape[1])  # (batch, dim, d_state)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (batch, dim, 1)
        h = torch.exp(dt * A) * h + dt * per_channel(B, t) * u[:, :, t, None]
        ys.append((h * per_channel(C, t)).sum(-1))  # (batch, dim)
    y = torch.stack(ys, dim=-1)  # (batch, dim, length)
    if D is not None:
        y = y + D.to(ct)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


