"""Trains all five models on one dataset with the same budget and prints a markdown results table.

Usage::

    python tools/run_results.py --data data/synth --out runs/results/synth --epochs 3 [--set key=value ...]

Each model runs ``mdaf-rec train --config configs/<model>.yaml`` with the same overrides (so the same
epochs, batch size, dims and optimizer), one after another, and its ``metrics.json`` is collected. With
``--ceiling`` the dataset's Bayes-optimal AUC (synthetic data) is shown, and the fraction of the gap
between the best single-branch model and the ceiling that each MDAF variant closes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

MODELS = ["dcnv3", "mamba4rec", "bst", "mdaf_mamba", "mdaf_bst"]
BASELINES = ["dcnv3", "mamba4rec", "bst"]


def run(model: str, data: str, out: Path, epochs: int, overrides: List[str], reuse: bool) -> Dict:
    if reuse and (out / model / "metrics.json").exists():
        return json.loads((out / model / "metrics.json").read_text())
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", f"configs/{model}.yaml", "--data", data,
           "--out", str(out / model), "--epochs", str(epochs)]
    for o in overrides:
        cmd += ["--set", o]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / model / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def table(results: Dict[str, Dict], ceiling: Dict | None) -> str:
    lines = ["| model | val AUC | test AUC | test GAUC | test logloss | calibration | best epoch | train samples/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, m in results.items():
        lines.append(
            f"| {model} | {m['val']['auc']:.4f} | {m['test']['auc']:.4f} | {m['test']['gauc']:.4f} | "
            f"{m['test']['logloss']:.4f} | {m['test']['calibration']:.3f} | {m['best_epoch']} | {m['samples_per_sec']:,.0f} |"
        )
    if ceiling:
        lines.append(f"| *Bayes-optimal* | {ceiling['val']['bayes_auc']:.4f} | {ceiling['test']['bayes_auc']:.4f} | | "
                     f"{ceiling['test']['bayes_logloss']:.4f} | | | |")
        best_single = max(results[b]["test"]["auc"] for b in BASELINES if b in results)
        gap = ceiling["test"]["bayes_auc"] - best_single
        for model in ("mdaf_mamba", "mdaf_bst"):
            if model in results and gap > 0:
                closed = (results[model]["test"]["auc"] - best_single) / gap
                lines.append(f"\n{model}: closes {closed:.0%} of the test-AUC gap between the best single-branch "
                             f"model ({best_single:.4f}) and the ceiling ({ceiling['test']['bayes_auc']:.4f}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--reuse", action="store_true", help="take a model's existing metrics.json instead of training")
    args = parser.parse_args()
    results = {m: run(m, args.data, args.out, args.epochs, args.overrides, args.reuse) for m in args.models}
    ceiling = next(iter(results.values())).get("bayes_ceiling")
    text = table(results, ceiling)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
