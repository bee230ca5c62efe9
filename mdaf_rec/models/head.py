"""Prediction head: an MLP from an embedding to a click logit."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from mdaf_rec.models.precision import full_precision_linear


class PredictionHead(nn.Module):
    """``Linear → ReLU → Dropout`` per hidden size, then ``Linear → 1`` (float32 under autocast).

    Args:
        input_dim: input embedding dim.
        hidden: hidden sizes (MDAF: ``[128, 64]``).
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self, input_dim: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        width = input_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embedding: ``[B, input_dim]``.
        Returns:
            ``[B]`` logits.
        """
        *hidden, output = self.mlp
        for layer in hidden:
            embedding = layer(embedding)
        return full_precision_linear(output, embedding).squeeze(-1)


class BranchHeads(nn.Module):
    """A linear logit head per fusion branch, for MDAF's auxiliary per-branch BCE (float32 under autocast).

    One module (not two called by name) so that TorchRec's pipeline tracer sees it as one leaf.

    Args:
        dim: dimension ``D`` of both branch embeddings.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.static = nn.Linear(dim, 1)
        self.sequential = nn.Linear(dim, 1)

    def forward(self, static: torch.Tensor, sequential: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            static: ``[B, D]`` static embedding ``s``.
            sequential: ``[B, D]`` sequential embedding ``q``.
        Returns:
            ``([B], [B])``: the logit of ``s`` alone and of ``q`` alone.
        """
        return (full_precision_linear(self.static, static).squeeze(-1),
                full_precision_linear(self.sequential, sequential).squeeze(-1))
