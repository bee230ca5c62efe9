"""Mixed precision in the dense modules: which layers stay in float32 under ``torch.autocast``.

Under ``torch.autocast(dtype=torch.bfloat16)`` matmuls run in bfloat16 (8 significant bits) while
LayerNorm, softmax inside attention and the losses run in float32 (autocast's own lists). The layers
that produce a logit or a gate are small (one output, or ``D`` for a vector gate) but their
resolution is what the metrics see: a bfloat16 logit near ±2 moves in steps of 1/64, which ties
scores that differ and shifts AUC. :func:`full_precision_linear` runs them in float32.
"""

from __future__ import annotations

import torch
from torch import nn


def full_precision_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in float32 when autocast is on for ``x``'s device, plain ``layer(x)`` otherwise.

    Args:
        layer: a float32 ``nn.Linear``.
        x: ``[..., in_features]`` input (bfloat16 or float32 under autocast).

    Returns:
        ``[..., out_features]`` float32 under autocast, else ``layer(x)``'s dtype.
    """
    if not torch.is_autocast_enabled(x.device.type):  # plain Python test: no trace of autocast in export
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())
