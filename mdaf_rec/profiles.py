"""Fixed-size summaries of a final scoring pass: the reliability table and MDAF's gate by user group.

* **Reliability**: the predictions cut into :data:`RELIABILITY_BINS` equal-width probability bins; per bin the
  rows, the mean prediction and the observed click rate (a calibrated model has both equal in every bin;
  a logloss blow-up shows as confident bins whose observed rate is far from their mean prediction).
* **Gate profile** (MDAF models): the fusion gate (1 = static branch, 0 = sequential) summarised per group of
  *history length* (the sample's history entries, after ``features.max_history``) and of *user activity* (the
  user's rows in the training split; 0 = a user unseen in training). Groups are powers of two: ``0``, ``1``,
  ``2–3``, ``4–7``, ... up to ``≥ 2^(GROUPS-2)``. Per group: rows, gate mean and std, and the share of rows
  served mostly from history (``g < 0.5``).

Both are sums in small ``float64`` tensors (``[10, 3]`` and ``[2, GROUPS, 4]``), all-reduced once over the
ranks, so the cost is one pass of cheap tensor ops per batch whatever the split's size. The user activity
needs one DuckDB ``GROUP BY`` over the training split's user column, restricted to the users of the scored
split (:func:`user_activity`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import duckdb
import numpy as np
import torch
import torch.distributed as dist

from mdaf_rec.data.dataset import DatasetError

RELIABILITY_BINS = 10
GROUPS = 9  # 0, 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64-127, >= 128
GATE_AXES = ("history_length", "user_activity")


def power_of_two_group(counts: torch.Tensor, groups: int = GROUPS) -> torch.Tensor:
    """Group index of each non-negative count ``[n]``: 0 for 0, ``1 + floor(log2 c)`` above, capped at ``groups - 1``
    (no host sync: ``frexp``'s exponent of ``c = m·2^e``, ``m`` in [0.5, 1), is ``1 + floor(log2 c)``)."""
    counts = counts.to(torch.int64).clamp(min=0)
    exponent = torch.frexp(counts.clamp(min=1).to(torch.float64))[1].to(torch.int64)
    return torch.where(counts > 0, exponent, torch.zeros_like(counts)).clamp(max=groups - 1)


def group_labels(groups: int = GROUPS) -> List[str]:
    """``["0", "1", "2–3", "4–7", ..., "≥128"]`` for :func:`power_of_two_group`'s indices."""
    labels = ["0", "1"]
    for k in range(1, groups - 2):
        labels.append(f"{2 ** k}–{2 ** (k + 1) - 1}")
    labels.append(f"≥{2 ** (groups - 2)}")
    return labels[:groups]


def user_activity(train_files: Sequence[Path], scored_files: Sequence[Path], column: str) -> Tuple[np.ndarray, np.ndarray]:
    """Rows per user in the training split, for the users of the scored split.

    Args:
        train_files: the training split's Parquet files.
        scored_files: the scored split's Parquet files (only their users are counted).
        column: the user column (``user_id``).
    Returns:
        ``(ids, rows)``: sorted int64 raw user ids and their int64 training rows (users of the scored split
        absent from training are not listed: they have 0).
    """
    ident = '"' + column.replace('"', '""') + '"'
    query = (f"SELECT CAST({ident} AS BIGINT) AS id, count(*) AS n FROM read_parquet($train) "
             f"WHERE {ident} IN (SELECT {ident} FROM read_parquet($scored)) GROUP BY id ORDER BY id")
    with duckdb.connect() as con:
        try:
            table = con.execute(query, {"train": [str(f) for f in train_files],
                                        "scored": [str(f) for f in scored_files]}).fetch_arrow_table()
        except duckdb.Error as e:
            reason = " ".join(str(e).split())
            raise DatasetError(f"{', '.join(map(str, train_files))}: counting the rows per {column!r} failed ({reason})") from None
    return (table.column("id").to_numpy().astype(np.int64, copy=False),
            table.column("n").to_numpy().astype(np.int64, copy=False))


class FinalProfile:
    """Accumulates the reliability table and, when gates are given, the gate profile of one scoring pass.

    Args:
        activity: :func:`user_activity`'s ``(ids, rows)``, or ``None`` when the data has no user column
            (the ``user_activity`` axis is then left out).
        device: where the sums live (the batches' device).
    """

    def __init__(self, activity: Optional[Tuple[np.ndarray, np.ndarray]], device: torch.device) -> None:
        self.device = device
        self.reliability = torch.zeros(RELIABILITY_BINS, 3, dtype=torch.float64, device=device)  # rows, Σp, Σy
        self.gate = torch.zeros(len(GATE_AXES), GROUPS, 4, dtype=torch.float64, device=device)  # rows, Σg, Σg², Σ[g<½]
        self.has_gate = False
        self.activity = None
        if activity is not None:
            ids, rows = activity
            self.activity = (torch.as_tensor(ids, device=device), torch.as_tensor(rows, device=device))

    def update(self, probs: torch.Tensor, labels: torch.Tensor, gate: Optional[torch.Tensor],
               history_length: Optional[torch.Tensor], user_id: torch.Tensor) -> None:
        """
        Args:
            probs: ``[B]`` click probabilities.
            labels: ``[B]`` labels in {0, 1}.
            gate: ``[B, 1 | D]`` fusion gate (a vector gate counts by its mean over ``D``), or ``None``.
            history_length: ``[B]`` history entries of each sample (read only with a gate).
            user_id: ``[B]`` raw user ids.
        """
        probs = probs.detach().to(torch.float64).reshape(-1)
        bins = (probs * RELIABILITY_BINS).to(torch.int64).clamp(0, RELIABILITY_BINS - 1)
        rows = torch.stack([torch.ones_like(probs), probs, labels.to(torch.float64).reshape(-1)], dim=1)  # [B, 3]
        self.reliability.index_add_(0, bins, rows)
        if gate is None or history_length is None:
            return
        self.has_gate = True
        g = gate.detach().to(torch.float64).mean(dim=1)  # [B]
        values = torch.stack([torch.ones_like(g), g, g * g, (g < 0.5).to(torch.float64)], dim=1)  # [B, 4]
        self.gate[0].index_add_(0, power_of_two_group(history_length), values)
        if self.activity is not None:
            self.gate[1].index_add_(0, power_of_two_group(self._training_rows(user_id)), values)

    def _training_rows(self, user_id: torch.Tensor) -> torch.Tensor:
        """``[B]`` training rows of each raw user id (0 for users unseen in training)."""
        ids, rows = self.activity
        if ids.numel() == 0:
            return torch.zeros_like(user_id)
        pos = torch.searchsorted(ids, user_id).clamp(max=ids.numel() - 1)
        return torch.where(ids[pos] == user_id, rows[pos], torch.zeros_like(user_id))

    def compute(self, process_group: Optional[dist.ProcessGroup] = None) -> Dict[str, Any]:
        """Sums over the ranks (when a process group is initialised) and the summaries.

        Returns:
            ``{"reliability": [{"bin": "0.9–1.0", "rows", "mean_pred", "observed"}, ...]}`` (empty bins left
            out) and, with gates, ``"gate_profile": {axis: [{"group", "rows", "mean", "std", "from_history"},
            ...]}`` for each axis of :data:`GATE_AXES` that was measured (empty groups left out).
        """
        sums = torch.cat([self.reliability.reshape(-1), self.gate.reshape(-1),
                          torch.tensor([float(self.has_gate)], dtype=torch.float64, device=self.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=process_group)
        sums = sums.cpu()
        reliability = sums[: self.reliability.numel()].reshape(self.reliability.shape)
        gate = sums[self.reliability.numel(): -1].reshape(self.gate.shape)
        out: Dict[str, Any] = {"reliability": [
            {"bin": f"{i / RELIABILITY_BINS:.1f}–{(i + 1) / RELIABILITY_BINS:.1f}", "rows": int(n),
             "mean_pred": float(p / n), "observed": float(y / n)}
            for i, (n, p, y) in enumerate(reliability.tolist()) if n > 0
        ]}
        if sums[-1] > 0:
            labels = group_labels()
            axes = GATE_AXES if self.activity is not None else GATE_AXES[:1]
            out["gate_profile"] = {
                axis: [
                    {"group": labels[i], "rows": int(n), "mean": float(s / n),
                     "std": float(max(s2 / n - (s / n) ** 2, 0.0) ** 0.5), "from_history": float(h / n)}
                    for i, (n, s, s2, h) in enumerate(gate[a].tolist()) if n > 0
                ]
                for a, axis in enumerate(axes)
            }
        return out
