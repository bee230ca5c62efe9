"""Benchmark of evaluation metrics: exact (every row kept and ranked) vs streaming (histograms, sums, GAUC words).

For each row count and mode a fresh process feeds the same rows (float32 model-like scores, 0/1 labels at a
10% rate, ~20 rows per user, a scalar gate; made batch by batch from a seed, so the rows themselves are never
held) in batches of 8,192 to the accumulator of :mod:`mdaf_rec.metrics` / :mod:`mdaf_rec.streaming_metrics`
and computes the metrics in one process (world size 1). Reported: the time of the update loop and of
``compute``, the process's peak RSS (``ru_maxrss``) and its RSS before the first batch, and the streaming
metrics' differences from the exact ones. Writes the "Evaluation metrics" section of ``docs/benchmarks.md``.

Usage: ``python tools/bench_eval.py [--rows 1000000 10000000 30000000] [--no-write]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchdoc import machine, write_section  # noqa: E402
from mdaf_rec.streaming_metrics import AUC_BINS, make_accumulator  # noqa: E402

BATCH = 8192
SECTION = "## Evaluation metrics (tools/bench_eval.py)"
NOTE = (
    'Peak RSS includes ~220 MB of the process itself (torch imported; "RSS before"). Exact keeps 32 bytes a '
    'row during the pass and needs ~130 bytes a row at `compute` (the rows sorted twice, n log n), on every '
    'rank after its all-gather; streaming keeps 8 bytes a row for GAUC (on the rank owning the user, after '
    'the `all_to_all`) and 4 MB of histograms and sums, and peaks at ~20 bytes a row while `compute` joins '
    "the batches' GAUC words and sorts them (then works through them 1,048,576 rows at a time). GAUC and the "
    'sums equal the exact values (the sums to float64 rounding); the AUC differs by far less than its bound, '
    'which `compute` reports for every pass (`auc_error_bound` in `metrics.json`): the bound counts every '
    'positive-negative pair sharing a score bin, and is larger when the scores crowd into a narrow logit '
    'range (an untrained model), which is what the exact default for splits up to 1,000,000 rows is for. '
    "Streaming's update loop (bin lookups, scatter-adds; GPU work on a GPU) is the part exact does not have; "
    'its `compute` does not grow with n log n.'
)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(rows: int, mode: str) -> Dict[str, Any]:
    """Feeds ``rows`` rows to a ``mode`` accumulator and computes; the measurements as a dict."""
    torch.set_num_threads(1)
    acc = make_accumulator(mode, AUC_BINS)
    users = max(rows // 20, 1)
    base = _rss_mb()
    started = time.perf_counter()
    for index, start in enumerate(range(0, rows, BATCH)):
        b = min(BATCH, rows - start)
        g = torch.Generator().manual_seed(index)
        labels = (torch.rand(b, generator=g) < 0.1).float()
        probs = torch.sigmoid(1.2 * torch.randn(b, generator=g) + labels - 2.2)
        acc.update(probs, labels, torch.randint(0, users, (b,), generator=g), torch.rand(b, 1, generator=g))
    fed = time.perf_counter()
    out = acc.compute()
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    keys = ("auc", "gauc", "logloss", "ne", "calibration", "auc_error_bound")
    return {"rows": rows, "mode": mode, "update_s": fed - started, "compute_s": done - fed, "rss_before_mb": base,
            "peak_rss_mb": peak, **{k: out[k] for k in keys}}


def run(rows: int, mode: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", str(rows), mode], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: List[Dict[str, Any]]) -> str:
    lines = [
        "| rows | mode | update (s) | compute (s) | total (s) | peak RSS (MB) | RSS before (MB) | AUC | "
        "AUC diff vs exact | auc_error_bound | GAUC diff vs exact | logloss diff vs exact |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    exact = {r["rows"]: r for r in results if r["mode"] == "exact"}
    for r in results:
        e = exact.get(r["rows"])
        diff = (lambda k: f"{abs(r[k] - e[k]):.1e}") if e else (lambda k: "")
        lines.append(
            f"| {r['rows']:,} | {r['mode']} | {r['update_s']:.1f} | {r['compute_s']:.1f} | "
            f"{r['update_s'] + r['compute_s']:.1f} | {r['peak_rss_mb']:,.0f} | {r['rss_before_mb']:,.0f} | "
            f"{r['auc']:.6f} | {diff('auc')} | {r['auc_error_bound']:.1e} | {diff('gauc')} | {diff('logloss')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000])
    p.add_argument("--modes", nargs="+", default=["exact", "streaming"])
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return
    results = []
    for rows in args.rows:
        for mode in args.modes:
            results.append(run(rows, mode))
            print(json.dumps(results[-1]), flush=True)
    load = open("/proc/loadavg").read().split()[0]
    body = (
        f"`python tools/bench_eval.py` — {machine()}; load average {load} at the end (the machine is shared "
        "with other jobs: times are indicative, peak RSS is what this table is for). One process (world size 1), "
        f"batches of {BATCH:,}, float32 scores, 10% positives, ~20 rows per user, a scalar gate; "
        f"streaming with the default {AUC_BINS:,} AUC bins.\n\n{table(results)}\n\n{NOTE}\n"
    )
    print(body)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", SECTION, body)


if __name__ == "__main__":
    main()
