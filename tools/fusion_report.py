"""Per-seed calibration and gate tables of finished runs (``tools/run_results.py``'s folders).

Usage::

    python tools/fusion_report.py --out runs/fusion/ub --rows mdaf_mamba "mdaf_mamba+static lr 0.005" [--seeds 1 2 3]

Reads ``OUT/<row>/seed_<s>/metrics.json`` (written by ``mdaf-rec train``: the final test scoring's
``reliability`` table and, for MDAF, ``gate`` and ``gate_profile``) and prints two markdown tables:

1. per row and seed: validation and test AUC, test logloss, calibration (mean prediction / observed CTR), ECE
   (the rows-weighted mean |mean prediction − observed rate| over the reliability bins), the share of test rows
   predicted outside [0.1, 0.9] and the observed rate there, best / run epochs, the validation logloss of the
   picked (best-AUC) epoch against the lowest of the run and its epoch (``metrics.jsonl``), gate mean and the
   share of rows served mostly from history (``g < 0.5``); then, for a row with two or more finished seeds, the mean ± sample
   std (ddof 1) of each number over them;
2. per row: the gate mean and the share served from history for each history-length group and user-activity
   group, pooled over the seeds (rows-weighted).

A run trained before the final scoring wrote ``reliability`` / ``gate_profile`` is re-scored with
``mdaf-rec eval --run RUN --split test > RUN/test_rescored.json`` (the best checkpoint, the same test metrics);
this tool then takes those two entries from that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def read_run(folder: Path) -> Optional[Dict[str, Any]]:
    """A run's ``metrics.json`` (``epochs``: its ``metrics.jsonl`` records), with ``reliability`` / ``gate_profile``
    from ``test_rescored.json`` if it has none."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    epochs = folder / "metrics.jsonl"
    if epochs.is_file():
        metrics["epochs"] = [json.loads(line) for line in epochs.read_text().splitlines() if line.strip()]
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
    lines = ["| row | seed | val AUC | test AUC | test logloss | calibration | ECE | rows p<0.1 or p>0.9 (observed rate "
             "there: low / high) | best / run epochs | val logloss: picked / lowest (epoch) | gate mean | served from history "
             "(g < 0.5) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|"]
    for row in rows:
        numbers: List[Dict[str, Optional[float]]] = []
        for seed in seeds:
            m = read_run(out / row / f"seed_{seed}")
            if m is None:
                lines.append(f"| {row} | {seed} | (not run) | | | | | | | | | |")
                continue
            n = seed_numbers(m)
            numbers.append(n)
            extreme = (f"{n['extreme_share']:.1%} ({n['low_observed']:.2f} / {n['high_observed']:.2f})"
                       if n["extreme_share"] is not None else "")
            lines.append(f"| {row} | {seed} | {n['val_auc']:.4f} | {n['test_auc']:.4f} | {n['test_logloss']:.4f} | "
                         f"{n['calibration']:.3f} | {_num(n['ece'], '.4f')} | {extreme} | "
                         f"{m['best_epoch']}/{m['epochs_run']} | {_val_logloss(m)} | {_num(n['gate_mean'], '.3f')} | "
                         f"{_num(n['from_history'], '.1%')} |")
        if len(numbers) > 1:
            cells = {k: _mean_std([n[k] for n in numbers], fmt) for k, fmt in (
                ("val_auc", ".4f"), ("test_auc", ".4f"), ("test_logloss", ".4f"), ("calibration", ".3f"),
                ("ece", ".4f"), ("extreme_share", ".1%"), ("gate_mean", ".3f"), ("from_history", ".1%"))}
            lines.append(f"| {row} | mean ± std ({len(numbers)}) | {cells['val_auc']} | {cells['test_auc']} | "
                         f"{cells['test_logloss']} | {cells['calibration']} | {cells['ece']} | {cells['extreme_share']} "
                         f"| | | {cells['gate_mean']} | {cells['from_history']} |")
    return "\n".join(lines)


def seed_numbers(m: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """One run's numbers of the seed table (``None`` where the run has no reliability table or gate)."""
    cal = calibration_numbers(m["reliability"]) if "reliability" in m else {}
    return {
        "val_auc": m["val"]["auc"], "test_auc": m["test"]["auc"], "test_logloss": m["test"]["logloss"],
        "calibration": m["test"]["calibration"], "ece": cal.get("ece"), "extreme_share": cal.get("extreme_share"),
        "low_observed": cal.get("low_observed"), "high_observed": cal.get("high_observed"),
        "gate_mean": m["gate"]["mean"] if "gate" in m else None, "from_history": _served_from_history(m),
    }


def _val_logloss(m: Dict[str, Any]) -> str:
    """``picked / lowest (epoch)`` validation logloss over the run's epochs; empty without ``metrics.jsonl``."""
    epochs = m.get("epochs")
    if not epochs:
        return ""
    low = min(epochs, key=lambda e: e["val"]["logloss"])
    return f"{m['val']['logloss']:.3f} / {low['val']['logloss']:.3f} ({low['epoch']})"


def _num(value: Optional[float], fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _mean_std(values: Sequence[Optional[float]], fmt: str) -> str:
    """``mean ± std`` (ddof 1) of ``values``; empty if any is missing."""
    if any(v is None for v in values):
        return ""
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _served_from_history(m: Dict[str, Any]) -> Optional[float]:
    groups = m.get("gate_profile", {}).get("history_length")
    if not groups:
        return None
    rows = sum(g["rows"] for g in groups)
    return sum(g["rows"] * g["from_history"] for g in groups) / rows


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
