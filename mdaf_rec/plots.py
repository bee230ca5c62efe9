"""PNG figures of training curves, of the MDAF fusion gate and of planner sweeps, drawn with matplotlib's
Agg canvas.

Figures are built as :class:`matplotlib.figure.Figure` objects on a ``FigureCanvasAgg`` rather than
through ``pyplot``, so nothing here changes the global backend or keeps figures alive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = Tuple[List[float], List[float]]


def read_metrics_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records of a metrics JSONL file (one dict per non-blank line)."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: Sequence[Dict[str, Any]], key: str, section: Optional[str] = None) -> Series:
    """``(epochs, values)`` of ``record[section][key]`` (or ``record[key]``) where present."""
    xs: List[float] = []
    ys: List[float] = []
    for record in records:
        source = record.get(section) if section else record
        if isinstance(source, dict) and source.get(key) is not None and "epoch" in record:
            xs.append(float(record["epoch"]))
            ys.append(float(source[key]))
    return xs, ys


def _save(fig: Figure, out_png: Path) -> Path:
    """Writes ``fig`` to ``out_png`` (creating its folder) and returns the path."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=100)
    return out_png


def plot_training_curves(metrics_jsonl: Path, out_png: Path, title: Optional[str] = None) -> Path:
    """Train loss and validation metrics against the epoch, in three panels.

    Each line of ``metrics_jsonl`` is a dict such as ``{"epoch": 1, "step": 120, "train_loss": 0.51,
    "val": {"auc": 0.7, "logloss": 0.5, "gauc": 0.68, "calibration": 1.01}}``; missing keys are skipped.
    Panels: (1) train loss and val log loss, (2) val AUC and GAUC, (3) val calibration (ideal 1).

    Args:
        metrics_jsonl: the metrics log.
        out_png: the PNG to write.
        title: the figure title (default: the log's file name).

    Returns:
        ``out_png``.
    """
    records = read_metrics_jsonl(metrics_jsonl)
    if not records:
        raise ValueError(f"no records in {metrics_jsonl}")
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss_ax, rank_ax, calib_ax = fig.subplots(1, 3)
    panels = [
        (loss_ax, "log loss", [("train loss", "train_loss", None), ("val log loss", "logloss", "val")]),
        (rank_ax, "AUC", [("val AUC", "auc", "val"), ("val GAUC", "gauc", "val")]),
        (calib_ax, "predicted CTR / observed CTR", [("val calibration", "calibration", "val")]),
    ]
    for ax, ylabel, lines in panels:
        for label, key, section in lines:
            xs, ys = _series(records, key, section)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    calib_ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    fig.suptitle(title or f"Training curves ({Path(metrics_jsonl).name})")
    return _save(fig, out_png)


def plot_gate_histogram(gate: Dict[str, Any], out_png: Path, title: str) -> Path:
    """Bar chart of a gate histogram with its mean marked.

    Args:
        gate: the ``gate`` dict of :meth:`mdaf_rec.metrics.MetricAccumulator.compute`: ``mean``, ``std``
            and ``histogram`` = ``{"edges": [21 floats], "counts": [20 ints]}``.
        out_png: the PNG to write.
        title: the figure title.

    Returns:
        ``out_png``.
    """
    edges = gate["histogram"]["edges"]
    counts = gate["histogram"]["counts"]
    if len(edges) != len(counts) + 1:
        raise ValueError(f"histogram has {len(edges)} edges for {len(counts)} counts")
    widths = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="black", alpha=0.8)
    ax.axvline(gate["mean"], color="red", linestyle="--", label=f"mean {gate['mean']:.3f} (std {gate['std']:.3f})")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("gate value (≈1: static branch, ≈0: sequential branch)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    return _save(fig, out_png)


def plot_gate_profile(profile: Dict[str, Any], out_png: Path, title: str) -> Path:
    """The fusion gate per group of history length and of user activity: one panel per axis, the gate mean
    ± std per group (left axis) and the share of rows served mostly from history (``g < 0.5``, right axis),
    each group's rows under its label.

    Args:
        profile: the ``gate_profile`` dict of :meth:`mdaf_rec.profiles.FinalProfile.compute`: axis name
            (``history_length``, ``user_activity``) -> list of ``{"group", "rows", "mean", "std", "from_history"}``.
        out_png: the PNG to write.
        title: the figure title.

    Returns:
        ``out_png``.
    """
    axes_titles = {"history_length": "history length (entries)",
                   "user_activity": "user activity (the user's training rows; 0 = unseen)"}
    if not profile:
        raise ValueError("empty gate profile")
    fig = Figure(figsize=(6.5 * len(profile), 4.5), layout="constrained")
    panels = fig.subplots(1, len(profile), squeeze=False)[0]
    for ax, (axis, groups) in zip(panels, profile.items()):
        xs = list(range(len(groups)))
        ax.errorbar(xs, [g["mean"] for g in groups], yerr=[g["std"] for g in groups], marker="o", capsize=3,
                    label="gate mean ± std")
        ax.set_ylim(0, 1)
        ax.set_ylabel("gate (≈1: static branch, ≈0: sequential branch)")
        ax.set_xticks(xs, [f"{g['group']}\n{g['rows']:,} rows" for g in groups], fontsize=8)
        ax.set_xlabel(axes_titles.get(axis, axis))
        ax.grid(alpha=0.3)
        share = ax.twinx()
        share.bar(xs, [g["from_history"] for g in groups], alpha=0.25, color="tab:green",
                  label="share served from history (g < 0.5)")
        share.set_ylim(0, 1)
        share.set_ylabel("share of rows with g < 0.5")
        ax.set_zorder(share.get_zorder() + 1)  # the gate line over the bars
        ax.patch.set_visible(False)
        lines, names = ax.get_legend_handles_labels()
        bars, bar_names = share.get_legend_handles_labels()
        ax.legend(lines + bars, names + bar_names, fontsize=8, loc="upper left")
    fig.suptitle(title)
    return _save(fig, out_png)


def plot_sweep(rows: Sequence[Dict[str, Any]], out_png: Path, title: str) -> Path:
    """Two panels (max per-rank memory, estimated step time) against the world size; one line per
    sharding choice, infeasible points as crosses on the axis floor.

    Args:
        rows: the rows of :func:`mdaf_rec.planning.sweep` (``world_size``, ``choice``, ``feasible``,
            ``max_rank_memory_gb``, ``step_ms``).
        out_png: the PNG to write.
        title: the figure title.

    Returns:
        ``out_png``.
    """
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "max_rank_memory_gb", "largest per-rank memory (GB)"),
                           (axes[1], "step_ms", "estimated embedding step (ms)")):
        feasible_values = [float(r[key]) for r in rows if r["feasible"]]
        floor = min(feasible_values) / 2 if feasible_values else 1.0
        for choice in dict.fromkeys(r["choice"] for r in rows):
            mine = [r for r in rows if r["choice"] == choice]
            ok = [r for r in mine if r["feasible"]]
            line, = ax.plot([r["world_size"] for r in ok], [float(r[key]) for r in ok], marker="o", label=choice)
            bad = [r["world_size"] for r in mine if not r["feasible"]]
            if bad:
                ax.scatter(bad, [floor] * len(bad), marker="x", color=line.get_color(), s=60)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("world size (ranks)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(title="sharding (x = infeasible)", fontsize=8)
    fig.suptitle(title)
    return _save(fig, out_png)
