"""Kernels apart from modules (as ``mamba_ssm.ops``): the selective scan and its implementations.

``nn.Module`` code calls :func:`selective_scan_fn` and :func:`causal_conv1d_silu` only; they pick
the implementation (:mod:`mdaf_rec.ops.selective_scan`, :mod:`mdaf_rec.ops.causal_conv1d`).
"""

from mdaf_rec.ops.causal_conv1d import causal_conv1d_silu
from mdaf_rec.ops.scan_reference import selective_scan_reference
from mdaf_rec.ops.scan_torch import selective_scan_torch
from mdaf_rec.ops.selective_scan import scan_backend, selective_scan_fn

__all__ = [
    "causal_conv1d_silu",
    "scan_backend",
    "selective_scan_fn",
    "selective_scan_reference",
    "selective_scan_torch",
]
