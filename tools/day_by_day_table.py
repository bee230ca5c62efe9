"""The table of ``tools/day_by_day.sh``: per arm (base, warm, warmopt, full) of ``RUNS/<arm>_s<seed>/metrics.json``
the validation and test AUC (mean ± sample std over seeds), steps, epochs and wall seconds (``RUNS/times.txt``),
then the AUC gap of each warm arm to ``full``, seed by seed.

``python tools/day_by_day_table.py RUNS``
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

ARMS = ("base", "warm", "warmopt", "full")


def mean_std(values: List[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main(root: Path) -> None:
    times: Dict[str, float] = {}
    if (root / "times.txt").exists():
        for line in (root / "times.txt").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                times[parts[0]] = float(parts[1])
    runs: Dict[str, Dict[str, dict]] = {}
    for arm in ARMS:
        for run in sorted(root.glob(f"{arm}_s*")):
            if run.is_dir() and (run / "metrics.json").exists():
                runs.setdefault(arm, {})[run.name.rsplit("_", 1)[1]] = {
                    **json.loads((run / "metrics.json").read_text()), "wall": times.get(run.name)}
    print("| arm | seeds | val AUC | test AUC | steps | epochs run (best) | wall s |")
    print("|---|---|---:|---:|---:|---|---:|")
    for arm, seeds in runs.items():
        ms = list(seeds.values())
        epochs = ", ".join(f"{m['epochs_run']} ({m['best_epoch']})" for m in ms)
        walls = ", ".join(f"{m['wall']:.0f}" if m["wall"] else "?" for m in ms)
        print(f"| {arm} | {len(ms)} | {mean_std([m['val']['auc'] for m in ms])} | {mean_std([m['test']['auc'] for m in ms])}"
              f" | {', '.join(str(m['steps']) for m in ms)} | {epochs} | {walls} |")
    for arm in ("warm", "warmopt"):
        common = sorted(set(runs.get(arm, {})) & set(runs.get("full", {})))
        for split in ("val", "test"):
            gaps = [runs[arm][s][split]["auc"] - runs["full"][s][split]["auc"] for s in common]
            if gaps:
                print(f"{arm} - full, {split} AUC per seed {common}: {[round(g, 4) for g in gaps]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
