"""Trains models on one dataset with several seeds and writes a results table (mean ± std over seeds).

Usage::

    python tools/run_results.py --data data/ml --out runs/results/ml --seeds 1 2 3 \\
        [--models dnn dcnv3 bst mamba4rec mdaf_bst mdaf_mamba] [--set key=value ...] \\
        [--model-set MODEL:key=value ...] [--variant "NAME: key=value key=value" ...] \\
        [--peers runs/peers/ml/summary.json] [--jobs 2]

Every run is ``mdaf-rec train --config configs/<model>.yaml --data DATA --out OUT/<row>/seed_<s>
--set train.seed=<s>`` plus the common ``--set`` overrides (then the model's ``--model-set`` ones and the
row's variant overrides), so the rows differ only in what the table says. A row is a model, or a model with a named variant (``--variant``:
the recipe-ablation tables). Runs already finished (their ``metrics.json`` exists) are read, not retrained;
``--only-finished`` trains nothing and tables what has finished, naming the rows and seeds that have not (the
table of a queue cut short).

Written: ``OUT/results.json`` (every run's metrics and the aggregates) and ``OUT/results.md`` (``--table``
names them otherwise, so several tables can share one OUT and its finished runs): per row the
mean ± sample std (ddof 1) of validation / test AUC and test logloss over the seeds, the epochs run, the best
epoch and the training speed of each seed; FuxiCTR peers from ``tools/peers`` (``--peers``, their ``summary.json``) as
extra rows; for each MDAF row, which rows it is *ahead* of: a mean test-AUC gap larger than the larger of the
two rows' seed stds. On the synthetic data the Bayes-optimal ceiling and the share of the gap between the best
single-branch row and the ceiling that each MDAF row closes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

MODELS = ["dnn", "dcnv3", "bst", "mamba4rec", "mdaf_bst", "mdaf_mamba"]
FUSED = ("mdaf_bst", "mdaf_mamba")
REPO = Path(__file__).resolve().parent.parent


class Row:
    """One table row: a model (and variant) trained with every seed."""

    def __init__(self, model: str, variant: Optional[str], overrides: Sequence[str]) -> None:
        self.model, self.variant, self.overrides = model, variant, list(overrides)

    @property
    def name(self) -> str:
        return self.model if self.variant is None else f"{self.model} [{self.variant}]"

    @property
    def folder(self) -> str:
        return self.model if self.variant is None else f"{self.model}+{self.variant}"


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``"NAME: k=v k=v"`` -> (NAME, [k=v, k=v])."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or any("=" not in o for o in rest.split()):
        raise SystemExit(f"--variant {text!r}: expected 'NAME: key=value key=value ...'")
    return name.strip(), rest.split()


def run_dir(row: Row, seed: int, args: argparse.Namespace) -> Path:
    return args.out / row.folder / f"seed_{seed}"


def train_one(row: Row, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    out = run_dir(row, seed, args)
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", str(REPO / "configs" / f"{row.model}.yaml"),
           "--data", args.data, "--out", str(out), "--set", f"train.seed={seed}", "--set", f"train.threads={args.threads}"]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    for o in args.overrides + args.model_overrides.get(row.model, []) + row.overrides:
        cmd += ["--set", o]
    started = time.perf_counter()
    log = args.out / row.folder / f"seed_{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise SystemExit(f"{row.name} seed {seed} failed (exit {done.returncode}); see {log}")
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        if metrics[split].get("auc") is None:  # a one-class or empty split: metrics.json says why under not_computable
            raise SystemExit(f"{row.name} seed {seed}: {split} AUC is not computable "
                             f"({metrics[split].get('not_computable', {}).get('auc')}); see {out / 'metrics.json'}")
    print(f"{row.name:<32} seed {seed}: test AUC {metrics['test']['auc']:.4f}, best epoch {metrics['best_epoch']}, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return metrics


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    def pick(path: str) -> List[float]:
        split, key = path.split(".")
        return [r[split][key] for r in runs]

    agg = {k: mean_std(pick(k)) for k in ("val.auc", "test.auc", "test.logloss", "test.gauc")}
    agg["epochs_run"] = [r.get("epochs_run", "?") for r in runs]
    agg["best_epoch"] = [r["best_epoch"] for r in runs]
    agg["samples_per_sec"] = [r["samples_per_sec"] for r in runs]
    return agg


def _pm(ms: Tuple[float, float], digits: int = 4) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def table(rows: Dict[str, Dict[str, Any]], peers: Dict[str, Dict[str, Any]], ceiling: Optional[Dict[str, Any]],
          missing: Optional[Dict[str, List[int]]] = None) -> str:
    """The markdown table; ``missing``: row name -> seeds not run (``--only-finished``), named below it."""
    lines = ["| model | library | val AUC | test AUC | test logloss | best / run epochs (per seed) | "
             "train samples/s (per seed) |",
             "|---|---|---:|---:|---:|---|---:|"]

    def epochs(a: Dict[str, Any]) -> str:
        return ", ".join(f"{b}/{r}" for b, r in zip(a["best_epoch"], a["epochs_run"]))

    for name, a in rows.items():
        lines.append(f"| {name} | mdaf_rec | {_pm(a['val.auc'])} | {_pm(a['test.auc'])} | {_pm(a['test.logloss'])} | "
                     f"{epochs(a)} | {'; '.join(f'{v:,.0f}' for v in a['samples_per_sec'])} |")
    for name, a in peers.items():
        lines.append(f"| {name} | FuxiCTR | {_pm(a['val.auc'])} | {_pm(a['test.auc'])} | {_pm(a['test.logloss'])} | "
                     f"{epochs(a)} | |")
    if ceiling:
        lines.append(f"| *Bayes-optimal* | | {ceiling['val']['bayes_auc']:.4f} | {ceiling['test']['bayes_auc']:.4f} | "
                     f"{ceiling['test']['bayes_logloss']:.4f} | | |")
    if missing:
        lines += ["", "Not run: " + "; ".join(f"{n} seed{'s' if len(s) > 1 else ''} {' '.join(map(str, s))}"
                                               for n, s in missing.items()) + "."]
    everyone = {**{n: a for n, a in rows.items()}, **{f"{n} (FuxiCTR)": a for n, a in peers.items()}}
    singles = {o: b for o, b in everyone.items() if not o.startswith(FUSED)}  # single-branch rows and peers
    notes = []
    for name, a in rows.items():
        if not name.startswith(FUSED) or not singles:
            continue
        ahead, behind = [], []
        for other, b in singles.items():
            gap = a["test.auc"][0] - b["test.auc"][0]
            (ahead if gap > max(a["test.auc"][1], b["test.auc"][1]) else behind).append(f"{other} ({gap:+.4f})")
        notes.append(f"- **{name}** ahead of: {', '.join(ahead) or 'none'}; not ahead of: {', '.join(behind) or 'none'}.")
        if ceiling:
            best = max(b["test.auc"][0] for b in singles.values())
            gap = ceiling["test"]["bayes_auc"] - best
            notes.append(f"  Closes {(a['test.auc'][0] - best) / gap:.0%} of the test-AUC gap between the best "
                         f"single-branch row ({best:.4f}) and the ceiling ({ceiling['test']['bayes_auc']:.4f}).")
    return "\n".join(lines + ([""] + notes if notes else []))


def read_peers(path: Optional[Path]) -> Dict[str, Dict[str, Any]]:
    """FuxiCTR rows from ``tools/peers/run_fuxictr.py``'s ``summary.json`` (mean and std per model)."""
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"--peers {path}: cannot read it ({e.strerror})")
    out = {}
    for model, m in json.loads(text)["models"].items():
        out[model] = {
            "val.auc": (m["val_auc"]["mean"], m["val_auc"]["std"] or 0.0),
            "test.auc": (m["test_auc"]["mean"], m["test_auc"]["std"] or 0.0),
            "test.logloss": (m["test_logloss"]["mean"], m["test_logloss"]["std"] or 0.0),
            "best_epoch": m.get("best_epoch") or ["?"] * m["n"],
            "epochs_run": m.get("epochs_run") or ["?"] * m["n"],
        }
    return out


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs of every run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    parser.add_argument("--model-set", action="append", default=[], metavar="MODEL:key=value",
                        help="override for one model's runs only")
    parser.add_argument("--variant", action="append", default=[],
                        help="'NAME: key=value ...': also train each model with these overrides (a row per variant)")
    parser.add_argument("--no-plain", action="store_true", help="with --variant: skip the rows without a variant")
    parser.add_argument("--peers", type=Path, default=None, help="tools/peers summary.json to show beside")
    parser.add_argument("--table", default="results",
                        help="write OUT/TABLE.md and OUT/TABLE.json (several tables can share OUT's finished runs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one torch thread each)")
    parser.add_argument("--only-finished", action="store_true",
                        help="train nothing: table the finished runs and name the rows and seeds that have not run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args()
    peers = read_peers(args.peers)  # before any training: a wrong --peers path fails at once

    variants = [parse_variant(v) for v in args.variant]
    args.model_overrides = {}
    for item in args.model_set:
        model, sep, override = item.partition(":")
        if not sep or model not in MODELS or "=" not in override:
            raise SystemExit(f"--model-set {item!r}: expected MODEL:key=value with MODEL one of {MODELS}")
        args.model_overrides.setdefault(model, []).append(override)
    rows: List[Row] = []
    for model in args.models:
        if not (variants and args.no_plain):
            rows.append(Row(model, None, []))
        rows += [Row(model, name, o) for name, o in variants]
    jobs = [(row, seed) for row in rows for seed in args.seeds]
    missing: Dict[str, List[int]] = {}
    if args.only_finished:
        for row, seed in jobs:
            if not (run_dir(row, seed, args) / "metrics.json").exists():
                missing.setdefault(row.name, []).append(seed)
        jobs = [(row, seed) for row, seed in jobs if seed not in missing.get(row.name, [])]
        if not jobs:
            raise SystemExit(f"--only-finished: no finished run under {args.out}")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: train_one(job[0], job[1], args), jobs))
    per_row: Dict[str, List[Dict[str, Any]]] = {}
    for (row, _), metrics in zip(jobs, results):
        per_row.setdefault(row.name, []).append(metrics)
    aggregates = {name: aggregate(runs) for name, runs in per_row.items()}
    ceiling = results[0].get("bayes_ceiling")
    per_model = "".join(f"; for {m} only `{' '.join(o)}`" for m, o in args.model_overrides.items())
    header = (f"Data `{args.data}`; seeds {' '.join(map(str, args.seeds))}; "
              f"overrides `{' '.join(args.overrides) or 'none'}`{per_model}"
              f"{f'; epochs {args.epochs}' if args.epochs else ''}; {args.threads} thread(s) per run; {machine()}; "
              f"{time.strftime('%Y-%m-%d')}. Mean ± sample std over seeds; test metrics of the best-validation-AUC "
              f"epoch.\n\n`python tools/run_results.py {shlex.join(sys.argv[1:])}`\n")
    text = header + "\n" + table(aggregates, peers, ceiling, missing)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.table}.md").write_text(text + "\n")
    (args.out / f"{args.table}.json").write_text(json.dumps(
        {"args": sys.argv[1:], "machine": machine(), "rows": aggregates, "runs": per_row}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
