"""The selective scan in pure PyTorch: an exact blocked recurrence with an analytic backward.

The fallback where the compiled CPU kernel (:mod:`mdaf_rec.ops.scan_cpu`) cannot be built, and the
scan on GPUs without ``mamba_ssm``. Why it is not a log-depth parallel scan: the dominant cost is
the ``batch * dim * length * d_state`` exponentials ``exp(delta A)``. Log-depth scans (Blelloch,
e.g. ``mambapy.pscan``) do more multiply-adds than the recurrence on full-size tensors; chunked
closed forms (masked segment sums of cumulative log-decays, as in Mamba-2's SSD, which only
exponentiate non-positive numbers) need an exponential for every ``(t, s)`` pair of a chunk *and*
every state ``n`` (``A`` has a state axis here), i.e. ``chunk / 2`` times more exponentials and a
``(batch, dim, length, chunk, d_state)`` intermediate. The unsafe closed form
``exp(S_t) * cumsum(exp(-S_s) x_s)`` overflows. So this runs the exact sequential recurrence:

* a custom :class:`torch.autograd.Function` with an analytic backward (the adjoint recurrence
  run backwards) and in-place ``addcmul_`` steps, so autograd records one node instead of ~10
  per time step and no per-step tensors are allocated;
* work in blocks of ``block_b`` batch rows x ``block_l`` time steps, held in three reused
  ``(b, dim, l, d_state)`` scratch tensors -- including the bias/softplus of ``delta`` and the
  ``D``/``z`` epilogue, so no full-size temporaries exist. Two blockings:
  :func:`cpu_blocks` (cache-sized: whole sequences x ~4 batch rows at batch 256, dim 256,
  length 50, d_state 16; each time step is one op on a ~64 KiB slice) and :func:`gpu_blocks`
  (the whole batch per time step, time chunks bounded by a memory budget: ``length`` kernel
  launches per sweep instead of ``batch / 4 * length``);
* nothing of size ``length * d_state`` is kept for the backward pass (only the states at
  time-chunk boundaries): each block's states are recomputed there;
* contractions over ``d_state`` as an elementwise product + matrix-vector product with ones
  (several times faster on CPU than ``bmm`` with a trailing dim of 1);
* ``exp(delta A)`` computed as ``exp2(delta * (A log2 e))``: ``torch.exp2`` is ~2.7x faster
  than ``torch.exp`` on CPU, for a few ulps of extra rounding;
* autocast off inside (forward and backward): the compute dtype is float32 (float64 for float64
  inputs) even under ``torch.autocast(dtype=torch.bfloat16)``, where ``torch.mv`` / ``torch.matmul``
  would otherwise run in bfloat16 (they are on autocast's lower-precision lists).

It is exact up to floating-point rounding against
:func:`mdaf_rec.ops.scan_reference.selective_scan_reference` (same recurrence, step by step; with
``delta >= 0`` and ``A <= 0``, as in Mamba, only non-positive numbers are exponentiated).
"""

import functools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from mdaf_rec.ops.scan_reference import ScanOutput, check_scan_args, compute_dtype

__all__ = ["cpu_blocks", "gpu_blocks", "selective_scan_torch", "selective_scan_torch_gpu"]

# CPU: scratch budget per (block_b, dim, block_l, d_state) block tensor, in elements. Three live at
# once in the backward pass: 3 x 3.2 MiB in float32, inside a typical L2 + L3. Blocks span the
# whole sequence when it fits (block_l = length) and then as many batch rows as fit.
_CPU_BLOCK_ELEMS = 4 * 256 * 50 * 16
# GPU: the whole batch per block; time chunks of at most 2^27 elements (512 MiB in float32) per
# scratch tensor.
_GPU_BLOCK_ELEMS = 1 << 27
_LOG2E = math.log2(math.e)


def cpu_blocks(batch: int, dim: int, length: int, d_state: int) -> Tuple[int, int]:
    """``(block_b, block_l)``: whole sequences if one row fits the cache budget, then more rows."""
    block_l = min(length, max(1, _CPU_BLOCK_ELEMS // (dim * d_state)))
    return min(batch, max(1, _CPU_BLOCK_ELEMS // (block_l * dim * d_state))), block_l


def gpu_blocks(batch: int, dim: int, length: int, d_state: int) -> Tuple[int, int]:
    """``(batch, block_l)``: every time step is one op over the whole batch."""
    return max(batch, 1), min(length, max(1, _GPU_BLOCK_ELEMS // (max(batch, 1) * dim * d_state)))


def _without_autocast(fn: Callable) -> Callable:
    """``fn(ctx, first_tensor, ...)`` with autocast off on ``first_tensor``'s device (the scan's accumulation
    stays in its compute dtype)."""

    @functools.wraps(fn)
    def wrapper(ctx, first: torch.Tensor, *args):
        with torch.autocast(first.device.type, enabled=False):
            return fn(ctx, first, *args)

    return wrapper


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
    """Selective scan with an analytic backward; see :func:`selective_scan_torch`.

    All tensor inputs are already in the compute dtype; ``B``/``C`` are ``(dim, d_state)`` or
    ``(batch, groups, d_state, length)``. Everything, including the bias/softplus of ``delta``
    and the ``D``/``z`` epilogue, runs over blocks of ``block_b`` batch rows x ``block_l``
    time steps held as ``(b, dim, l, d_state)`` scratch tensors that are reused from block to
    block and stay in cache; nothing of size ``length * d_state`` is allocated. Only the states
    at time-chunk boundaries are saved; the backward pass recomputes each block's states and
    runs the adjoint recurrence ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` backwards.
    """

    @staticmethod
    @_without_autocast
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
    @_without_autocast
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


def selective_scan_torch(
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
    """Selective scan in pure PyTorch, a drop-in for ``mamba_ssm``'s ``selective_scan_fn``.

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
        block_b (Optional[int]): batch rows per block (default: :func:`cpu_blocks`).
        block_l (Optional[int]): time steps per block (default: :func:`cpu_blocks`).

    Returns:
        torch.Tensor or Tuple[torch.Tensor, torch.Tensor]: ``(batch, dim, length)`` output in
        ``u``'s dtype, and, if ``return_last_state``, the ``(batch, dim, d_state)`` last state
        in the compute dtype (float32, or float64 for float64 inputs).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
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
    default_b, default_l = cpu_blocks(batch, dim, length, d_state)
    block_l = min(length, block_l or default_l)
    block_b = min(batch, block_b or default_b)
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




def selective_scan_torch_gpu(
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
    """:func:`selective_scan_torch` with :func:`gpu_blocks`: each time step is one op over the
    whole batch (for GPUs without ``mamba_ssm``)."""
    block_b, block_l = gpu_blocks(u.shape[0], u.shape[1], u.shape[2], A.shape[-1])
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state, block_b=block_b, block_l=block_l)
