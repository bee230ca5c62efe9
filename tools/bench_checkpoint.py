"""Benchmark of checkpoint save and load with their integrity checks, for the current code and (``--before REV``)
an earlier revision of the package.

``--world`` processes (gloo; with more than one, the table and its optimizer state are row-sharded DTensors, one
shard per rank) save ``{"model": {"table": [rows, dim]}, "optim": {"table_state": [rows]}}`` (float32) with
:func:`mdaf_rec.checkpoint.save_checkpoint`, then load it back in the same processes (what the final evaluation of
a training run does) and once more in fresh ones (a resume, ``mdaf-rec eval``). The earlier revision is extracted
with ``git archive`` and imported instead of the working tree. The page cache is warm (the files were just
written), so the times are hashing and copying, not disk reads. Writes the "Checkpoint save / load, W
process(es)" section of ``docs/benchmarks.md``.

Usage: ``python tools/bench_checkpoint.py [--rows 5000000] [--dim 32] [--world 1] [--repeat 3] [--before REV]
[--no-write]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Checkpoint save / load, {world} process(es) (tools/bench_checkpoint.py)"
NOTE = (
    'What the integrity checks cost in each column. Before: at save, after a barrier, rank 0 read back and '
    'hashed every file of every rank while the others waited; every load, on every rank, hashed every file '
    'before reading any (so a resume read the checkpoint world-size + 1 times, and the final evaluation '
    'hashed the best checkpoint again). This revision: each rank hashes its own files as it writes them (no '
    'read-back; rank 0 only gathers the entries); a load hashes only the files the rank reads (with row-'
    'sharded tables, its own shard), right before reading each, and a process that wrote or already checked a'
    ' checkpoint does not hash it again (load, same process: what the final evaluation after training does). '
    'A fresh-process load of a checkpoint that one process reads whole costs the same as before: the '
    'difference there is per rank, under sharding.'
)


def _app_state(rows: int, dim: int, world: int, fill: Optional[float] = None) -> Dict[str, Any]:
    """This rank's ``{"model": {"table"}, "optim": {"table_state"}}``: whole tensors, or with ``world > 1``
    row shards (DTensors, ``Shard(0)``) of ``rows / world`` rows each."""
    rank = dist.get_rank() if world > 1 else 0
    local = rows // world
    g = torch.Generator().manual_seed(rank)
    table = torch.randn(local, dim, generator=g) if fill is None else torch.full((local, dim), fill)
    opt = torch.rand(local, generator=g) if fill is None else torch.full((local,), fill)
    if world > 1:
        from torch.distributed.tensor import DTensor, Shard, init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        table, opt = (DTensor.from_local(t, mesh, [Shard(0)], run_check=False) for t in (table, opt))
    return {"model": {"table": table}, "optim": {"table_state": opt}}


def _rank(rank: int, world: int, phase: str, run_dir: str, rows: int, dim: int, port: str) -> None:
    """One rank of a ``phase`` (``save``: save then load in this process; ``load``: load only); rank 0 prints
    the slowest rank's times in seconds as JSON."""
    from mdaf_rec import checkpoint as ckpt

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    times: Dict[str, float] = {}
    path = Path(run_dir) / "checkpoints" / "epoch_1"
    if phase == "save":
        state = _app_state(rows, dim, world)
        started = time.perf_counter()
        ckpt.save_checkpoint(Path(run_dir), "epoch_1", state, {"epoch": 1}, is_best=True)
        times["save_s"] = time.perf_counter() - started
        del state
    target = _app_state(rows, dim, world, fill=0.0)
    started = time.perf_counter()
    ckpt.load_checkpoint(path, target)
    times["load_same_process_s" if phase == "save" else "load_fresh_process_s"] = time.perf_counter() - started
    if world > 1:
        slowest = torch.tensor(list(times.values()), dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = dict(zip(times, slowest.tolist()))
        dist.destroy_process_group()
    if rank == 0:
        times["bytes"] = sum(p.stat().st_size for p in path.iterdir())
        print(json.dumps(times), flush=True)


def child(phase: str, run_dir: str, rows: int, dim: int, world: int) -> None:
    if world == 1:
        _rank(0, 1, phase, run_dir, rows, dim, "")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    mp.spawn(_rank, args=(world, phase, run_dir, rows, dim, port), nprocs=world, join=True)


def measure(tree: Path, rows: int, dim: int, world: int, repeat: int) -> Dict[str, Any]:
    """Save + same-process load, then a fresh-process load, with the package imported from ``tree``; the best
    of ``repeat`` runs of each."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    best: Dict[str, Any] = {}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            for phase in ("save", "load"):
                cmd = [sys.executable, __file__, "--child", phase, tmp, "--rows", str(rows), "--dim", str(dim),
                       "--world", str(world)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tmp)
                for key, value in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                    best[key] = min(best.get(key, value), value)
    return best


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
    p.add_argument("--world", type=int, default=1, help="processes (gloo; the table row-sharded over them)")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    p.add_argument("--before", help="an earlier revision to measure too (git rev)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.rows, args.dim, args.world)
        return
    sys.path.insert(0, str(REPO / "tools"))
    from benchdoc import machine, write_section

    rows: List[str] = []
    with tempfile.TemporaryDirectory() as old:
        trees = [("this revision", REPO)]
        if args.before:
            trees.insert(0, (f"before ({args.before})", _extract(args.before, Path(old))))
        for label, tree in trees:
            r = measure(tree, args.rows, args.dim, args.world, args.repeat)
            print(label, json.dumps(r), flush=True)
            rows.append(f"| {label} | {r['bytes'] / 2**20:,.0f} | {r['save_s']:.1f} | {r['load_same_process_s']:.1f} | "
                        f"{r['load_fresh_process_s']:.1f} |")
    load = open("/proc/loadavg").read().split()[0]
    body = (
        f"`python tools/bench_checkpoint.py --rows {args.rows} --dim {args.dim} --world {args.world}"
        f"{' --before ' + args.before if args.before else ''}` — {machine()}; load average {load} at the end (the "
        f"machine is shared with other jobs: compare rows of one run). {args.world} process(es) (times: the "
        f"slowest rank, best of {args.repeat}); a float32 table of {args.rows:,} x {args.dim} plus a "
        f"{args.rows:,}-float optimizer state{', row-sharded' if args.world > 1 else ''}; warm page cache.\n\n"
        "| code | checkpoint (MiB) | save (s) | load, same process (s) | load, fresh process (s) |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n" + NOTE + "\n"
    )
    print(body)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", SECTION.format(world=args.world), body)


if __name__ == "__main__":
    main()
