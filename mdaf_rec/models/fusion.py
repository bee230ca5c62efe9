"""Gated fusion of the static and sequential embeddings."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from mdaf_rec.models.precision import full_precision_linear
from mdaf_rec.registry import GATE_MODES


class GatedFusion(nn.Module):
    """``g = σ(W [s; q] + b)``, ``fused = g · s + (1 − g) · q``.

    ``g ≈ 1`` means the sample relies on the static branch, ``g ≈ 0`` on the sequential one. The gate
    is computed in float32 under autocast (so is ``fused``: float32 ``g`` times either branch).

    Args:
        dim: dimension ``D`` of both embeddings.
        mode: ``scalar`` (one gate per sample, ``W`` is ``[1, 2D]``) or ``vector`` (one gate per
            dimension, ``W`` is ``[D, 2D]``).
    """

    def __init__(self, dim: int, mode: str = "scalar") -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode {mode!r} is not one of {list(GATE_MODES)}")
        self.mode = mode
        self.gate = nn.Linear(2 * dim, 1 if mode == "scalar" else dim)

    def forward(self, static: torch.Tensor, sequential: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            static: ``[B, D]`` static-branch embedding ``s``.
            sequential: ``[B, D]`` sequential-branch embedding ``q``.
        Returns:
            fused: ``[B, D]``.
            gate: ``[B, 1]`` (scalar) or ``[B, D]`` (vector), in ``[0, 1]``.
        """
        gate = torch.sigmoid(full_precision_linear(self.gate, torch.cat([static, sequential], dim=-1)))  # [B, 1 | D]
        fused = gate * static + (1.0 - gate) * sequential  # [B, D]
        return fused, gate
