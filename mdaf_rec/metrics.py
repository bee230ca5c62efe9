"""Exact CTR evaluation metrics, aggregated across ``torch.distributed`` ranks (``eval.metrics: exact``; the
streaming ones of :mod:`mdaf_rec.streaming_metrics` return the same dict through :func:`summarize`).

:class:`MetricAccumulator` stores every prediction of an evaluation pass on the device it was scored
on (``float64`` probabilities, labels and per-sample gate means, ``int64`` user indices: 32 bytes a row,
about 100 MB for three million rows; ``update`` never waits for the device) and computes the metrics
exactly on the full set. Evaluation sets here are at
most a few million rows, so keeping the predictions is cheaper and simpler than binned approximations
and it makes AUC and GAUC exact. At ``compute`` time every rank briefly holds all ranks' rows.

Aggregation over ranks (:meth:`MetricAccumulator.compute`): every rank all-gathers the row counts, then
all-gathers its rows padded to the largest count (``dist.all_gather`` of tensors, for unequal row
counts, including empty ranks), and computes the metrics from the concatenation. The gathered tensors
live where the group's backend takes them (:func:`mdaf_rec.distributed.collective_device`): the rows'
own device when the backend handles it (CUDA rows through NCCL, CPU rows through Gloo), else the
backend's device. Every metric is independent of the row order, so all
ranks return the same numbers, equal to those of one process holding all the data, whatever the rank
order:

* AUC and GAUC count pairs with exact ``int64`` arithmetic over sorted unique values;
* sums of floats (log loss, predicted CTR, gate mean / std) use :func:`math.fsum`, which is correctly
  rounded and therefore independent of the summation order;
* histogram counts are integers.

Metrics (``compute`` returns a dict of plain Python numbers, JSON-serialisable; a metric that is not
defined on the rows is ``None``, and ``not_computable`` maps it to the reason, e.g.
``{"auc": "one class only: 0 of 120 rows have label 1"}``; the functions below return ``nan`` then):

* ``auc``: ROC AUC = Mann-Whitney U / (P * N); a tie between a positive and a negative counts 1/2
  (the average-rank definition). Not computable when all labels are one class.
* ``gauc``: per-user AUC weighted by the user's impression count, over users having both a positive
  and a negative (the DIN definition). Not computable when no user qualifies.
* ``logloss``: mean binary cross-entropy with probabilities clipped to ``[1e-7, 1 - 1e-7]`` (so a
  confident mistake costs at most ``-log(1e-7) ~= 16.1``).
* ``ne``: normalized entropy (TorchRec's headline metric, He et al. 2014) = ``logloss`` / the entropy of
  the observed CTR, ``-(ctr·log ctr + (1-ctr)·log(1-ctr))``: the log loss relative to always predicting
  the base rate (below 1 = better than that). Not computable when all labels are one class.
* ``ctr`` (observed), ``pred_ctr`` (mean prediction), ``calibration`` = ``pred_ctr / ctr`` (not
  computable with no positive), ``count`` (rows). With no rows, only ``count`` (0) is computable.
* ``auc_error_bound``: the largest possible difference between ``auc`` and the exact AUC (0 here; the
  streaming AUC's bound otherwise).
* ``gate`` (only when gates were given): ``mean``, ``std`` (population, ``ddof=0``) and ``histogram``
  (``edges``: 21 edges over ``[0, 1]``, ``counts``: 20 bin counts; values are clipped to ``[0, 1]``).
  A vector gate ``[B, D]`` is summarised by its per-sample mean over the ``D`` dims; 1 = static
  branch, 0 = sequential branch.

Labels must be binary (0/1) and probabilities finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from mdaf_rec.distributed import collective_device

ArrayLike = Union[torch.Tensor, np.ndarray]

LOGLOSS_EPS = 1e-7
GATE_HISTOGRAM_BINS = 20


def _as_numpy(x: ArrayLike, dtype: np.dtype) -> np.ndarray:
    """A flat ``dtype`` numpy copy/view of a tensor or array ``[...]`` -> ``[n]``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _positive_mask(labels: np.ndarray) -> np.ndarray:
    """``[n]`` bool: ``labels > 0.5`` (labels are 0/1)."""
    return labels > 0.5


def _auc_from_runs(pos: np.ndarray, neg: np.ndarray, starts: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Doubled Mann-Whitney U per segment, from per-value counts sorted by (segment, value).

    Args:
        pos, neg: ``[R]`` int64 positives / negatives per run of equal (segment, value), ascending.
        starts: ``[S]`` index of each segment's first run.

    Returns:
        ``(u2, p, n)``, each ``[S]`` int64: ``2 * U`` (pairs ranked right count 2, ties 1), positives,
        negatives per segment.
    """
    neg_before = np.cumsum(neg) - neg  # negatives in earlier runs, across segments
    neg_before -= np.repeat(neg_before[starts], np.diff(np.append(starts, len(neg))))
    u2 = np.add.reduceat(2 * neg_before * pos + pos * neg, starts)
    return u2, np.add.reduceat(pos, starts), np.add.reduceat(neg, starts)


def _run_counts(is_pos: np.ndarray, new_run: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``[R]`` positives and negatives per run, from sorted ``[n]`` labels and run-start flags."""
    run_id = np.cumsum(new_run) - 1
    n_runs = int(run_id[-1]) + 1
    pos = np.bincount(run_id[is_pos], minlength=n_runs).astype(np.int64)
    neg = np.bincount(run_id, minlength=n_runs).astype(np.int64) - pos
    return pos, neg


def auc_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Exact ROC AUC (Mann-Whitney; a positive-negative tie counts 1/2).

    Args:
        probs: ``[n]`` scores (any monotone score works, e.g. logits).
        labels: ``[n]`` 0/1 labels.

    Returns:
        The AUC, or ``nan`` when there is no positive or no negative.
    """
    u2, pairs2 = _auc_u2(_as_numpy(probs, np.float64), _positive_mask(_as_numpy(labels, np.float64)))
    return _ratio(u2, pairs2)


def _auc_u2(p: np.ndarray, is_pos: np.ndarray) -> Tuple[int, int]:
    """``(2 U, 2 P N)`` of scores ``p`` ``[n]`` and bool labels ``is_pos`` ``[n]`` (exact integers)."""
    if p.size == 0:
        return 0, 0
    order = np.argsort(p, kind="stable")
    p, is_pos = p[order], is_pos[order]
    new_run = np.empty(p.size, dtype=bool)
    new_run[0], new_run[1:] = True, p[1:] != p[:-1]
    pos, neg = _run_counts(is_pos, new_run)
    u2, n_pos, n_neg = _auc_from_runs(pos, neg, np.zeros(1, dtype=np.int64))
    return int(u2[0]), 2 * int(n_pos[0]) * int(n_neg[0])


def gauc_score(probs: ArrayLike, labels: ArrayLike, groups: ArrayLike) -> float:
    """Group AUC (DIN): per-group AUC weighted by the group's row count.

    Groups with only one class are excluded (from the weights as well). Vectorised: rows are sorted by
    ``(group, prob)`` with ``np.lexsort`` and each group's U statistic comes from its runs of equal
    probability, so there is no Python loop over groups.

    Args:
        probs: ``[n]`` scores.
        labels: ``[n]`` 0/1 labels.
        groups: ``[n]`` int64 group ids (user indices).

    Returns:
        The GAUC, or ``nan`` when no group has both a positive and a negative.
    """
    p = _as_numpy(probs, np.float64)
    is_pos = _positive_mask(_as_numpy(labels, np.float64))
    g = _as_numpy(groups, np.int64)
    order = np.lexsort((p, g))
    weighted, weight = gauc_sums(g[order], p[order], is_pos[order])
    return _ratio(weighted, weight)


def gauc_sums(groups: np.ndarray, values: np.ndarray, is_pos: np.ndarray) -> Tuple[float, int]:
    """``(sum of weight x AUC, sum of weight)`` over the groups having both classes (weight: the group's rows).

    Args:
        groups: ``[n]`` group ids, sorted ascending.
        values: ``[n]`` scores (any type with ``!=``), ascending within each group.
        is_pos: ``[n]`` bool labels in the same order.
    """
    if groups.size == 0:
        return 0.0, 0
    new_group = np.empty(groups.size, dtype=bool)
    new_group[0], new_group[1:] = True, groups[1:] != groups[:-1]
    new_run = new_group.copy()
    new_run[1:] |= values[1:] != values[:-1]
    pos, neg = _run_counts(is_pos, new_run)
    starts = np.flatnonzero(new_group[new_run])  # first run of each group
    u2, n_pos, n_neg = _auc_from_runs(pos, neg, starts)
    ok = (n_pos > 0) & (n_neg > 0)
    weight = (n_pos + n_neg)[ok]
    per_group = u2[ok] / (2.0 * n_pos[ok] * n_neg[ok])
    return math.fsum(weight * per_group), int(weight.sum())


def logloss_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean binary cross-entropy, probabilities clipped to ``[1e-7, 1 - 1e-7]``; ``nan`` when empty.

    Args:
        probs: ``[n]`` click probabilities.
        labels: ``[n]`` 0/1 labels.
    """
    p = _as_numpy(probs, np.float64)
    return _ratio(_logloss_sum(p, _positive_mask(_as_numpy(labels, np.float64))), p.size)


def _logloss_sum(p: np.ndarray, is_pos: np.ndarray) -> float:
    """Correctly rounded sum of the clipped binary cross-entropies of ``[n]`` probabilities and bool labels."""
    p = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return -math.fsum(np.where(is_pos, np.log(p), np.log1p(-p)))


def normalized_entropy(logloss: float, ctr: float) -> float:
    """``logloss`` divided by the entropy of a Bernoulli(``ctr``) (the log loss of predicting ``ctr`` for every
    row); ``nan`` when ``ctr`` is 0, 1 or undefined."""
    if not 0.0 < ctr < 1.0:
        return float("nan")
    return logloss / -(ctr * math.log(ctr) + (1.0 - ctr) * math.log1p(-ctr))


def gate_summary(gate_means: ArrayLike) -> Dict[str, Any]:
    """Mean, population std and a 20-bin histogram over ``[0, 1]`` of per-sample gate values ``[n]``."""
    x = np.clip(_as_numpy(gate_means, np.float64), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, GATE_HISTOGRAM_BINS + 1)
    counts, _ = np.histogram(x, bins=edges)
    mean = math.fsum(x) / x.size if x.size else float("nan")
    std = math.sqrt(math.fsum((x - mean) ** 2) / x.size) if x.size else float("nan")
    return {
        "mean": mean,
        "std": std,
        "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts]},
    }


def _ratio(num: float, den: float) -> float:
    """``num / den``, or ``nan`` when ``den`` is 0 (the metric is not computable on these rows)."""
    return num / den if den else float("nan")


@dataclass
class MetricSums:
    """What every headline metric is computed from, whichever way it was gathered (exact or streaming).

    ``auc_u2`` / ``auc_pairs2``: twice the Mann-Whitney U and twice ``P * N``; ``gauc_weighted`` /
    ``gauc_weight``: :func:`gauc_sums` over all users; ``auc_error_bound``: the largest possible
    ``|auc - exact auc|`` (0 when the AUC is exact).
    """

    count: int
    positives: int
    prob_sum: float
    logloss_sum: float
    auc_u2: float
    auc_pairs2: float
    gauc_weighted: float
    gauc_weight: int
    auc_error_bound: float = 0.0


def summarize(sums: MetricSums, gate: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The metrics dict of the module docstring from :class:`MetricSums` (and a :func:`gate_summary`); the
    one place that decides which metrics are not computable on a set of rows (``None``, with the reason under
    ``not_computable``)."""
    n = sums.count
    ctr = _ratio(sums.positives, n)
    logloss = _ratio(sums.logloss_sum, n)
    out: Dict[str, Any] = {
        "auc": _ratio(sums.auc_u2, sums.auc_pairs2),
        "gauc": _ratio(sums.gauc_weighted, sums.gauc_weight),
        "logloss": logloss,
        "ne": normalized_entropy(logloss, ctr),
        "calibration": _ratio(sums.prob_sum, sums.positives),
        "ctr": ctr,
        "pred_ctr": _ratio(sums.prob_sum, n),
        "count": n,
        "auc_error_bound": sums.auc_error_bound,
    }
    if gate is not None:
        out["gate"] = gate
    reasons = {k: _why_not_computable(k, n, sums.positives) for k, v in out.items() if _is_nan(v)}
    if reasons:
        out.update({k: None for k in reasons}, not_computable=reasons)
    return out


def compute_metrics(
    probs: ArrayLike, labels: ArrayLike, groups: ArrayLike, gate_means: Optional[ArrayLike] = None
) -> Dict[str, Any]:
    """All metrics of the module docstring for one full evaluation set (no communication), exactly.

    Args:
        probs: ``[n]`` click probabilities.
        labels: ``[n]`` 0/1 labels.
        groups: ``[n]`` int64 user indices.
        gate_means: ``[n]`` per-sample gate values, or ``None`` (then no ``gate`` key).
    """
    p = _as_numpy(probs, np.float64)
    y = _as_numpy(labels, np.float64)
    is_pos = _positive_mask(y)
    g = _as_numpy(groups, np.int64)
    order = np.lexsort((p, g))
    weighted, weight = gauc_sums(g[order], p[order], is_pos[order])
    u2, pairs2 = _auc_u2(p, is_pos)
    sums = MetricSums(
        count=int(p.size),
        positives=int(is_pos.sum()),
        prob_sum=math.fsum(p),
        logloss_sum=_logloss_sum(p, is_pos),
        auc_u2=u2,
        auc_pairs2=pairs2,
        gauc_weighted=weighted,
        gauc_weight=weight,
    )
    return summarize(sums, gate_summary(gate_means) if gate_means is not None else None)


def check_update(
    probs: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    gate: Optional[torch.Tensor],
    *,
    first: bool,
    had_gate: bool,
) -> None:
    """Raises ``ValueError`` unless one batch's tensors have the shapes and the device an accumulator's
    ``update`` takes (``first``: no batch yet; ``had_gate``: the earlier batches had gates). No host sync."""
    b = probs.shape[0]
    if probs.dim() != 1 or labels.shape != (b,) or groups.shape != (b,):
        raise ValueError(
            f"expected probs/labels/groups of shape [B]; got {tuple(probs.shape)}, "
            f"{tuple(labels.shape)}, {tuple(groups.shape)}"
        )
    if not first and (gate is not None) != had_gate:
        raise ValueError("either every update() passes a gate or none does")
    if gate is not None and (gate.dim() != 2 or gate.shape[0] != b):
        raise ValueError(f"expected gate of shape [B, 1] or [B, D]; got {tuple(gate.shape)}")
    device = probs.device
    if any(t.device != device for t in (labels, groups, gate) if t is not None):
        raise ValueError("probs, labels, groups and gate must be on one device")


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _why_not_computable(metric: str, rows: int, positives: int) -> str:
    """Why ``metric`` is undefined on ``rows`` rows with ``positives`` label-1 rows (one short phrase)."""
    if rows == 0:
        return "no rows"
    if positives in (0, rows):
        return f"one class only: {positives} of {rows} rows have label 1"
    return "no user has both a positive and a negative"  # gauc: the only other undefined case


def format_metric(metrics: Mapping[str, Any], key: str, digits: int = 4) -> str:
    """``metrics[key]`` with ``digits`` decimals, or ``n/a (reason)`` when it is not computable."""
    value = metrics.get(key)
    if value is None:
        return f"n/a ({metrics.get('not_computable', {}).get(key, 'missing')})"
    return f"{value:.{digits}f}"


class MetricAccumulator:
    """Collects an evaluation pass's predictions and computes exact metrics over all ranks.

    Rows stay on the device they are given on (hand it the model's outputs as they are: on a GPU,
    :meth:`update` queues device work only, with no device-to-host copy or sync); :meth:`compute`
    checks the labels and moves everything to the host once. Memory: 32 bytes per row (``float64``
    prob, label and gate mean, ``int64`` user index); a few million rows is a few hundred MB at most.
    Call :meth:`compute` on every rank of the group (it is collective), then :meth:`reset` before the
    next pass.
    """

    def __init__(self) -> None:
        self._probs: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._groups: List[torch.Tensor] = []
        self._gates: List[torch.Tensor] = []

    def reset(self) -> None:
        """Drops all stored rows."""
        for chunks in (self._probs, self._labels, self._groups, self._gates):
            chunks.clear()

    def update(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        gate: Optional[torch.Tensor] = None,
    ) -> None:
        """Stores one batch (on the batch's device; all four tensors must share it).

        Args:
            probs: ``[B]`` click probabilities (any float dtype).
            labels: ``[B]`` 0/1 labels.
            groups: ``[B]`` int64 user indices (for GAUC).
            gate: ``[B, 1]`` or ``[B, D]`` fusion gate, or ``None``; a vector gate is stored as its
                per-sample mean over ``D``. Either every batch has a gate or none has.
        """
        check_update(probs, labels, groups, gate, first=not self._probs, had_gate=bool(self._gates))
        self._probs.append(probs.detach().to(torch.float64))
        self._labels.append(labels.detach().to(torch.float64))
        self._groups.append(groups.detach().to(torch.int64))
        if gate is not None:
            self._gates.append(gate.detach().to(torch.float64).mean(dim=1))

    def _local_rows(self) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """``([n, 3]`` float64 (prob, label, gate mean or 0), ``[n]`` int64 groups, has gate), on the
        device the rows were stored on (the CPU when there are none); raises unless labels are 0/1."""
        if not self._probs:
            return torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.int64), False
        probs, labels = torch.cat(self._probs), torch.cat(self._labels)
        if not bool(((labels == 0) | (labels == 1)).all()):  # one host sync per evaluation pass
            raise ValueError("labels must be 0 or 1")
        gates = torch.cat(self._gates) if self._gates else torch.zeros_like(probs)
        return torch.stack([probs, labels, gates], dim=1), torch.cat(self._groups), bool(self._gates)

    def compute(self, process_group: Optional[dist.ProcessGroup] = None) -> Dict[str, Any]:
        """Metrics over the rows of every rank (collective when ``torch.distributed`` is initialised).

        Args:
            process_group: the group to aggregate over (default: the world); ignored when
                ``torch.distributed`` is not initialised.

        Returns:
            The dict described in the module docstring, identical on every rank.
        """
        rows, groups, has_gate = self._local_rows()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            rows, groups, has_gate = _all_gather_rows(rows, groups, has_gate, process_group)
        return compute_metrics(rows[:, 0], rows[:, 1], groups, rows[:, 2] if has_gate else None)


def _all_gather_rows(
    rows: torch.Tensor, groups: torch.Tensor, has_gate: bool, process_group: Optional[dist.ProcessGroup]
) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """All-gathers every rank's rows, padded to the largest count then trimmed.

    Args:
        rows: ``[n_r, 3]`` float64 local rows; groups: ``[n_r]`` int64; has_gate: local rows carry gates.

    Returns:
        ``([sum n_r, 3]`` rows, ``[sum n_r]`` groups, has gate) on the CPU, ranks in rank order.
    """
    device = collective_device(process_group, preferred=rows.device)
    world = dist.get_world_size(process_group)
    meta = torch.tensor([rows.shape[0], int(has_gate)], dtype=torch.int64, device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=process_group)
    counts, flags = torch.stack(metas).cpu().unbind(dim=1)
    gated = {bool(f) for c, f in zip(counts.tolist(), flags.tolist()) if c > 0}
    if len(gated) > 1:
        raise ValueError("some ranks passed gates to MetricAccumulator.update() and others did not")
    size = int(counts.max())
    if size == 0:
        return rows, groups, False
    padded_rows = torch.zeros(size, 3, dtype=torch.float64, device=device)
    padded_rows[: rows.shape[0]] = rows.to(device)
    padded_groups = torch.zeros(size, dtype=torch.int64, device=device)
    padded_groups[: groups.shape[0]] = groups.to(device)
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    all_groups = [torch.empty_like(padded_groups) for _ in range(world)]
    dist.all_gather(all_rows, padded_rows, group=process_group)
    dist.all_gather(all_groups, padded_groups, group=process_group)
    n = counts.tolist()
    return (
        torch.cat([r[:k].cpu() for r, k in zip(all_rows, n)]),
        torch.cat([g[:k].cpu() for g, k in zip(all_groups, n)]),
        gated == {True},
    )
