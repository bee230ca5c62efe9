"""Mamba blocks and the Mamba4Rec sequence encoder (the selective scan itself: :mod:`mdaf_rec.ops`).

* :class:`MambaBlock` -- the Mamba mixer with ``mamba_ssm.Mamba``'s parameter names, shapes and
  initialisation (state dicts are interchangeable); its scan is
  :func:`mdaf_rec.ops.selective_scan_fn`, which picks the implementation (compiled CPU kernel,
  pure PyTorch, ``mamba_ssm``'s CUDA kernel, or the exportable loop), its causal conv + SiLU
  :func:`mdaf_rec.ops.causal_conv1d_silu`; the block keeps its activations channel-contiguous
  (``[B, L, C]`` viewed as ``[B, C, L]``, which the compiled CPU kernels read without copies). On
  CUDA with ``mamba_ssm`` and ``causal_conv1d`` installed the whole block runs ``mamba_ssm``'s
  fused ``mamba_inner_fn``;
* :class:`Mamba4RecLayer` / :class:`Mamba4RecEncoder` -- the layer stack of Mamba4Rec
  (Liu et al., "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State
  Space Models", arXiv:2403.03900), reading out the last valid position of right-padded
  sequences. The last layer computes only what that read-out needs at the read position (the
  gate, the output projection, the position-wise part; the scan's output contraction there, and
  with the compiled CPU kernel no step after it). Dropouts are :class:`mdaf_rec.ops.dropout.Dropout`
  (``nn.Dropout`` with cheaper masks).
"""

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from mdaf_rec.ops import causal_conv1d_silu, cuda_kernels, selective_scan_fn
from mdaf_rec.ops.dropout import Dropout

# CUDA fast path of the whole block; None where the kernels do not import (see mdaf_rec.ops.cuda_kernels).
_mamba_inner_fn = cuda_kernels.mamba_inner_fn
_causal_conv1d_fn = cuda_kernels.causal_conv1d_fn

__all__ = ["MambaBlock", "FeedForward", "Mamba4RecLayer", "Mamba4RecEncoder"]


class MambaBlock(nn.Module):
    """Mamba mixer (selective SSM block), parameter-compatible with ``mamba_ssm.Mamba``.

    ``in_proj`` -> (x, z); x -> causal depthwise ``conv1d`` -> SiLU -> ``x_proj`` ->
    (dt, B, C); ``dt_proj`` (its bias is the scan's ``delta_bias``, with softplus);
    ``selective_scan_fn(x, dt, A = -exp(A_log), B, C, D, z)`` -> ``out_proj``.

    Parameter names, shapes and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba``
    (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj`` with the variance-preserving weight init and
    an inverse-softplus bias so that ``softplus(dt_proj.bias)`` is log-uniform in
    ``[dt_min, dt_max]``, ``A_log`` with the S4D-real init ``log(1..d_state)``, ``D`` = 1,
    ``out_proj``), so state dicts load either way. On CUDA tensors, if ``mamba_ssm`` and
    ``causal_conv1d`` are importable, the fused ``mamba_inner_fn`` kernel is used; otherwise the
    scan of :func:`mdaf_rec.ops.selective_scan_fn`. Inference-time step caching is not implemented.

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

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``[B, L, d_model]`` input sequence.
            positions (Optional[torch.Tensor]): ``[B]`` int64, one position per row to read; the
                gate, the scan's output and ``out_proj`` are then computed there only (the
                state recurrence still runs up to it).

        Returns:
            torch.Tensor: ``[B, L, d_model]`` (``[B, d_model]``, the rows at ``positions``, with
            ``positions``); position ``t`` depends only on ``x[:, :t + 1]``.
        """
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state), negative
        if positions is None and self._fast_path_ok(x):  # pragma: no cover - needs CUDA, mamba_ssm
            xz = self.in_proj(x).transpose(1, 2).contiguous()  # [B, 2 * d_inner, L]
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
        # Channel-contiguous throughout: [B, L, C] tensors viewed as the scan's [B, C, L] (the
        # compiled CPU kernels read any strides; no transposed copies).
        if positions is None:
            x_in, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # 2 x [B, d_inner, L] views
        else:  # in_proj's rows are [x part; z part]; the gate z is needed where y is read only
            w_x, w_z = self.in_proj.weight.chunk(2, dim=0)
            b_x, b_z = (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)
            x_in = F.linear(x, w_x, b_x).transpose(1, 2)  # [B, d_inner, L] view
            x_read = x.gather(1, positions.view(-1, 1, 1).expand(-1, 1, x.shape[2])).squeeze(1)
            z = F.linear(x_read, w_z, b_z)  # [B, d_inner]
        x_in = causal_conv1d_silu(x_in, self.conv1d.weight, self.conv1d.bias)  # [B, d_inner, L]
        x_dbl = self.x_proj(x_in.transpose(1, 2))  # [B, L, dt_rank + 2 * d_state]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # [B, d_inner, L] view, no bias
        y = selective_scan_fn(
            x_in,
            dt,
            A,
            B.transpose(1, 2),  # [B, d_state, L]
            C.transpose(1, 2),  # [B, d_state, L]
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            positions=positions,
        )  # [B, d_inner, L], or [B, d_inner] with positions
        return self.out_proj(y if positions is not None else y.transpose(1, 2))


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
        self.dropout = Dropout(dropout)
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
        self.dropout = Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, inner_size=4 * d_model, dropout=dropout)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``[B, L, d_model]``.
            positions (Optional[torch.Tensor]): ``[B]`` int64, one position per row; when given,
                only the output there is computed (see :meth:`MambaBlock.forward`).

        Returns:
            torch.Tensor: ``[B, L, d_model]`` (``[B, d_model]`` with ``positions``), causal in ``L``.
        """
        hidden = self.dropout(self.mamba(x, positions))  # [B, L, d_model] or [B, d_model]
        if self.residual:
            if positions is not None:
                index = positions.view(-1, 1, 1).expand(-1, 1, x.shape[2])
                x = x.gather(1, index).squeeze(1)  # [B, d_model]
            hidden = hidden + x
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
        self.dropout = Dropout(dropout)
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
                Values are not checked here (that would wait for the device on every step); data is
                validated where it enters (``check_sequence_features``, the serving boundary).

        Returns:
            torch.Tensor: ``[B, d_model]`` hidden state at position ``lengths - 1``.
        """
        batch = tokens.shape[0]
        if lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        hidden = self.LayerNorm(self.dropout(tokens))  # [B, L, d_model]
        last = lengths.to(device=tokens.device, dtype=torch.long) - 1  # [B]
        for layer in self.mamba_layers[:-1]:
            hidden = layer(hidden)  # [B, L, d_model]
        # The last layer computes its output only where it is read.
        return self.mamba_layers[-1](hidden, positions=last)  # [B, d_model]
