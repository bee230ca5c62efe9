"""Prediction head: an MLP from an embedding to a click logit."""

from __future__ import annotations

from typing import List, Sequence

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
