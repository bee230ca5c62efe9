"""PNG figures of training curves and of the MDAF fusion gate, drawn with matplotlib's Agg canvas.

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
