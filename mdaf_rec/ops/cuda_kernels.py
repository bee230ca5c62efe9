"""The optional CUDA kernels of ``mamba-ssm`` and ``causal-conv1d``: imported once, with the reason when not.

A missing package is the normal case on CPU machines; a broken build (compiled against another torch or CUDA,
a missing ``libcudart``) fails in many ways (``ImportError: undefined symbol``, ``OSError``, ``RuntimeError``).
Either way the Mamba block then runs the pure PyTorch scan, several times slower on a GPU, so the choice is
never silent: :func:`mamba_backend` names it and why, ``mdaf-rec train`` / ``eval`` log it per run
(:func:`mdaf_rec.train.open_session`), and ``tools/check_cuda_kernels.py`` (:func:`main`) exits 1 naming the
failure (``tools/setup_gpu.sh``, ``tools/gpu_check.sh`` and the ``Dockerfile`` run it).

Attributes:
    selective_scan_fn: ``mamba_ssm``'s ``selective_scan_fn`` (``None`` if it does not import).
    mamba_inner_fn: ``mamba_ssm``'s fused Mamba block (``None`` if it does not import).
    causal_conv1d_fn: ``causal_conv1d``'s ``causal_conv1d_fn`` (``None`` if it does not import).
    IMPORT_ERRORS: module -> one-line reason it did not import (empty when all did).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable, Dict, Optional

__all__ = ["IMPORT_ERRORS", "causal_conv1d_fn", "fast_path_available", "log_mamba_backend", "mamba_backend",
           "mamba_inner_fn", "selective_scan_fn"]

logger = logging.getLogger(__name__)

IMPORT_ERRORS: Dict[str, str] = {}


def _load(module: str, name: Optional[str] = None) -> Any:
    """``module.name`` (or the module), or ``None`` with the reason recorded in :data:`IMPORT_ERRORS`."""
    try:
        loaded = importlib.import_module(module)
        return loaded if name is None else getattr(loaded, name)
    except Exception as e:  # noqa: BLE001 - a broken build fails with ImportError, OSError, RuntimeError, ...
        IMPORT_ERRORS.setdefault(module, " ".join(f"{type(e).__name__}: {e}".split()))
        return None


# The compiled extensions first: their own errors name the real cause (the Python packages may swallow them).
_load("selective_scan_cuda")
_load("causal_conv1d_cuda")
selective_scan_fn: Optional[Callable[..., Any]] = _load("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
mamba_inner_fn: Optional[Callable[..., Any]] = _load("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn")
causal_conv1d_fn: Optional[Callable[..., Any]] = _load("causal_conv1d", "causal_conv1d_fn")


def fast_path_available() -> bool:
    """Whether the Mamba block's fused CUDA path (``mamba_inner_fn`` with causal-conv1d) can run."""
    return mamba_inner_fn is not None and causal_conv1d_fn is not None and not IMPORT_ERRORS


def mamba_backend(device_type: str) -> str:
    """One line: what a Mamba block computes with on ``device_type`` and, on CUDA without the kernels, why
    (on CPU this builds the compiled kernels if they are not yet, as the first forward would)."""
    if device_type == "cuda":
        if fast_path_available():
            return ("mamba-ssm's CUDA kernels (the fused mamba_inner_fn with causal-conv1d; its selective_scan_fn "
                    "where outputs are read at given positions)")
        if selective_scan_fn is not None:
            return f"mamba-ssm's selective scan kernel without the fused block, slower: {_reasons()}"
        return f"the pure PyTorch scan on CUDA, several times slower: {_reasons()}"
    if device_type == "cpu":
        from mdaf_rec.ops import scan_cpu

        if scan_cpu.available():
            return "the compiled CPU kernels (mdaf_rec::selective_scan_fwd, mdaf_rec::causal_conv1d_silu_fwd)"
    return f"the pure PyTorch scan on {device_type}"


def log_mamba_backend(device_type: str) -> None:
    """Logs :func:`mamba_backend`: a warning when a CUDA run falls back to the PyTorch scan."""
    slow = device_type == "cuda" and not fast_path_available()
    logger.log(logging.WARNING if slow else logging.INFO, "Mamba blocks run %s", mamba_backend(device_type))


def _reasons() -> str:
    return "the mamba-ssm / causal-conv1d CUDA kernels do not import (" + "; ".join(
        f"{k}: {v}" for k, v in IMPORT_ERRORS.items()) + ")"


def main() -> int:
    """Exit status 0 when every kernel imports, else 1 with one line (stderr) naming each module's failure."""
    if not IMPORT_ERRORS:
        print("mamba-ssm / causal-conv1d CUDA kernels: importable")
        return 0
    print(f"error: {_reasons()}; rebuild them against this "
          "torch (tools/setup_gpu.sh; nvcc's CUDA major must match torch.version.cuda's), or set "
          "SKIP_MAMBA_KERNELS=1 to run the pure PyTorch scan", file=sys.stderr)
    return 1
