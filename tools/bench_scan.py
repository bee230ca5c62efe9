"""Benchmark ``mdaf_rec.models.mamba.selective_scan`` on CPU.

Times forward and forward+backward of the selective scan at the shape the Mamba4Rec encoder
uses it (float32, input-dependent B/C, with z, D, delta_bias and delta_softplus=True, exactly as
``MambaBlock`` calls it) against

* the per-timestep loop :func:`mdaf_rec.models.mamba.selective_scan_reference`, and
* mambapy's parallel (Blelloch) scan ``mambapy.pscan``, called the way ``mambapy``'s
  ``MambaBlock.ssm`` does on CPU (its own discretisation ``exp(delta A)``, ``delta B x``; the
  ``softplus(delta + bias)`` and ``* silu(z)`` steps that ``MambaBlock`` does around it are
  included so that all rows compute the same function). Skipped if ``mambapy`` is missing
  (``pip install -r requirements/bench.txt``).

Every row is checked against the loop: max over the output and the 8 input gradients of
``max |diff| / max |loop|`` (float32 rounding). Also reported: the bytes autograd keeps for the
backward pass beyond the inputs (via ``torch.autograd.graph.saved_tensors_hooks``).

Prints a markdown table and (unless ``--no-write``) rewrites the
``## Selective scan (mdaf_rec.models.mamba.selective_scan)`` section of ``docs/benchmarks.md``.

Usage::

    python tools/bench_scan.py                       # 256 x 50 x 256 x 16, one thread
    python tools/bench_scan.py --batch 32 --no-write # quick look
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchdoc import cpu_model, write_section  # noqa: E402
from mdaf_rec.models.mamba import selective_scan, selective_scan_reference  # noqa: E402

SECTION = "## Selective scan (mdaf_rec.models.mamba.selective_scan)"
Inputs = Dict[str, torch.Tensor]

NOTES = """\
Notes. `selective_scan` runs the exact sequential recurrence inside one custom autograd
Function, in cache-sized blocks (whole sequences x ~4 batch rows, ~3 MiB scratch tensors),
and recomputes each block's states in the backward pass instead of storing them, so it keeps
only the `(batch, dim, length)` pre-gate output for backward. See the `mdaf_rec.models.mamba`
module docstring for why this beats log-depth and chunked closed-form scans on a CPU core
(they do more work; the closed forms need `chunk / 2` times more exponentials). Where its
forward+backward time goes (profiler): ~20% the ~9.4k per-time-step `addcmul_` of the three
scans (forward, recomputation, adjoint), ~15% contractions over `d_state`, ~10% the two
`exp2` passes, ~18% Python overhead of ~14k small ops (measured at dim 8), the rest
elementwise work on `(batch, dim, length)` blocks and first-touch page faults of the outputs
and gradients. The loop is faster than its reputation at this shape because each of its 50
steps already works on large `(256, 256, 16)` slices; it pays one autograd node per op per
step, fresh allocations per step and the stored per-step tensors. mambapy's pscan materialises
several `(batch, length, dim, d_state)` tensors padded to a power-of-two length (64) and runs
its Blelloch sweeps over them. The machine is shared with other jobs: repeated runs vary by
about +-15%.
"""


def make_inputs(batch: int, length: int, dim: int, d_state: int, seed: int = 0) -> Inputs:
    """Random inputs distributed like MambaBlock's (S4D-real A, dt bias from the dt init)."""
    g = torch.Generator().manual_seed(seed)
    dt_rank = math.ceil(dim / 2 / 16)  # dim = d_inner = 2 * d_model

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    dt = torch.exp(
        torch.rand(dim, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
    )
    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length, scale=dt_rank**-0.5),
        "A": (-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1)).requires_grad_(),
        "B": randn(batch, d_state, length),
        "C": randn(batch, d_state, length),
        "D": torch.ones(dim).requires_grad_(),
        "z": randn(batch, dim, length),
        "delta_bias": (dt + torch.log(-torch.expm1(-dt))).requires_grad_(),
    }


def run_ours(x: Inputs) -> torch.Tensor:
    return selective_scan(**x, delta_softplus=True)


def run_loop(x: Inputs) -> torch.Tensor:
    return selective_scan_reference(**x, delta_softplus=True)


def make_mambapy() -> Optional[Callable[[Inputs], torch.Tensor]]:
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None

    def run_mambapy(x: Inputs) -> torch.Tensor:
        # mambapy works in (batch, length, channels); as in mambapy.mamba.MambaBlock.ssm and
        # MambaBlock.selective_scan (CPU path, config.pscan=True).
        u = x["u"].transpose(1, 2)  # (B, L, D)
        delta = F.softplus(x["delta"].transpose(1, 2) + x["delta_bias"])  # (B, L, D)
        Bm, Cm = x["B"].transpose(1, 2), x["C"].transpose(1, 2)  # (B, L, N)
        deltaA = torch.exp(delta.unsqueeze(-1) * x["A"])  # (B, L, D, N)
        BX = delta.unsqueeze(-1) * Bm.unsqueeze(2) * u.unsqueeze(-1)  # (B, L, D, N)
        hs = pscan(deltaA, BX)  # (B, L, D, N)
        y = (hs @ Cm.unsqueeze(-1)).squeeze(3) + x["D"] * u  # (B, L, D)
        y = y * F.silu(x["z"].transpose(1, 2))
        return y.transpose(1, 2)  # (B, D, L)

    return run_mambapy


def fwd_bwd(fn: Callable[[Inputs], torch.Tensor], x: Inputs, gy: torch.Tensor):
    y = fn(x)
    grads = torch.autograd.grad(y, list(x.values()), gy)
    return y, grads


def saved_for_backward_bytes(fn: Callable[[Inputs], torch.Tensor], x: Inputs) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass, inputs excluded."""
    inputs = {t.untyped_storage().data_ptr() for t in x.values()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(saved.values())


def median_time(thunk: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        thunk()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--dim", type=int, default=256, help="d_inner (= expand * d_model)")
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="don't update docs/benchmarks.md")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    x = make_inputs(args.batch, args.length, args.dim, args.state)
    gy = torch.randn(args.batch, args.dim, args.length, generator=torch.Generator().manual_seed(1))
    methods: List[Tuple[str, Optional[Callable[[Inputs], torch.Tensor]], int]] = [
        ("sequential loop (`selective_scan_reference`)", run_loop, args.loop_repeats),
        ("mambapy 1.x parallel scan (`mambapy.pscan`)", make_mambapy(), args.repeats),
        ("**`selective_scan`** (this repo)", run_ours, args.repeats),
    ]

    ref_y, ref_g = fwd_bwd(run_loop, x, gy)
    rows = []
    loop_fb = None
    for name, fn, repeats in methods:
        if fn is None:
            rows.append(f"| {name} | skipped (not installed) | | | | |")
            print(f"{name}: skipped (mambapy not importable)", flush=True)
            continue
        y, grads = fwd_bwd(fn, x, gy)  # warm-up + correctness
        # float32 rounding is relative: max |diff| / max |loop| over the output and each grad
        err = max(
            (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
            for a, b in zip([y, *grads], [ref_y, *ref_g])
        )

        def fwd() -> None:
            with torch.no_grad():
                fn(x)

        mib = saved_for_backward_bytes(fn, x) / 2**20
        t_f = median_time(fwd, repeats)
        t_fb = median_time(lambda: fwd_bwd(fn, x, gy), repeats)
        if loop_fb is None:
            loop_fb = t_fb
        rows.append(
            f"| {name} | {t_f * 1e3:.0f} | {t_fb * 1e3:.0f} | {loop_fb / t_fb:.1f}x "
            f"| {mib:.0f} | {err:.1e} |"
        )
        print(rows[-1], flush=True)

    table = "\n".join(
        [
            "| method | forward (ms) | forward+backward (ms) | speed-up vs loop (fwd+bwd) "
            "| kept for backward (MiB) | max rel. diff vs loop (output, 8 grads) |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    try:
        import mambapy  # noqa: F401
        from importlib.metadata import version

        mambapy_v = version("mambapy")
    except Exception:  # noqa: BLE001 - only for the report
        mambapy_v = "not installed"
    body = (
        f"Shape: batch {args.batch}, length {args.length}, dim (d_inner) {args.dim}, "
        f"d_state {args.state}; float32; input-dependent B/C `(batch, d_state, length)`; with "
        "`z`, `D`, `delta_bias`, `delta_softplus=True` (as `MambaBlock` calls it). Median of "
        f"{args.repeats} runs ({args.loop_repeats} for the loop) after one warm-up; gradients "
        "of all 8 inputs.\n\n"
        f"Machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s); mambapy {mambapy_v}. Command: `python tools/bench_scan.py`.\n\n"
        f"{table}\n\n{NOTES}"
    )
    print()
    print(body)
    if not args.no_write:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        write_section(args.docs, SECTION, body)
        print(f"wrote section to {args.docs}")


if __name__ == "__main__":
    main()
