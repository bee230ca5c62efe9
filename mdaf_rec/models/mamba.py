"""Mamba selective state-space model in pure PyTorch, and the Mamba4Rec sequence encoder.

This module re-implements, from the equations, the pieces of ``state-spaces/mamba``
(``mamba_ssm``) that the MDAF sequential branch needs, so that the model trains on CPU-only
machines where the CUDA kernels of ``mamba_ssm`` cannot be built:

* :func:`selective_scan` -- the selective scan with exactly the signature, layout and semantics
  of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``;
* :func:`selective_scan_reference` -- a per-timestep loop written directly from the recurrence,
  the documented ground truth used by the tests and ``tools/bench_scan.py``;
* :class:`MambaBlock` -- the Mamba mixer with ``mamba_ssm.Mamba``'s parameter names, shapes and
  initialisation (state dicts are interchangeable); on CUDA tensors it uses ``mamba_ssm``'s fused
  kernels when that package is importable;
* :class:`Mamba4RecLayer` / :class:`Mamba4RecEncoder` -- the layer stack of Mamba4Rec
  (Liu et al., "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State
  Space Models", arXiv:2403.03900), reading out the last valid position of right-padded
  sequences.

Selective scan recurrence, per batch ``b``, channel ``d`` and state ``n``::

    delta_t = softplus(delta_t + delta_bias)        (each step optional)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t,    h_{-1} = 0
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t     = y_t * silu(z_t)                        (optional)

How :func:`selective_scan` is computed, and why it is not a log-depth parallel scan: on one
CPU core nothing runs in parallel, so only the amount of work and memory traffic count. The
dominant cost is the ``batch * dim * length * d_state`` exponentials ``exp(delta A)``.
Log-depth scans (Blelloch, e.g. ``mambapy.pscan``) do more multiply-adds than the recurrence
on full-size tensors; chunked closed forms (masked segment sums of cumulative log-decays, as
in Mamba-2's SSD, which only exponentiate non-positive numbers) need an exponential for every
``(t, s)`` pair of a chunk *and* every state ``n`` (``A`` has a state axis here), i.e.
``chunk / 2`` times more exponentials and a ``(batch, dim, length, chunk, d_state)``
intermediate. The unsafe closed form ``exp(S_t) * cumsum(exp(-S_s) x_s)`` overflows. So
:func:`selective_scan` runs the exact sequential recurrence, organised for a CPU:

* a custom :class:`torch.autograd.Function` with an analytic backward (the adjoint recurrence
  run backwards) and in-place ``addcmul_`` steps, so autograd records one node instead of ~10
  per time step and no per-step tensors are allocated;
* work in blocks of ``block_b`` batch rows x ``block_l`` time steps (by default whole sequences
  and ~4 rows at batch 256, dim 256, length 50, d_state 16), held in three reused
  ``(b, dim, l, d_state)`` scratch tensors of ~3 MiB that stay in cache -- including the
  bias/softplus of ``delta`` and the ``D``/``z`` epilogue, so no full-size temporaries exist;
* nothing of size ``length * d_state`` is kept for the backward pass (only the states at
  time-chunk boundaries, none by default): each block's states are recomputed there
  (activation checkpointing), so memory stays at the size of the inputs plus the scratch;
* contractions over ``d_state`` as an elementwise product + matrix-vector product with ones
  (several times faster than ``bmm`` with a trailing dim of 1);
* ``exp(delta A)`` computed as ``exp2(delta * (A log2 e))``: ``torch.exp2`` is ~2.7x faster
  than ``torch.exp`` on CPU, for a few ulps of extra rounding.

It is exact up to floating-point rounding: it evaluates the same recurrence, step by step, as
the reference loop (no approximation; with ``delta >= 0`` and ``A <= 0``, as in Mamba, only
non-positive numbers are exponentiated). Measured numbers: ``docs/benchmarks.md``.
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mdaf_rec.models.tracing import is_tracing

try:  # CUDA fast path; not installable on CPU-only machines.
    from mamba_ssm.ops.selective_scan_interface import (  # type: ignore[import-not-found]
        mamba_inner_fn as _mamba_inner_fn,
    )
except ImportError:  # pragma: no cover - depends on the environment
    _mamba_inner_fn = None

try:
    from causal_conv1d import (  # type: ignore[import-not-found]
        causal_conv1d_fn as _causal_conv1d_fn,
    )
except ImportError:  # pragma: no cover - depends on the environment
    _causal_conv1d_fn = None

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "MambaBlock",
    "FeedForward",
    "Mamba4RecLayer",
    "Mamba4RecEncoder",
]

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

# Scratch budget per (block_b, dim, block_l, d_state) block tensor, in elements. Three live at
# once in the backward pass: 3 x 3.2 MiB in float32, inside a typical L2 + L3. Blocks span the
# whole sequence when it fits (block_l = length) and then as many batch rows as fit.
_BLOCK_ELEMS = 4 * 256 * 50 * 16
_LOG2E = math.log2(math.e)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
) -> None:
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
    if z is not None and z.shape != u.shape:
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
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    ct = _compute_dtype(dtype_in)
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


def _view(buf: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Contiguous ``shape`` view of the front of the flat scratch buffer ``buf``."""
    return buf[: math.prod(shape)].view(shape)


def _split(total: int, size: int):
    """Yield ``(start, stop)`` ranges of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _outer(x: torch.Tensor, M: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b, d, l, n] = x[b, d, l] * M[b, group(d), l, n]`` (variable) or ``* M[d, n]``.

    Args:
        x (torch.Tensor): ``(b, dim, l)``.
        M (torch.Tensor): ``(b, groups, l, d_state)`` block of a variable B/C, or a constant
            ``(dim, d_state)``.
        out (torch.Tensor): ``(b, dim, l, d_state)`` contiguous, written in place.
    """
    if M.dim() == 2:
        torch.mul(x.unsqueeze(-1), M.unsqueeze(1), out=out)
        return
    bb, dim, ll, d_state = out.shape
    groups = M.shape[1]
    torch.mul(
        x.reshape(bb, groups, dim // groups, ll, 1),
        M.unsqueeze(2),  # (b, groups, 1, l, d_state)
        out=out.view(bb, groups, dim // groups, ll, d_state),
    )


def _contract_n(
    s: torch.Tensor, M: torch.Tensor, scratch: torch.Tensor, ones: torch.Tensor
) -> torch.Tensor:
    """``sum_n s[b, d, l, n] * M[..., n]`` -> ``(b, dim, l)`` (``M`` as in :func:`_outer`).

    Elementwise product into ``scratch`` (shaped like ``s``), then a matrix-vector product
    with ``ones`` (``(d_state,)``): several times faster on CPU than a ``bmm`` with a trailing
    dim of 1.
    """
    bb, dim, ll, d_state = s.shape
    if M.dim() == 2:
        torch.mul(s, M.unsqueeze(1), out=scratch)
    else:
        groups = M.shape[1]
        torch.mul(
            s.view(bb, groups, dim // groups, ll, d_state),
            M.unsqueeze(2),
            out=scratch.view(bb, groups, dim // groups, ll, d_state),
        )
    return torch.mv(scratch.view(-1, d_state), ones).view(bb, dim, ll)


def _contract_d(
    s: torch.Tensor, x: torch.Tensor, groups: int, var: bool, scratch: torch.Tensor
) -> torch.Tensor:
    """Gradient of a B/C that enters as ``x outer M``: ``sum_d s[b, d, l, n] x[b, d, l]``.

    Returns ``(b, groups, l, d_state)`` (sum over each group's channels) if ``var``, else the
    gradient of a constant ``(dim, d_state)`` B/C (sum over ``b`` and ``l``).
    """
    bb, dim, ll, d_state = s.shape
    torch.mul(s, x.unsqueeze(-1), out=scratch)
    if not var:
        return scratch.sum((0, 2))
    ones = s.new_ones(1, dim // groups)
    return torch.matmul(ones, scratch.view(bb * groups, dim // groups, ll * d_state)).view(
        bb, groups, ll, d_state
    )


def _scan_block(
    dt: torch.Tensor,
    dtu: torch.Tensor,
    A_log2e: torch.Tensor,
    B: torch.Tensor,
    h_prev: Optional[torch.Tensor],
    a: torch.Tensor,
    h: torch.Tensor,
) -> Tuple[torch.Tensor, ...]:
    """Fill ``a`` with ``exp(dt A)`` and ``h`` with the states of one block, in place.

    Args:
        dt, dtu (torch.Tensor): ``(b, dim, l)`` step sizes and ``dt * u``.
        A_log2e (torch.Tensor): ``(dim, d_state)`` ``A * log2(e)``.
        B (torch.Tensor): block of B as in :func:`_outer`.
        h_prev (Optional[torch.Tensor]): ``(b, dim, d_state)`` state before the block
            (``None``: zeros).
        a, h (torch.Tensor): ``(b, dim, l, d_state)`` contiguous outputs.

    Returns:
        Tuple[torch.Tensor, ...]: ``a``'s per-time-step ``(b, dim, d_state)`` views.
    """
    # exp(dt A) as 2 ** (dt * A log2(e)): torch.exp2 is ~2.7x faster than torch.exp on CPU
    # (this is the dominant cost); the extra rounding of the product is a few ulps at most.
    # With dt >= 0 and A <= 0 only non-positive numbers are exponentiated.
    torch.mul(dt.unsqueeze(-1), A_log2e.unsqueeze(1), out=a)
    a.exp2_()
    _outer(dtu, B, out=h)  # dt u B
    hs, as_ = h.unbind(2), a.unbind(2)  # per time step, (b, dim, d_state) views
    if h_prev is not None:
        hs[0].addcmul_(as_[0], h_prev)
    for t in range(1, len(hs)):
        hs[t].addcmul_(as_[t], hs[t - 1])  # h_t = a_t h_{t-1} + dt_t u_t B_t
    return as_


def _delta_block(
    delta: torch.Tensor, delta_bias: Optional[torch.Tensor], delta_softplus: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(delta + delta_bias, dt)`` for a ``(b, dim, l)`` block; ``dt`` is softplus'd if asked."""
    x = delta if delta_bias is None else delta + delta_bias[:, None]
    return x, (F.softplus(x) if delta_softplus else x)


class _SelectiveScanFn(torch.autograd.Function):
    """Selective scan with an analytic backward; see :func:`selective_scan`.

    All tensor inputs are already in the compute dtype; ``B``/``C`` are ``(dim, d_state)`` or
    ``(batch, groups, d_state, length)``. Everything, including the bias/softplus of ``delta``
    and the ``D``/``z`` epilogue, runs over blocks of ``block_b`` batch rows x ``block_l``
    time steps held as ``(b, dim, l, d_state)`` scratch tensors that are reused from block to
    block and stay in cache; nothing of size ``length * d_state`` is allocated. Only the states
    at time-chunk boundaries are saved; the backward pass recomputes each block's states and
    runs the adjoint recurrence ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` backwards.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor],
        z: Optional[torch.Tensor],
        delta_bias: Optional[torch.Tensor],
        delta_softplus: bool,
        block_b: int,
        block_l: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        batch, dim, length = u.shape
        d_state = A.shape[1]
        # (batch, groups, length, d_state): a block's time steps are contiguous rows
        Bt = B.transpose(2, 3).contiguous() if B.dim() == 4 else B
        Ct = C.transpose(2, 3).contiguous() if C.dim() == 4 else C
        A_log2e = A * _LOG2E
        chunks = list(_split(length, block_l))
        save = any(ctx.needs_input_grad[:8])
        # state after each time chunk but the last (= the next chunk's initial state)
        chunk_states = u.new_empty(len(chunks) - 1, batch, dim, d_state) if save else None
        out = torch.empty_like(u)
        y_pre = torch.empty_like(u) if z is not None and save else None
        last_state = u.new_empty(batch, dim, d_state)
        numel = min(block_l, length) * min(block_b, batch) * dim * d_state
        a_buf, h_buf = u.new_empty(numel), u.new_empty(numel)
        ones = u.new_ones(d_state)
        for b0, b1 in _split(batch, block_b):
            h_prev: Optional[torch.Tensor] = None
            for c, (l0, l1) in enumerate(chunks):
                shape = (b1 - b0, dim, l1 - l0, d_state)
                a, h = _view(a_buf, shape), _view(h_buf, shape)
                u_b = u[b0:b1, :, l0:l1]  # (b, dim, l)
                dt_b = _delta_block(delta[b0:b1, :, l0:l1], delta_bias, delta_softplus)[1]
                Bb = Bt[b0:b1, :, l0:l1] if Bt.dim() == 4 else Bt
                Cb = Ct[b0:b1, :, l0:l1] if Ct.dim() == 4 else Ct
                _scan_block(dt_b, dt_b * u_b, A_log2e, Bb, h_prev, a, h)
                y_b = _contract_n(h, Cb, a, ones)  # y_t = C_t . h_t   (b, dim, l)
                if D is not None:
                    y_b.addcmul_(u_b, D[:, None])
                if z is not None:
                    if y_pre is not None:
                        y_pre[b0:b1, :, l0:l1] = y_b  # saved for dL/dz
                    z_b = z[b0:b1, :, l0:l1]
                    y_b.mul_(torch.sigmoid(z_b).mul_(z_b))  # * silu(z)
                out[b0:b1, :, l0:l1] = y_b
                if l1 == length:
                    last_state[b0:b1] = h[:, :, -1]
                elif chunk_states is not None:
                    h_prev = chunk_states[c, b0:b1]
                    h_prev.copy_(h[:, :, -1])
                else:
                    h_prev = h[:, :, -1].clone()
        ctx.mark_non_differentiable(last_state)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states, y_pre)
        ctx.config = (delta_softplus, block_b, block_l)
        return out, last_state

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlast: Optional[torch.Tensor]):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, chunk_states, y_pre = ctx.saved_tensors
        delta_softplus, block_b, block_l = ctx.config
        batch, dim, length = u.shape
        d_state = A.shape[1]
        var_b, var_c = B.dim() == 4, C.dim() == 4
        Bt = B.transpose(2, 3).contiguous() if var_b else B  # (batch, groups, L, N)
        Ct = C.transpose(2, 3).contiguous() if var_c else C
        dout = dout.contiguous()
        d_u, d_delta = torch.empty_like(u), torch.empty_like(u)
        d_z = None if z is None else torch.empty_like(z)
        d_D = None if D is None else torch.zeros_like(D)
        d_bias = None if delta_bias is None else torch.zeros_like(delta_bias)
        d_A = torch.zeros_like(A)
        d_B = torch.empty_like(Bt) if var_b else torch.zeros_like(B)
        d_C = torch.empty_like(Ct) if var_c else torch.zeros_like(C)
        numel = min(block_l, length) * min(block_b, batch) * dim * d_state
        a_buf, h_buf, g_buf = (u.new_empty(numel) for _ in range(3))
        ones = u.new_ones(d_state)
        A_log2e = A * _LOG2E
        chunks = list(enumerate(_split(length, block_l)))
        for b0, b1 in _split(batch, block_b):
            ag_next: Optional[torch.Tensor] = None  # a_{t+1} g_{t+1} just after the chunk
            for c, (l0, l1) in reversed(chunks):
                shape = (b1 - b0, dim, l1 - l0, d_state)
                a, h, g = _view(a_buf, shape), _view(h_buf, shape), _view(g_buf, shape)
                h_prev = chunk_states[c - 1, b0:b1] if c > 0 else None
                Bb = Bt[b0:b1, :, l0:l1] if var_b else Bt
                Cb = Ct[b0:b1, :, l0:l1] if var_c else Ct
                u_b = u[b0:b1, :, l0:l1]  # (b, dim, l)
                x_b, dt_b = _delta_block(delta[b0:b1, :, l0:l1], delta_bias, delta_softplus)
                dtu_b = dt_b * u_b
                as_ = _scan_block(dt_b, dtu_b, A_log2e, Bb, h_prev, a, h)  # recompute the states
                dy_b = dout[b0:b1, :, l0:l1]
                if z is not None:  # out = y_pre * z * sigmoid(z)
                    z_b = z[b0:b1, :, l0:l1]
                    sig = torch.sigmoid(z_b)
                    # d silu(z)/dz = sig (1 + z (1 - sig))
                    dsilu = (1 - sig).mul_(z_b).add_(1).mul_(sig)
                    d_z[b0:b1, :, l0:l1] = dsilu.mul_(y_pre[b0:b1, :, l0:l1]).mul_(dy_b)
                    dy_b = dy_b * sig.mul_(z_b)  # dL/dy_pre = dout silu(z)
                if d_D is not None:
                    d_D.add_((dy_b * u_b).sum((0, 2)))
                # adjoint: g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}
                _outer(dy_b, Cb, out=g)
                gs = g.unbind(2)
                if ag_next is not None:
                    gs[-1].add_(ag_next)
                for t in range(len(gs) - 2, -1, -1):
                    gs[t].addcmul_(as_[t + 1], gs[t + 1])
                # w_t = dL/d(dt_t A) = g_t h_{t-1} a_t, in place in a
                a.mul_(g)
                ag_next = as_[0].clone() if c > 0 else None
                a[:, :, 1:].mul_(h[:, :, :-1])
                if h_prev is None:
                    as_[0].zero_()
                else:
                    as_[0].mul_(h_prev)
                w = a
                # dC_t = sum_d dy_t h_t; h is free afterwards (scratch)
                if var_c:
                    d_C[b0:b1, :, l0:l1] = _contract_d(h, dy_b, Ct.shape[1], True, h)
                else:
                    d_C.add_(_contract_d(h, dy_b, 1, False, h))
                d_dtu = _contract_n(g, Bb, h, ones)  # dL/d(dt u)_t = B_t . g_t
                if var_b:  # dB_t = sum_d g_t (dt u)_t; g is free afterwards
                    d_B[b0:b1, :, l0:l1] = _contract_d(g, dtu_b, Bt.shape[1], True, g)
                else:
                    d_B.add_(_contract_d(g, dtu_b, 1, False, g))
                d_dt_b = _contract_n(w, A, h, ones).addcmul_(d_dtu, u_b)  # sum_n w A + ...
                d_u_b = d_dtu.mul_(dt_b)
                if D is not None:
                    d_u_b.addcmul_(dy_b, D[:, None])
                d_u[b0:b1, :, l0:l1] = d_u_b
                # dA = sum_{b, t} dt_t w_t
                d_A.add_(torch.matmul(dt_b.unsqueeze(2), w).sum(0).squeeze(1))
                if delta_softplus:  # softplus'(x) = sigmoid(x); 1 above F.softplus's threshold
                    d_dt_b.mul_(torch.where(x_b > 20, 1.0, torch.sigmoid(x_b)))
                d_delta[b0:b1, :, l0:l1] = d_dt_b
                if d_bias is not None:
                    d_bias.add_(d_dt_b.sum((0, 2)))
        if var_b:
            d_B = d_B.transpose(2, 3)
        if var_c:
            d_C = d_C.transpose(2, 3)
        return (d_u, d_delta, d_A, d_B, d_C, d_D, d_z, d_bias, None, None, None)


def selective_scan(
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
    block_b: Optional[int] = None,
    block_l: Optional[int] = None,
) -> ScanOutput:
    """Selective scan, a drop-in for ``mamba_ssm``'s ``selective_scan_fn`` (pure PyTorch).

    Same signature, ``(batch, dim, length)`` layout and semantics as ``selective_scan_fn``
    (real ``A`` only); exact to floating-point rounding against
    :func:`selective_scan_reference`; differentiable with an analytic backward (no double
    backward). As in ``mamba_ssm``, no gradient flows through the returned last state.

    Args:
        u (torch.Tensor): ``(batch, dim, length)`` input.
        delta (torch.Tensor): ``(batch, dim, length)`` step sizes (before bias/softplus).
        A (torch.Tensor): ``(dim, d_state)`` real state matrix (negative for a stable scan).
        B (torch.Tensor): ``(dim, d_state)`` constant, ``(batch, d_state, length)`` variable, or
            ``(batch, groups, d_state, length)`` variable shared by ``dim // groups`` channels.
        C (torch.Tensor): same forms as ``B``.
        D (Optional[torch.Tensor]): ``(dim,)`` skip connection ``y += D * u``.
        z (Optional[torch.Tensor]): ``(batch, dim, length)`` gate, ``y *= silu(z)``.
        delta_bias (Optional[torch.Tensor]): ``(dim,)`` added to ``delta``.
        delta_softplus (bool): apply softplus to ``delta`` after the bias.
        return_last_state (bool): also return the final state.
        block_b (Optional[int]): batch rows per block (performance knob; default: as many as
            fit a cache-sized budget, at least 1).
        block_l (Optional[int]): time steps per block (performance knob; default: the whole
            sequence if one batch row fits the budget).

    Returns:
        torch.Tensor or Tuple[torch.Tensor, torch.Tensor]: ``(batch, dim, length)`` output in
        ``u``'s dtype, and, if ``return_last_state``, the ``(batch, dim, d_state)`` last state
        in the compute dtype (float32, or float64 for float64 inputs).
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    ct = _compute_dtype(dtype_in)
    batch, dim, length = u.shape
    d_state = A.shape[1]

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(ct)

    # like selective_scan_fn: time must be the unit-stride dim (the blocks slice along it)
    u, delta = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta))
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    B_c = B.to(ct).unsqueeze(1) if B.dim() == 3 else B.to(ct)  # (batch, 1, N, L) or as is
    C_c = C.to(ct).unsqueeze(1) if C.dim() == 3 else C.to(ct)
    block_l = min(length, block_l or max(1, _BLOCK_ELEMS // (dim * d_state)))
    block_b = min(batch, block_b or max(1, _BLOCK_ELEMS // (block_l * dim * d_state)))
    out, last_state = _SelectiveScanFn.apply(
        u.to(ct),
        delta.to(ct),
        A.to(ct),
        B_c,
        C_c,
        cast(D),
        cast(z),
        cast(delta_bias),
        delta_softplus,
        block_b,
        block_l,
    )
    out = out.to(dtype_in)
    return (out, last_state) if return_last_state else out


class MambaBlock(nn.Module):
    """Mamba mixer (selective SSM block), parameter-compatible with ``mamba_ssm.Mamba``.

    ``in_proj`` -> (x, z); x -> causal depthwise ``conv1d`` -> SiLU -> ``x_proj`` ->
    (dt, B, C); ``dt_proj`` (its bias is the scan's ``delta_bias``, with softplus);
    ``selective_scan(x, dt, A = -exp(A_log), B, C, D, z)`` -> ``out_proj``.

    Parameter names, shapes and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba``
    (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj`` with the variance-preserving weight init and
    an inverse-softplus bias so that ``softplus(dt_proj.bias)`` is log-uniform in
    ``[dt_min, dt_max]``, ``A_log`` with the S4D-real init ``log(1..d_state)``, ``D`` = 1,
    ``out_proj``), so state dicts load either way. On CUDA tensors, if ``mamba_ssm`` and
    ``causal_conv1d`` are importable, the fused ``mamba_inner_fn`` kernel is used; otherwise the
    pure-PyTorch :func:`selective_scan`. Inference-time step caching is not implemented.

    Args:
        d_model (int): model width ``d_model``.
        d_state (int): SSM state size ``N``.
        d_conv (int): causal convolution width.
        expand (int): ``d_inner = expand * d_model``.
        dt_rank (Union[int, str]): rank of the dt projection; ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min (float): smallest initial step size.
        dt_max (float): largest initial step size.
        dt_init (str): ``"random"`` (uniform) or ``"constant"`` init of ``dt_proj.weight``.
        dt_scale (float): scale of the ``dt_proj.weight`` init.
        dt_init_floor (float): floor of the initial step sizes.
        conv_bias (bool): whether ``conv1d`` has a bias.
        bias (bool): whether ``in_proj`` / ``out_proj`` have biases.
        use_fast_path (bool): allow the fused CUDA kernels when available.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,  # depthwise
            padding=d_conv - 1,  # + keeping the first L outputs = causal
            bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # dt projection: weight init preserving variance; bias = softplus^{-1}(dt) for dt
        # log-uniform in [dt_min, dt_max] (floored at dt_init_floor).
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))  # softplus(inv_softplus_dt) == dt
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus_dt)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]  # as mamba_ssm

        # S4D-real initialisation: A[d, n] = -(n + 1), stored as log in float32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # (d_inner, d_state)
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner))  # skip connection, float32
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _fast_path_ok(self, x: torch.Tensor) -> bool:
        return (
            self.use_fast_path
            and x.is_cuda
            and _mamba_inner_fn is not None
            and _causal_conv1d_fn is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``[B, L, d_model]`` input sequence.

        Returns:
            torch.Tensor: ``[B, L, d_model]``; position ``t`` depends only on ``x[:, :t + 1]``.
        """
        seqlen = x.shape[1]
        # [B, L, 2 * d_inner] -> [B, 2 * d_inner, L] (the scan's channel-major layout)
        xz = self.in_proj(x).transpose(1, 2).contiguous()
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state), negative
        if self._fast_path_ok(x):  # pragma: no cover - needs CUDA and mamba_ssm
            return _mamba_inner_fn(
                xz,
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,  # input-dependent B
                None,  # input-dependent C
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
        x_in, z = xz.chunk(2, dim=1)  # 2 x [B, d_inner, L]
        x_in = F.silu(self.conv1d(x_in)[..., :seqlen])  # causal depthwise conv, [B, d_inner, L]
        x_dbl = self.x_proj(x_in.transpose(1, 2))  # [B, L, dt_rank + 2 * d_state]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = torch.matmul(self.dt_proj.weight, dt.transpose(1, 2))  # [B, d_inner, L], no bias
        # torch.export: the blocked scan loops over batch blocks (specialising the batch size);
        # the reference recurrence has the same result (to rounding) for any batch size.
        scan = selective_scan_reference if is_tracing() else selective_scan
        y = scan(
            x_in,
            dt,
            A,
            B.transpose(1, 2),  # [B, d_state, L]
            C.transpose(1, 2),  # [B, d_state, L]
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )  # [B, d_inner, L]
        return self.out_proj(y.transpose(1, 2))  # [B, L, d_model]


class FeedForward(nn.Module):
    """Mamba4Rec's position-wise feed-forward sub-layer with a residual LayerNorm.

    ``LayerNorm(x + dropout(w_2(dropout(GELU(w_1(x))))))``.

    Args:
        d_model (int): model width.
        inner_size (int): hidden width.
        dropout (float): dropout rate.
    """

    def __init__(self, d_model: int, inner_size: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``[B, L, d_model]``.

        Returns:
            torch.Tensor: ``[B, L, d_model]``.
        """
        hidden = self.dropout(self.activation(self.w_1(x)))  # [B, L, inner_size]
        hidden = self.dropout(self.w_2(hidden))  # [B, L, d_model]
        return self.LayerNorm(hidden + x)


class Mamba4RecLayer(nn.Module):
    """One Mamba4Rec layer: Mamba -> dropout -> residual LayerNorm -> feed-forward.

    ``s = LayerNorm(x + dropout(Mamba(x)))`` (Mamba4Rec drops the residual when the model
    has a single layer: ``residual=False``), then ``FeedForward(s)`` with inner size
    ``4 * d_model``, GELU and its own residual LayerNorm. Module names (``mamba``, ``dropout``,
    ``LayerNorm``, ``ffn.w_1`` ...) match Mamba4Rec's ``MambaLayer``.

    Args:
        d_model (int): model width.
        d_state (int): SSM state size.
        d_conv (int): causal convolution width.
        expand (int): Mamba expansion factor.
        dropout (float): dropout rate.
        residual (bool): add the input before the first LayerNorm.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dropout: float = 0.2,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.mamba = MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, inner_size=4 * d_model, dropout=dropout)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``[B, L, d_model]``.
            positions (Optional[torch.Tensor]): ``[B, P, d_model]`` int64 gather index; when given,
                the position-wise part (LayerNorm, feed-forward) runs on those positions only.

        Returns:
            torch.Tensor: ``[B, L, d_model]`` (``[B, P, d_model]`` with ``positions``), causal in ``L``.
        """
        hidden = self.dropout(self.mamba(x))  # [B, L, d_model]
        if self.residual:
            hidden = hidden + x
        if positions is not None:
            hidden = hidden.gather(1, positions)  # [B, P, d_model]
        return self.ffn(self.LayerNorm(hidden))


class Mamba4RecEncoder(nn.Module):
    """Mamba4Rec sequence encoder returning the last valid position of each sequence.

    ``LayerNorm(dropout(tokens))`` -> ``num_layers`` x :class:`Mamba4RecLayer` -> the hidden
    state at index ``lengths - 1`` (Mamba4Rec's ``gather_indexes``). Sequences are right-padded
    (valid tokens first); since every sub-layer is causal or position-wise, the output never
    depends on the padded positions, nor on the padded length ``L``.

    As in Mamba4Rec, a single-layer encoder has no residual around its Mamba block. The
    Mamba blocks keep mamba_ssm's own initialisation (Mamba4Rec's blanket ``normal(0, 0.02)``
    re-initialisation of every ``nn.Linear`` would overwrite the ``dt_proj`` init, e.g. zero its
    bias); the feed-forward linears get Mamba4Rec's ``normal(0, 0.02)`` weights and zero biases.

    Args:
        d_model (int): token / model width.
        num_layers (int): number of layers.
        d_state (int): SSM state size.
        d_conv (int): causal convolution width.
        expand (int): Mamba expansion factor.
        dropout (float): dropout rate (input embeddings and inside the layers).
    """

    def __init__(
        self,
        d_model: int = 128,
        num_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.d_model = d_model
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.mamba_layers = nn.ModuleList(
            [
                Mamba4RecLayer(d_model, d_state, d_conv, expand, dropout, residual=num_layers > 1)
                for _ in range(num_layers)
            ]
        )
        for layer in self.mamba_layers:
            for linear in (layer.ffn.w_1, layer.ffn.w_2):
                nn.init.normal_(linear.weight, mean=0.0, std=0.02)
                nn.init.zeros_(linear.bias)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens (torch.Tensor): ``[B, L, d_model]`` float, right-padded sequences.
            lengths (torch.Tensor): ``[B]`` integer number of valid tokens, ``1 <= lengths <= L``.

        Returns:
            torch.Tensor: ``[B, d_model]`` hidden state at position ``lengths - 1``.
        """
        batch, max_len, _ = tokens.shape
        if lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if not is_tracing() and batch > 0 and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
            raise ValueError(
                f"lengths must be in [1, {max_len}] (each sequence ends with its target item), "
                f"got min {int(lengths.min())}, max {int(lengths.max())}"
            )
        hidden = self.LayerNorm(self.dropout(tokens))  # [B, L, d_model]
        last = (lengths.to(device=tokens.device, dtype=torch.long) - 1).view(batch, 1, 1)
        last = last.expand(batch, 1, self.d_model)
        for layer in self.mamba_layers[:-1]:
            hidden = layer(hidden)  # [B, L, d_model]
        # The last layer's position-wise part only runs where the output is read.
        return self.mamba_layers[-1](hidden, positions=last).squeeze(1)  # [B, d_model]
