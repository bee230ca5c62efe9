"""Benchmark of the out-of-core converters: wall time, CPU time and peak RSS against rows and ``--memory-limit``.

Generates raw files in the real formats with ``tools/gen_raw.py`` (kept in ``--work`` between runs), then
runs ``mdaf-rec data <format>`` in a subprocess under ``/usr/bin/time -v`` (peak RSS of the whole process:
Python, pyarrow's CSV blocks and DuckDB; CPU seconds = user + system of the process and its threads) for
every (size, memory limit), with ``nice -n NICE`` (``--nice``, default 10) and DuckDB ``--threads``. On a
machine shared with other jobs wall time depends on them, CPU time much less, so both are reported, with the
load average at the start of each run. Fits time = a + b * rows by least squares (CPU and wall, per memory limit and thread count) and
extrapolates to the real data's size (UserBehavior 100M rows; Taobao Ad 26M impressions + 723M behaviour-log
rows; MovieLens ml-25m's 25M ratings). Writes the table into the "Converters" section of ``docs/benchmarks.md``
(other sections are left alone).

Usage::

    python tools/bench_convert.py behavior --sizes 1000000,4000000,16000000 --limits 1GB,2GB
    python tools/bench_convert.py ad --sizes 1000000,4000000 --log-ratio 4 --limits 1GB,2GB
    python tools/bench_convert.py movielens --sizes 1000000,16000000 --limits 1GB
    python tools/bench_convert.py behavior --work DIR --report-only   # the results stored in DIR so far
    python tools/bench_convert.py behavior --sizes 1000000 --limits 2GB --engine spark   # Spark beside DuckDB

``--engine spark`` runs each (size, limit) on both engines (DuckDB's runs are reused from ``--work``) with
``--engine spark --spark-master local[THREADS] --spark-driver-memory LIMIT`` and writes its own section, "Spark
vs DuckDB". Spark's JVM is a child of the Python process that ``/usr/bin/time`` does not wait for, so peak
memory there is the largest sum of the RSS of the converter's process tree, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from benchdoc import machine, write_section  # noqa: E402

SECTION = "## Converters out of core (tools/bench_convert.py)"
DOC = REPO / "docs" / "benchmarks.md"
# Real sizes to extrapolate to: raw rows read by the converter.
REAL_ROWS = {"behavior": 100_150_807, "ad": 26_557_961 + 723_268_134, "movielens": 25_000_095}
# dataset -> the converter's format and the section of docs/benchmarks.md
FORMATS = {"behavior": "taobao-behavior", "ad": "taobao-ad", "movielens": "movielens"}
# the converters' code: a stored run is reused only if it measured the code checked out now
CODE = "mdaf_rec/data/converters"
SECTIONS = {"behavior": "UserBehavior", "ad": "Taobao Ad", "movielens": "MovieLens"}


def _gigabytes(size: str) -> float:
    """A DuckDB memory size (``1GB``, ``512MB``, ``2GiB``) in GB (10^9 bytes)."""
    number, unit = re.match(r"^\s*([0-9.]+)\s*([A-Za-z]+)\s*$", size).groups()
    scale = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
             "tib": 2 ** 40}[unit.lower()]
    return float(number) * scale / 1e9


def run_once(fmt: str, raw: Path, out: Path, limit: str, threads: int, extra: List[str],
             engine: str = "duckdb", niceness: int = 10) -> Dict[str, float]:
    """One conversion under ``/usr/bin/time -v``: wall and CPU seconds, peak RSS (GB; Spark: of the process
    tree, :func:`_tree_rss_kb`), output rows and the load average (1 min) at the start."""
    shutil.rmtree(out, ignore_errors=True)
    if engine == "spark":
        extra = [*extra, "--engine", "spark", "--spark-master", f"local[{threads}]",
                 "--spark-driver-memory", limit.lower().replace("gib", "g").replace("gb", "g")]
    cmd = ["/usr/bin/time", "-v", "nice", "-n", str(niceness), sys.executable, "-m", "mdaf_rec.cli", "data", fmt,
           "--raw", str(raw), "--out", str(out), "--memory-limit", limit, "--threads", str(threads), *extra]
    load, commit, when = os.getloadavg()[0], _commit(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    code = _commit(CODE)
    start = time.perf_counter()
    path = "/usr/bin:/bin" + (f":{Path(os.environ['JAVA_HOME']) / 'bin'}" if "JAVA_HOME" in os.environ else "")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": path, "PYTHONPATH": str(REPO)})
    tree_kb = 0
    while proc.poll() is None and engine == "spark":
        tree_kb = max(tree_kb, _tree_rss_kb(proc.pid))
        time.sleep(0.2)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed ({' '.join(cmd)}):\n{stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([0-9.]+)", stderr).group(1))
              for kind in ("User", "System"))
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": wall, "cpu_seconds": cpu, "load": load, "rss_gb": max(rss_kb, tree_kb) / 1e6,
            "rows_out": meta["rows"], "nice": niceness, "commit": commit, "code": code, "when": when}


def _commit(path: str = ".") -> str:
    """The checked-out commit of this repository (``path``: the last commit that changed it), ``+`` when the
    tree (under ``path``) has changes, for the results file."""
    head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", path],
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", path],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+" if dirty else "")


def _code(result: Dict) -> str:
    """The converter code a stored run measured (runs stored before ``code`` was recorded: the checkout)."""
    return result.get("code", result["commit"])


def _tree_rss_kb(root: int) -> int:
    """The summed resident memory (kB) of process ``root`` and all its descendants, from /proc."""
    children: Dict[int, List[int]] = {}
    rss: Dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        rss[int(entry.name)] = int(found.group(1)) if found else 0
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def generate(dataset: str, rows: int, log_ratio: float, work: Path) -> Path:
    """The raw input for ``rows`` (generated once into ``work``)."""
    folder = work / f"{dataset}-{rows}-{log_ratio:g}"
    if not (folder / "done").exists():
        args = [dataset, "--rows", str(rows), "--out", str(folder)]
        if dataset == "ad" and log_ratio:
            args += ["--behavior-rows", str(int(rows * log_ratio))]
        subprocess.run([sys.executable, str(REPO / "tools" / "gen_raw.py"), *args], check=True, capture_output=True)
        (folder / "done").touch()
    return folder / "UserBehavior.csv" if dataset == "behavior" else folder


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=tuple(FORMATS))
    parser.add_argument("--sizes", default="1000000,4000000,16000000",
                        help="UserBehavior rows, raw_sample.csv impressions or ratings.csv ratings (comma-separated)")
    parser.add_argument("--limits", default="1GB,2GB", help="--memory-limit values (comma-separated)")
    parser.add_argument("--log-ratio", type=float, default=4.0,
                        help="ad: behavior_log.csv rows per impression (real data: 27; 0 = no log)")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads / Spark local[N] (default 2)")
    parser.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb",
                        help="spark: run Spark beside DuckDB at each (size, limit) and write the 'Spark vs DuckDB' section")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the conversions (default 10)")
    parser.add_argument("--work", type=Path, default=None, help="folder for raw files and outputs (kept)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the results stored in --work by earlier (possibly partial) runs")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_convert-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    limits = args.limits.split(",")
    fmt = FORMATS[args.dataset]
    store = work / f"results-{args.dataset}.json"
    # earlier runs' results in --work are kept (a run of this converter code is not repeated): runs can be
    # split and resumed, and runs of earlier code stay in the table, labelled
    results = json.loads(store.read_text()) if store.exists() else []
    code = _commit(CODE)
    for rows in [] if args.report_only else sizes:
        raw = generate(args.dataset, rows, args.log_ratio, work)
        raw_rows = rows + (int(rows * args.log_ratio) if args.dataset == "ad" else 0)
        extra = ["--behavior-log", str(raw / "behavior_log.csv")] if args.dataset == "ad" and args.log_ratio else []
        for limit in limits:
            for engine in ("duckdb", "spark") if args.engine == "spark" else ("duckdb",):
                if any(r["rows"] == rows and r["limit"] == limit and r["threads"] == args.threads
                       and r.get("engine", "duckdb") == engine and _code(r) == code for r in results):
                    continue
                r = run_once(fmt, raw, work / f"out-{args.dataset}", limit, args.threads, extra, engine, args.nice)
                r.update(rows=rows, raw_rows=raw_rows, limit=limit, threads=args.threads, engine=engine)
                results.append(r)
                store.write_text(json.dumps(results, indent=1))  # a partial run can still be reported
                print(f"{fmt} {engine} {raw_rows:>11,} raw rows, --memory-limit {limit}, --threads {args.threads}: "
                      f"{r['seconds']:7.1f} s wall, {r['cpu_seconds']:7.1f} s CPU, "
                      f"peak RSS {r['rss_gb']:.2f} GB, {r['rows_out']:,} rows out", flush=True)
    if args.engine == "spark":
        body = report_engines(results, args, fmt, sizes, limits)
        section = f"{SECTION} - Spark vs DuckDB"
    else:
        body = report([r for r in results if r.get("engine", "duckdb") == "duckdb"], args, fmt, code)
        section = f"{SECTION} - {SECTIONS[args.dataset]}"
    print(body)
    if not args.no_write:
        write_section(DOC, section, body)
    return 0


def report_engines(results: List[Dict], args: argparse.Namespace, fmt: str, sizes: List[int],
                   limits: List[str]) -> str:
    """The markdown table of both engines' runs at ``sizes`` x ``limits``."""
    lines = [
        f"Machine: {machine()}. `nice -n 10`; **other jobs shared the 2 cores** during these runs, so wall times "
        "are pessimistic and noisy. Spark in local mode (`--spark-master local[THREADS]`, "
        "`--spark-driver-memory` = the DuckDB limit); its peak memory is the summed RSS of the converter's "
        "process tree (Python + JVM) sampled every 0.2 s, DuckDB's is `/usr/bin/time -v`'s. Spark in local mode "
        "is expected to be slower than DuckDB on one machine (a JVM, a job and a Parquet round-trip per step, every "
        "redraw round of the negative sampler included): it is there for clusters (docs/data.md).",
        "",
        f"`mdaf-rec data {fmt}`" + (f" with `--behavior-log` ({args.log_ratio:g} log rows per impression)"
                                     if args.dataset == "ad" and args.log_ratio else ""),
        "",
        "| engine | raw rows read | memory | threads | wall s | raw rows/s | peak RSS GB | rows out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["raw_rows"], r["limit"], r.get("engine", "duckdb"))):
        if r["rows"] in sizes and r["limit"] in limits and r["threads"] == args.threads:
            lines.append(f"| {r.get('engine', 'duckdb')} | {r['raw_rows']:,} | {r['limit']} | {r['threads']} "
                         f"| {r['seconds']:.0f} | {r['raw_rows'] / r['seconds']:,.0f} | {r['rss_gb']:.2f} "
                         f"| {r['rows_out']:,} |")
    return "\n".join(lines)


def report(results: List[Dict], args: argparse.Namespace, fmt: str, code: str) -> str:
    """The markdown table of ``results`` (each row with the converter code it measured: runs of code other
    than ``code`` are labelled *before*) and, from the runs of ``code``, the fit, the extrapolation and the
    memory bound per (memory limit, threads)."""
    lines = [
        f"Machine: {machine()}. `nice -n {'/'.join(sorted({str(r.get('nice', 10)) for r in results}))}`; "
        "**other jobs shared the 2 cores** "
        "during these runs (load average at each run's start in the table), so wall times are pessimistic and "
        "noisy; CPU seconds (user + system, all threads) are the yardstick, and peak RSS is not affected. Raw "
        "files from `tools/gen_raw.py` (real formats, Zipf ids); CPU time and peak RSS of the whole converter "
        "process by `/usr/bin/time -v`.",
        "",
        f"`mdaf-rec data {fmt}`" + (f" with `--behavior-log` ({args.log_ratio:g} log rows per impression)"
                                     if args.dataset == "ad" and args.log_ratio else ""),
        "",
        "| converter code | raw rows read | --memory-limit | --threads | CPU s | raw rows / CPU s | wall s "
        "| raw rows / wall s | load at start | peak RSS GB | rows out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (_code(r) != code, r["limit"], r["threads"], r["raw_rows"])):
        label = _code(r) if _code(r) == code else f"before: {_code(r)}"
        lines.append(f"| {label} | {r['raw_rows']:,} | {r['limit']} | {r['threads']} | {r['cpu_seconds']:.0f} "
                     f"| {r['raw_rows'] / r['cpu_seconds']:,.0f} | {r['seconds']:.0f} | {r['raw_rows'] / r['seconds']:,.0f} "
                     f"| {r['load']:.1f} | {r['rss_gb']:.2f} | {r['rows_out']:,} |")
    lines.append("")
    real = REAL_ROWS[args.dataset]
    results = [r for r in results if _code(r) == code]
    for key in dict.fromkeys((r["limit"], r["threads"]) for r in results):
        mine = sorted((r for r in results if (r["limit"], r["threads"]) == key), key=lambda r: r["raw_rows"])
        bound = _gigabytes(key[0]) + 1
        peaks = " / ".join(f"{r['rss_gb']:.2f}" for r in mine)
        over = [f"{r['raw_rows']:,}" for r in mine if r["rss_gb"] > bound]
        x = np.array([r["raw_rows"] for r in mine], float)
        sizes = f"{min(x) / 1e6:g}M-{max(x) / 1e6:g}M" if len(set(x)) > 1 else f"{min(x) / 1e6:g}M"
        text = (f"* code {code}, `--memory-limit {key[0]}`, `--threads {key[1]}` ({len(mine)} "
                f"run{'s' if len(mine) > 1 else ''}, {sizes} raw rows): ")
        if len(set(x)) >= 2:
            fits = {}
            for kind in ("cpu_seconds", "seconds"):
                slope, intercept = np.polyfit(x, np.array([r[kind] for r in mine], float), 1)
                fits[kind] = (slope * 1e6, intercept, (intercept + slope * real) / 3600)
            text += (f"fitted **{fits['cpu_seconds'][0]:.1f} CPU s** per million raw rows "
                     f"({fits['cpu_seconds'][1]:+.0f} s) and {fits['seconds'][0]:.1f} wall s per million "
                     f"({fits['seconds'][1]:+.0f} s); extrapolated to the real {real / 1e6:.0f}M raw rows: "
                     f"**{fits['cpu_seconds'][2]:.1f} CPU hours**, {fits['seconds'][2]:.1f} h wall at this load "
                     f"(extrapolations, not runs). ")
        growth = " / ".join(f"{b['rss_gb'] - a['rss_gb']:+.2f}" for a, b in zip(mine, mine[1:]))
        lines.append(
            text + f"Peak RSS by size: {peaks} GB" + (f" (step to step: {growth} GB)" if growth else "")
            + f"; the bound limit + 1 GB = {bound:g} GB is "
            + (f"**exceeded** at {', '.join(over)} raw rows." if over
               else "**met at every size**." if len(set(x)) > 1 else "**met**.")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
