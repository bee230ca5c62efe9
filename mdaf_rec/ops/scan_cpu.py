"""The compiled CPU kernels of ``csrc/`` (built on first use) and the selective scan operator.

``csrc/selective_scan.cpp`` registers ``torch.ops.mdaf_rec.selective_scan_fwd`` and
``selective_scan_bwd``, ``csrc/causal_conv1d.cpp`` ``causal_conv1d_silu_fwd`` / ``_bwd`` (CPU
kernels; what they compute: the comments at the top of the files). This module builds them with
``torch.utils.cpp_extension.load`` (two source files, no CUDA, ~20 s with ``-O3 -march=native``)
into a cache folder, registers the scan's fake (meta) kernels and autograd formula with
``torch.library``, so that autograd, ``torch.compile`` and ``torch.export`` see one operator, and
offers :func:`selective_scan_cpu` with the arguments of ``selective_scan_fn`` (the convolution's
Python side: :mod:`mdaf_rec.ops.causal_conv1d`).

Cache: ``$TORCH_EXTENSIONS_DIR`` or ``$XDG_CACHE_HOME/mdaf_rec`` (default ``~/.cache/mdaf_rec``),
one folder per hash of the sources, the flags, torch's version and the CPU (``-march=native``
builds for the CPU it runs on, so machines sharing a home folder get one build each). Concurrent
builders (``torchrun`` starts several processes at once) take an exclusive ``flock`` on the
folder first: one builds, the others wait and load the result; the lock dies with its process, so
an interrupted build cannot block later ones (``cpp_extension``'s own lock file, which would, is
removed while the ``flock`` is held).

Where the build fails (no C++ compiler, no ninja, a compiler error), :func:`available` returns
False and logs one warning; ``mdaf_rec.ops.selective_scan_fn`` then uses the pure PyTorch scan.
"""

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from mdaf_rec.ops.scan_reference import ScanOutput, compute_dtype

__all__ = ["available", "build_directory", "selective_scan_cpu"]

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "selective_scan.cpp", CSRC / "causal_conv1d.cpp"]  # + the header vec_math.h
# -fassociative-math (with the two flags it needs) lets gcc vectorise the remaining sums (over the
# lanes of a gradient tile) as trees instead of serial adds; NaN and infinity handling stay IEEE.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math"]
_EXTENSION = "mdaf_rec_selective_scan"
_loaded: Optional[bool] = None  # None: not tried yet in this process
_load_lock = threading.Lock()  # one build-and-load per process, also with several Python threads


def cpu_signature() -> str:
    """CPU model and instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def cpu_fingerprint() -> str:
    """sha256 of :func:`cpu_signature`: identifies the CPU a compiled library (or AOTInductor program) is for."""
    return hashlib.sha256(cpu_signature().encode()).hexdigest()


def build_directory() -> Path:
    """The cache folder of this source x flags x torch x CPU."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mdaf_rec"
    )
    key = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        key.update(path.read_bytes())
    for part in (" ".join(CFLAGS), torch.__version__, cpu_signature()):
        key.update(part.encode())
    return Path(root) / f"selective_scan_{key.hexdigest()[:16]}"


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the venv's ``ninja`` package is not on it unless
    the venv is activated (e.g. ``.venv/bin/python -m pytest``)."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")  # what cpp_extension runs
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found)")
    _ninja_on_path()
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja not found (requirements/cpu.txt installs it)")
    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.flock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the process dies
        try:
            (folder / "lock").unlink(missing_ok=True)  # cpp_extension's baton, stale if present
            cpp_extension.load(
                _EXTENSION,
                [str(p) for p in SOURCES],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ops_registered() -> bool:
    """Whether this process has the compiled operators (built here, or an export's library loaded)."""
    return hasattr(torch.ops.mdaf_rec, "selective_scan_fwd")


def library_path() -> Path:
    """The shared library holding the compiled operators (built by :func:`available`)."""
    return build_directory() / f"{_EXTENSION}.so"


def available() -> bool:
    """Whether the compiled operators are loaded; builds them on the first call of a process."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _load_lock:
        if _loaded is not None:
            return _loaded
        try:
            if not ops_registered():  # else loaded already in this process (an export's copy of the library)
                _build_and_load()
            _register_python_parts()
            _loaded = True
        except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = reason if len(reason) <= 160 else reason[:157] + "..."  # details: DEBUG
            logger.warning(
                "compiled CPU selective scan unavailable (%s); using the pure PyTorch scan", reason
            )
            logger.debug("selective scan build failure", exc_info=True)
            _loaded = False
        return _loaded


def _register_python_parts() -> None:
    """Fake kernels (shapes for torch.compile / torch.export) and the autograd formula."""

    # Outputs shaped like an input take its layout (empty_like's rule, as the C++ side does).
    @torch.library.register_fake("mdaf_rec::selective_scan_fwd")
    def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, positions):
        batch, dim, _ = u.shape
        out = u.new_empty(batch, dim) if positions is not None else torch.empty_like(u)
        return out, u.new_empty(batch, dim, A.shape[1])

    @torch.library.register_fake("mdaf_rec::selective_scan_bwd")
    def _bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, positions):
        def like(t):
            return u.new_empty(0) if t is None else u.new_empty(t.shape)

        return (torch.empty_like(u), torch.empty_like(delta), like(A), like(B), like(C), like(D),
                u.new_empty(0) if z is None else torch.empty_like(z), like(delta_bias))

    def setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, positions = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, positions)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(output[1])  # the last state, as in mamba_ssm

    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, positions = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias = torch.ops.mdaf_rec.selective_scan_bwd(
            dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, positions
        )
        return (du, ddelta, dA, dB, dC, None if D is None else dD, None if z is None else dz,
                None if delta_bias is None else dbias, None, None)

    torch.library.register_autograd(
        "mdaf_rec::selective_scan_fwd", backward, setup_context=setup_context
    )


def selective_scan_cpu(
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
    positions: Optional[torch.Tensor] = None,
) -> ScanOutput:
    """The compiled operator with ``selective_scan_fn``'s arguments (checked by the caller).

    Computes in float32 (float64 for float64 inputs); returns the output in ``u``'s dtype and the
    last state in the compute dtype. Call only when :func:`available` is True.
    """
    ct = compute_dtype(u.dtype)

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(ct)

    B4 = B.unsqueeze(1) if B.dim() == 3 else B  # (batch, 1, N, L): one group
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    out, last_state = torch.ops.mdaf_rec.selective_scan_fwd(
        u.to(ct), delta.to(ct), A.to(ct), B4.to(ct), C4.to(ct), cast(D), cast(z),
        cast(delta_bias), delta_softplus, positions,
    )
    out = out.to(u.dtype)
    return (out, last_state) if return_last_state else out
