"""Benchmark of checkpoint save and load with their integrity checks, for the current code and (``--before REV``)
an earlier revision of the package.

One process (world size 1) saves ``{"model": {"table": [rows, dim]}, "optim": {"table_state": [rows]}}`` (float32)
with :func:`mdaf_rec.checkpoint.save_checkpoint`, then loads it back in the same process (what the final
evaluation of a training run does) and once more in a fresh process (a resume, ``mdaf-rec eval``). The earlier
revision is extracted with ``git archive`` and imported instead of the working tree. The page cache is warm
(the files were just written), so the times are hashing and copying, not disk reads. Writes the "Checkpoint
save / load" section of ``docs/benchmarks.md``.

Usage: ``python tools/bench_checkpoint.py [--rows 5000000] [--dim 32] [--before REV] [--no-write]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Checkpoint save / load (tools/bench_checkpoint.py)"


def _app_state(rows: int, dim: int, fill: Optional[float] = None) -> Dict[str, Any]:
    if fill is None:
        g = torch.Generator().manual_seed(0)
        return {"model": {"table": torch.randn(rows, dim, generator=g)}, "optim": {"table_state": torch.rand(rows, generator=g)}}
    return {"model": {"table": torch.full((rows, dim), fill)}, "optim": {"table_state": torch.full((rows,), fill)}}


def child(phase: str, run_dir: Path, rows: int, dim: int) -> Dict[str, Any]:
    """``save``: save then load in this process; ``load``: load only. Times in seconds."""
    from mdaf_rec import checkpoint as ckpt

    torch.set_num_threads(1)
    out: Dict[str, Any] = {}
    if phase == "save":
        state = _app_state(rows, dim)
        started = time.perf_counter()
        path = ckpt.save_checkpoint(run_dir, "epoch_1", state, {"epoch": 1}, is_best=True)
        out["save_s"] = time.perf_counter() - started
        out["bytes"] = sum(p.stat().st_size for p in path.iterdir())
        del state
        key = "load_same_process_s"
    else:
        path = run_dir / "checkpoints" / "epoch_1"
        key = "load_fresh_process_s"
    target = _app_state(rows, dim, fill=0.0)
    started = time.perf_counter()
    ckpt.load_checkpoint(path, target)
    out[key] = time.perf_counter() - started
    return out


def measure(tree: Path, rows: int, dim: int) -> Dict[str, Any]:
    """Save + same-process load, then a fresh-process load, with the package imported from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    result: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("save", "load"):
            proc = subprocess.run([sys.executable, __file__, "--child", phase, tmp, "--rows", str(rows), "--dim", str(dim)],
                                  env=env, capture_output=True, text=True, check=True, cwd=tmp)
            result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def _extract(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "mdaf_rec"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for linked in ("configs",):  # mdaf_rec/configs is a link to the repository's configs/
        link = dest / "mdaf_rec" / linked
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(REPO / linked)
    return dest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--before", help="an earlier revision to measure too (git rev)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.rows, args.dim)))
        return
    sys.path.insert(0, str(REPO / "tools"))
    from benchdoc import machine, write_section

    rows: List[str] = []
    with tempfile.TemporaryDirectory() as old:
        trees = [("this revision", REPO)]
        if args.before:
            trees.insert(0, (f"before ({args.before})", _extract(args.before, Path(old))))
        for label, tree in trees:
            r = measure(tree, args.rows, args.dim)
            print(label, json.dumps(r), flush=True)
            rows.append(f"| {label} | {r['bytes'] / 2**20:,.0f} | {r['save_s']:.1f} | {r['load_same_process_s']:.1f} | "
                        f"{r['load_fresh_process_s']:.1f} |")
    load = open("/proc/loadavg").read().split()[0]
    body = (
        f"`python tools/bench_checkpoint.py --rows {args.rows} --dim {args.dim}"
        f"{' --before ' + args.before if args.before else ''}` — {machine()}; load average {load} at the end (the "
        "machine is shared with other jobs: compare rows of one run). One process; a float32 table of "
        f"{args.rows:,} x {args.dim} plus a {args.rows:,}-float optimizer state; warm page cache.\n\n"
        "| code | checkpoint (MiB) | save (s) | load, same process (s) | load, fresh process (s) |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print(body)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", SECTION, body)


if __name__ == "__main__":
    main()
