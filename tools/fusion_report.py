"""Per-seed calibration and gate tables of finished runs (``tools/run_results.py``'s folders).

Usage::

    python tools/fusion_report.py --out runs/fusion/ub --rows mdaf_mamba "mdaf_mamba+static lr 0.005" [--seeds 1 2 3]

Reads ``OUT/<row>/seed_<s>/metrics.json`` (written by ``mdaf-rec train``: the final test scoring's
``reliability`` table and, for MDAF, ``gate`` and ``gate_profile``) and prints two markdown tables:

1. per row and seed: test AUC, test logloss, calibration (mean prediction / observed CTR), ECE (the
   rows-weighted mean |mean prediction − observed rate| over the reliability bins), the share of test rows
   predicted outside [0.1, 0.9] and the observed rate there, best / run epochs, gate mean and the share of rows
   served mostly from history (``g < 0.5``);
2. per row: the gate mean and the share served from history for each history-length group and user-activity
   group, pooled over the seeds (rows-weighted).

A run trained before the final scoring wrote ``reliability`` / ``gate_profile`` is re-scored with
``mdaf-rec eval --run RUN --split test > RUN/test_rescored.json`` (the best checkpoint, the same test metrics);
this tool then takes those two entries from that file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def read_run(folder: Path) -> Optional[Dict[str, Any]]:
    """A run's ``metrics.json``, with ``reliability`` / ``gate_profile`` from ``test_rescored.json`` if it has none."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    rescored = folder / "test_rescored.json"
    if "reliability" not in metrics and rescored.is_file():
        extra = json.loads(rescored.read_text())
        metrics.update({k: extra[k] for k in ("reliability", "gate_profile") if k in extra})
    return metrics


def calibration_numbers(reliability: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """ECE over the bins, and the share (and observed rate) of rows predicted below 0.1 or above 0.9."""
    rows = sum(r["rows"] for r in reliability)
    ece = sum(r["rows"] * abs(r["mean_pred"] - r["observed"]) for r in reliability) / rows
    extreme = [r for r in reliability if r["bin"] in ("0.0–0.1", "0.9–1.0")]
    low = next((r for r in reliability if r["bin"] == "0.0–0.1"), None)
    high = next((r for r in reliability if r["bin"] == "0.9–1.0"), None)
    return {
        "ece": ece,
        "extreme_share": sum(r["rows"] for r in extreme) / rows,
        "low_observed": low["observed"] if low else float("nan"),
        "high_observed": high["observed"] if high else float("nan"),
    }


def seed_table(out: Path, rows: Sequence[str], seeds: Sequence[int]) -> str:
    lines = ["| row | seed | test AUC | test logloss | calibration | ECE | rows p<0.1 or p>0.9 (observed rate there: low / high) "
             "| best / run epochs | gate mean | served from history (g < 0.5) |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for row in rows:
        for seed in seeds:
            m = read_run(out / row / f"seed_{seed}")
            if m is None:
                lines.append(f"| {row} | {seed} | (not run) | | | | | | | |")
                continue
            t = m["test"]
            cal = calibration_numbers(m["reliability"]) if "reliability" in m else None
            ece = f"{cal['ece']:.4f}" if cal else ""
            extreme = (f"{cal['extreme_share']:.1%} ({cal['low_observed']:.2f} / {cal['high_observed']:.2f})"
                       if cal else "")
            gate = f"{m['gate']['mean']:.3f}" if "gate" in m else ""
            lines.append(f"| {row} | {seed} | {t['auc']:.4f} | {t['logloss']:.4f} | {t['calibration']:.3f} | {ece} | "
                         f"{extreme} | {m['best_epoch']}/{m['epochs_run']} | {gate} | {_served_from_history(m)} |")
    return "\n".join(lines)


def _served_from_history(m: Dict[str, Any]) -> str:
    groups = m.get("gate_profile", {}).get("history_length")
    if not groups:
        return ""
    rows = sum(g["rows"] for g in groups)
    return f"{sum(g['rows'] * g['from_history'] for g in groups) / rows:.1%}"


def profile_table(out: Path, rows: Sequence[str], seeds: Sequence[int], axis: str) -> str:
    pooled: Dict[str, Dict[str, List[float]]] = {}
    order: List[str] = []
    for row in rows:
        for seed in seeds:
            m = read_run(out / row / f"seed_{seed}")
            for g in (m or {}).get("gate_profile", {}).get(axis, []):
                if g["group"] not in order:
                    order.append(g["group"])
                acc = pooled.setdefault(row, {}).setdefault(g["group"], [0.0, 0.0, 0.0])
                acc[0] += g["rows"]
                acc[1] += g["rows"] * g["mean"]
                acc[2] += g["rows"] * g["from_history"]
    order.sort(key=_group_key)
    lines = [f"| row | {' | '.join(order)} |", "|---|" + "---:|" * len(order)]
    for row, groups in pooled.items():
        cells = []
        for name in order:
            n, s, h = groups.get(name, [0.0, 0.0, 0.0])
            cells.append(f"{s / n:.2f} / {h / n:.0%} ({int(n):,})" if n else "")
        lines.append(f"| {row} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _group_key(label: str) -> int:
    return int(label.lstrip("≥").split("–")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="tools/run_results.py's --out folder")
    parser.add_argument("--rows", nargs="+", required=True, help="row folders: MODEL or MODEL+VARIANT")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    args = parser.parse_args()
    print(seed_table(args.out, args.rows, args.seeds))
    for axis, title in (("history_length", "history length"), ("user_activity", "user's training rows")):
        print(f"\nGate mean / share served from history (test rows), by {title}, pooled over the seeds:\n")
        print(profile_table(args.out, args.rows, args.seeds, axis))


if __name__ == "__main__":
    main()
