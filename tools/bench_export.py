"""Export at scale: time and peak RSS of ``mdaf-rec export`` for growing item tables, artifact sizes per table
dtype, and predict latency (table lookups + program) against the earlier artifact (tables inside ``model.pt2``).

For each ``--rows`` N a run is trained for one step (``mdaf-rec train``, MDAF-BST at small dims on the synthetic
data) with the item id space hashed into N buckets, so its two item tables (static and sequence) have N + 2 rows.
Then, each in its own process under ``/usr/bin/time -v``:

* ``mdaf-rec export --no-compile --table-dtype fp32 | fp16 | int8`` of this checkout: wall time, peak RSS
  (Maximum resident set size: the process's own memory; the files it writes and the checkpoint it reads go
  through the page cache, which is not in it since neither is memory-mapped), table bytes;
* with ``--old-src DIR`` (a checkout of the earlier export, e.g. ``/work/main`` before this change) the same run
  exported by that code (the unsharded model in host memory), for N up to ``--old-max-rows``.

Predict latency: p50 over ``--seconds`` of repetitions per cell, one torch thread, random in-range indices, batch
1 / 64 / 512, of the portable program (``model.pt2``) including, for this checkout's artifacts, the look-up of
the rows in the memory-mapped table files (``mdaf_rec.tables.ServingTables``; the page cache is warm: the files
were just written). The earlier artifact is timed the same way in a process running ``--old-src``'s code.

``--auc-run RUN`` also exports RUN (e.g. the ``make demo`` run) fp32 / fp16 / int8 and reports the test AUC of
``mdaf-rec predict`` on ``--auc-data``'s test split with each.

Usage::

    python tools/bench_export.py --rows 1000000 5000000 20000000 --old-src /work/main --old-max-rows 5000000 \\
        --auc-run runs/demo --auc-data data/synth
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from benchdoc import machine, write_section  # noqa: E402

SECTION = "## Export at scale (tools/bench_export.py)"
DTYPES = ("fp32", "fp16", "int8")
BATCHES = (1, 64, 512)
TRAIN_SETS = [
    "features.static_dim=8", "features.sequence_dim=16", "features.max_history=20", "model.head_hidden=[32, 16]",
    "model.bst.num_heads=2", "train.batch_size=256", "train.max_steps_per_epoch=1", "train.threads=1",
    "train.eval_batch_size=4096",
]

# Latency of MODEL_DIR's portable program (with the table look-ups for a format 3 artifact): MODEL_DIR SECONDS.
# Runs under either checkout's code; prints one JSON line {batch: [p50 ms total, p50 ms look-ups]}.
LATENCY = r"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
model_dir, seconds = Path(sys.argv[1]), float(sys.argv[2])
doc = json.loads((model_dir / "feature_spec.json").read_text())
program = torch.export.load(str(model_dir / "model.pt2")).module()
lookup = None
if "tables" in doc:
    from mdaf_rec.predict import ExportedModel
    model = ExportedModel(model_dir)
    lookup = lambda ids: model.tables.rows(model.lookups, ids)
rng = np.random.default_rng(0)
def ids(batch):
    L, S = doc["max_history"], len(doc["sequence_spaces"])
    static = np.stack([rng.integers(2, f["table_rows"], batch) for f in doc["static_fields"]], 1)
    target = np.stack([rng.integers(2, s["table_rows"], batch) for s in doc["sequence_spaces"]], 1)
    history = np.stack([rng.integers(2, s["table_rows"], (batch, L)) for s in doc["sequence_spaces"]], 1)
    history[:, :, L // 2:] = 0
    return {"static_ids": torch.from_numpy(static), "dense": torch.zeros(batch, len(doc["dense_features"])),
            "target_ids": torch.from_numpy(target), "history_ids": torch.from_numpy(history),
            "list_ids": torch.zeros(batch, len(doc.get("pooled_lists", [])), L, dtype=torch.int64)}
out = {}
with torch.no_grad():
    for batch in (1, 64, 512):
        totals, lookups, deadline, n = [], [], time.perf_counter() + seconds, 0
        while time.perf_counter() < deadline or n < 20:
            inputs = ids(batch)
            t0 = time.perf_counter()
            if lookup is None:
                program(inputs["static_ids"], inputs["dense"], inputs["target_ids"], inputs["history_ids"])
                t1 = t0
            else:
                inputs.update(lookup(inputs))
                t1 = time.perf_counter()
                program(*(inputs[i["name"]] for i in doc["inputs"]))
            t2 = time.perf_counter()
            if n >= 3:
                totals.append(t2 - t0); lookups.append(t1 - t0)
            n += 1
        out[batch] = [1e3 * float(np.median(totals)), 1e3 * float(np.median(lookups))]
print(json.dumps(out))
"""


def _env(src: Path) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    env["TORCH_EXTENSIONS_DIR"] = str(src / ".torch_ext") if src == REPO else env.get("TORCH_EXTENSIONS_DIR", "")
    return env


def timed(cmd: List[str], src: Path) -> Dict[str, float]:
    """Runs ``cmd`` under ``/usr/bin/time -v`` with ``src``'s code; returns wall seconds and peak RSS in MiB."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=src, env=_env(src), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"seconds": seconds, "rss_mib": rss / 1024}


def export(run: Path, out: Path, src: Path, dtype: Optional[str]) -> Dict[str, float]:
    """``mdaf-rec export`` of ``run`` by ``src``'s code (``dtype`` None: the earlier CLI, no --table-dtype)."""
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "export", "--run", str(run), "--out", str(out), "--no-compile"]
    result = timed(cmd + (["--table-dtype", dtype] if dtype else []), src)
    tables = out / "tables"
    result["table_mib"] = sum(p.stat().st_size for p in tables.iterdir()) / 2**20 if tables.is_dir() else 0.0
    result["total_mib"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    return result


def latency(model_dir: Path, src: Path, seconds: float) -> Dict[str, List[float]]:
    proc = subprocess.run([sys.executable, "-c", LATENCY, str(model_dir), str(seconds)], cwd=src, env=_env(src),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"latency of {model_dir} failed:\n{proc.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def train(data: Path, run: Path, rows: int) -> None:
    sets = [a for s in TRAIN_SETS + [f"features.id_spaces.item.hash_buckets={rows}"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", "configs/mdaf_bst.yaml", "--data", str(data),
           "--out", str(run), "--epochs", "1", *sets]
    subprocess.run(cmd, cwd=REPO, env=_env(REPO), check=True, capture_output=True)


def test_auc(run: Path, data: Path, root: Path) -> Dict[str, float]:
    """Test AUC of ``mdaf-rec predict`` with ``run`` exported in each table dtype."""
    import pyarrow.parquet as pq

    from mdaf_rec.metrics import auc_score

    labels = pq.read_table(data / "test.parquet", columns=["label"]).column("label").to_numpy()
    out = {}
    for dtype in DTYPES:
        model = root / f"auc_{dtype}"
        export(run, model, REPO, dtype)
        scores = root / f"auc_{dtype}.parquet"
        cmd = [sys.executable, "-m", "mdaf_rec.cli", "predict", "--model", str(model), "--data",
               str(data / "test.parquet"), "--out", str(scores)]
        subprocess.run(cmd, cwd=REPO, env=_env(REPO), check=True, capture_output=True)
        out[dtype] = auc_score(pq.read_table(scores).column("probability").to_numpy(), labels)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000])
    p.add_argument("--old-src", type=Path, help="checkout of the earlier export code (tables inside model.pt2)")
    p.add_argument("--old-max-rows", type=int, default=5_000_000)
    p.add_argument("--auc-run", type=Path)
    p.add_argument("--auc-data", type=Path)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--workdir", type=Path, help="where runs and exports go (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    from mdaf_rec.data.synth import generate

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_export."))
    data = root / "synth"
    if not data.exists():
        generate(data, rows=3000, users=300, items=800, categories=30, max_history=20, seed=3)
    export_rows, latency_rows = [], []
    for rows in args.rows:
        run = root / f"run_{rows}"
        started = time.perf_counter()
        train(data, run, rows)
        print(f"{rows} rows: trained in {time.perf_counter() - started:.0f} s", flush=True)
        variants = [(dtype, REPO, dtype) for dtype in DTYPES]
        if args.old_src is not None and rows <= args.old_max_rows:
            variants.append(("old (fp32 in model.pt2)", args.old_src, None))
        for label, src, dtype in variants:
            model = root / f"model_{rows}_{dtype or 'old'}"
            result = export(run, model, src, dtype)
            print(f"{rows} rows, {label}: {result}", flush=True)
            export_rows.append(f"| {rows:,} | {label} | {result['seconds']:.1f} | {result['rss_mib']:.0f} | "
                               f"{result['table_mib']:.1f} | {result['total_mib']:.1f} |")
            times = latency(model, src, args.seconds)
            print(f"{rows} rows, {label}: latency {times}", flush=True)
            cells = " | ".join(f"{times[b][0]:.2f} ({times[b][1]:.2f})" if dtype else f"{times[b][0]:.2f}"
                               for b in BATCHES)
            latency_rows.append(f"| {rows:,} | {label} | {cells} |")
            if rows != args.rows[0]:
                for f in model.rglob("*"):  # keep the disk: only the smallest size's artifacts stay
                    if f.is_file():
                        f.unlink()
    auc = test_auc(args.auc_run, args.auc_data, root) if args.auc_run else None
    load = os.getloadavg()[0]
    body = [
        f"`python tools/bench_export.py {' '.join(sys.argv[1:])}` — {machine()}; load average {load:.1f} at the end "
        "(the 2 cores are shared with other jobs: times are indicative, peak RSS is not affected).",
        "",
        "A run of MDAF-BST (static_dim 8, sequence_dim 16, max_history 20; one training step) whose item id space is "
        "hashed into N buckets: its `static_item` and `sequence_item` tables have N + 2 rows (96 B a row in fp32). "
        "Export: `mdaf-rec export --no-compile`, one process each, wall time and peak RSS by `/usr/bin/time -v`.",
        "",
        "| item rows | export | time s | peak RSS MiB | tables MiB | MODEL_DIR MiB |",
        "|---:|---|---:|---:|---:|---:|",
        *export_rows,
        "",
        "Predict latency, p50 ms over ≥ 2 s per cell, one torch thread, random in-range indices (half-full "
        "histories), portable program `model.pt2`; for the table files the time includes looking the rows up in the "
        "memory-mapped files (in parentheses: the look-up alone; page cache warm).",
        "",
        "| item rows | artifact | batch 1 | batch 64 | batch 512 |",
        "|---:|---|---:|---:|---:|",
        *latency_rows,
    ]
    if auc is not None:
        body += ["", f"Test AUC of `{args.auc_run}` with `mdaf-rec predict` on `{args.auc_data}/test.parquet`: "
                 + ", ".join(f"{d} {v:.5f}" for d, v in auc.items())
                 + f" (fp16 − fp32 {auc['fp16'] - auc['fp32']:+.1e}, int8 − fp32 {auc['int8'] - auc['fp32']:+.1e})."]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", SECTION, text)


if __name__ == "__main__":
    main()
