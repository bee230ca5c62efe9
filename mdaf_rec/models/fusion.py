"""Gated fusion of the static and sequential embeddings."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from mdaf_rec.models.precision import full_precision_linear
from mdaf_rec.registry import GATE_MODES


class GatedFusion(nn.Module):
    """``g = σ(W [s; q] + b)``, ``fused = g · s + (1 − g) · q``.

    ``g ≈ 1`` means the sample relies on the static branch, ``g ≈ 0`` on the sequential one. The gate
    is computed in float32 under autocast (so is ``fused``: float32 ``g`` times either branch).

    In training, ``branch_dropout`` gives a fraction of the samples one branch only: half of those lose
    ``s`` (``g = 0``, ``fused = q``), half lose ``q`` (``g = 1``, ``fused = s``), so the layers after the
    fusion learn to score from either branch alone. In evaluation every sample sees both.

    Args:
        dim: dimension ``D`` of both embeddings.
        mode: ``scalar`` (one gate per sample, ``W`` is ``[1, 2D]``) or ``vector`` (one gate per
            dimension, ``W`` is ``[D, 2D]``).
        branch_dropout: fraction of training samples that see one branch only.
        stop_gradient: the gate reads ``s`` and ``q`` detached (the fused loss still reaches both
            branches through ``fused``, but not through the gate).
        bias_init: the gate's initial bias; ``None`` keeps ``nn.Linear``'s default.
    """

    def __init__(
        self,
        dim: int,
        mode: str = "scalar",
        branch_dropout: float = 0.0,
        stop_gradient: bool = False,
        bias_init: Optional[float] = None,
    ) -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode {mode!r} is not one of {list(GATE_MODES)}")
        if not 0.0 <= branch_dropout < 1.0:
            raise ValueError(f"branch_dropout {branch_dropout} is not in [0, 1)")
        self.mode = mode
        self.branch_dropout = branch_dropout
        self.stop_gradient = stop_gradient
        self.gate = nn.Linear(2 * dim, 1 if mode == "scalar" else dim)
        if bias_init is not None:
            nn.init.constant_(self.gate.bias, bias_init)

    def forward(self, static: torch.Tensor, sequential: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            static: ``[B, D]`` static-branch embedding ``s``.
            sequential: ``[B, D]`` sequential-branch embedding ``q``.
        Returns:
            fused: ``[B, D]``.
            gate: ``[B, 1]`` (scalar) or ``[B, D]`` (vector), in ``[0, 1]`` (after branch dropout).
        """
        inputs = torch.cat([static, sequential], dim=-1)  # [B, 2D]
        if self.stop_gradient:
            inputs = inputs.detach()
        gate = torch.sigmoid(full_precision_linear(self.gate, inputs))  # [B, 1 | D]
        if self.training and self.branch_dropout > 0:
            gate = self._drop_branches(gate)
        fused = gate * static + (1.0 - gate) * sequential  # [B, D]
        return fused, gate

    def _drop_branches(self, gate: torch.Tensor) -> torch.Tensor:
        """``gate`` ``[B, 1 | D]`` with a ``branch_dropout`` fraction of its rows replaced by 1 (static only)
        or 0 (sequential only), each with probability ``branch_dropout / 2``."""
        u = torch.rand(gate.shape[0], 1, device=gate.device)  # [B, 1]
        half = self.branch_dropout / 2
        keep_static_only = u < half
        keep_sequential_only = (u >= half) & (u < self.branch_dropout)
        gate = torch.where(keep_static_only, torch.ones_like(gate), gate)
        return torch.where(keep_sequential_only, torch.zeros_like(gate), gate)
