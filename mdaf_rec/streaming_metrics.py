"""Streaming CTR evaluation: the metrics of :mod:`mdaf_rec.metrics` with memory that does not grow with the split
on any one rank, combined over ranks with a few collectives of fixed size.

:class:`StreamingMetricAccumulator` has :class:`~mdaf_rec.metrics.MetricAccumulator`'s interface (``update`` per
batch, queueing device work only; collective ``compute``; ``reset``) and returns the same dict. Per batch it adds
to fixed-size tensors on the batch's device:

* sums (float64): rows, positives, predicted probabilities, clipped log losses, gate values and their squares
  -> ``logloss``, ``ne``, ``ctr``, ``pred_ctr``, ``calibration`` and the gate mean / std are sums, as in the
  exact path; they equal the exact values up to float64 summation order (relative ~1e-15);
* the 20-bin gate histogram (same edges as :func:`~mdaf_rec.metrics.gate_summary`, exactly);
* AUC score histograms: positives and negatives per score bin, and the smallest and largest score seen in
  each bin (``auc_bins`` bins: the first and last catch ``logit < -16`` and ``logit >= 16``, the others
  split ``[-16, 16]`` into equal logit steps; bins are found by ``torch.bucketize`` against their edges in
  probability space, so a higher score never falls in a lower bin);
* for GAUC, two ``int64`` per row: the raw user id (any int64: users are grouped by their raw id, so users
  unseen in training count apart) and ``float32 bits of prob << 1 | label`` (16 bytes a row, kept on the device
  until ``compute``).

``compute``: the GAUC rows are routed to rank ``user % world_size`` (``all_to_all``; every row of a user
lands on one rank), each rank sorts its rows by (user, score) and computes its users' AUCs exactly, a chunk of users at a
time (:func:`~mdaf_rec.metrics.gauc_sums`); then one ``all_reduce`` (SUM) of the sums, histograms and GAUC
sums and one (MAX) of the per-bin score extremes. So GAUC is exact for float32 scores (the model's output;
float64 scores are rounded to float32 first), and each rank holds ``16 x rows / world_size`` bytes plus a
bounded working set, instead of every rank holding every row.

AUC from the histograms (counting a positive-negative pair in one bin as 1/2, as ties are counted) differs
from the exact AUC only through pairs in the same bin whose scores differ; each such pair moves it by at
most ``1 / (2 P N)``. So ``|auc - exact| <= sum over bins holding two distinct scores of pos_b * neg_b /
(2 P N)``: ``auc_error_bound`` in the result, computed from the histograms of the very pass (bins whose
scores are all equal hold exact ties and count 0). At the default 262,144 bins a bin is 1.2e-4 wide in
logit; ``tests/test_streaming_metrics.py`` checks the bound and an error <= 1e-4 against the exact AUC on
real data, and ``docs/benchmarks.md`` has both at 1M-30M rows. More bins make it exact in the limit.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from mdaf_rec.distributed import collective_device
from mdaf_rec.metrics import (
    GATE_HISTOGRAM_BINS,
    LOGLOSS_EPS,
    MetricAccumulator,
    MetricSums,
    check_update,
    gauc_sums,
    summarize,
)

AUC_BINS = 1 << 18
"""Default number of AUC score bins (``eval.auc_bins``)."""
AUC_LOGIT_RANGE = 16.0
"""The bins split logits ``[-16, 16]`` (probabilities ``1.1e-7 .. 1 - 1.1e-7``) evenly; beyond are the end bins."""
GAUC_CHUNK_ROWS = 1 << 20
"""GAUC is computed over at most about this many sorted rows at a time (whole users), bounding its working set."""
# Layout of the SUM vector: these scalars, then the gate histogram, then positives and negatives per AUC bin.
_ROWS, _POSITIVES, _PROB_SUM, _LOGLOSS_SUM, _GATED, _GATE_SUM, _GATE_SQ, _BAD_LABELS, _BAD_PROBS = range(9)
_SCALARS = 9


def auc_bin_edges(bins: int) -> torch.Tensor:
    """``[bins - 1]`` float64 inner edges, strictly increasing, in probability space: ``sigmoid`` of
    ``bins - 1`` even steps over ``[-16, 16]``. Bin ``b`` holds the scores ``edges[b-1] <= p < edges[b]``."""
    if bins < 2:
        raise ValueError(f"auc_bins must be >= 2; got {bins}")
    return torch.sigmoid(torch.linspace(-AUC_LOGIT_RANGE, AUC_LOGIT_RANGE, bins - 1, dtype=torch.float64))


class StreamingMetricAccumulator:
    """Evaluation metrics over all ranks in fixed memory per rank (GAUC: 16 bytes per row of this rank's users).

    Call :meth:`update` per batch (any device; no host sync), :meth:`compute` on every rank of the group
    (collective), :meth:`reset` before the next pass.

    Args:
        auc_bins: AUC score bins (default :data:`AUC_BINS`).
    """

    def __init__(self, auc_bins: int = AUC_BINS) -> None:
        self.auc_bins = auc_bins
        self._edges: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}  # per device: see _bin_edges
        self._sums: Optional[torch.Tensor] = None  # [_SCALARS + gate bins + 2 * auc_bins] float64
        self._extremes: Optional[torch.Tensor] = None  # [2 * auc_bins] float64: per-bin max, then -min
        self._gauc_rows: List[torch.Tensor] = []  # [B, 2] int64: user, prob bits << 1 | label
        self._has_gate: Optional[bool] = None

    def reset(self) -> None:
        """Drops everything accumulated."""
        self._sums = self._extremes = None
        self._gauc_rows.clear()
        self._has_gate = None

    def update(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        gate: Optional[torch.Tensor] = None,
    ) -> None:
        """Adds one batch (see :meth:`mdaf_rec.metrics.MetricAccumulator.update` for the arguments).

        Probabilities must lie in ``[0, 1]`` and labels be 0/1; both are checked at :meth:`compute` (a
        device-side count here, no host sync). ``groups`` are any int64 user ids.
        """
        check_update(probs, labels, groups, gate, first=self._has_gate is None, had_gate=bool(self._has_gate))
        self._has_gate = gate is not None
        device = probs.device
        if self._sums is None:
            self._sums = torch.zeros(_SCALARS + GATE_HISTOGRAM_BINS + 2 * self.auc_bins, dtype=torch.float64,
                                     device=device)
            self._extremes = torch.full((2 * self.auc_bins,), -math.inf, dtype=torch.float64, device=device)
        sums, extremes = self._sums, self._extremes
        p = probs.detach().to(torch.float64)
        y = labels.detach().to(torch.float64)
        pos = y > 0.5
        bad_probs = ~((p >= 0) & (p <= 1))  # NaN too
        clipped = p.clamp(LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
        scalars = [
            torch.ones_like(p),
            y,
            p,
            -torch.where(pos, torch.log(clipped), torch.log1p(-clipped)),
        ]
        if gate is not None:
            g = gate.detach().to(torch.float64).mean(dim=1).clamp(0.0, 1.0)
            scalars += [torch.ones_like(p), g, g * g]
            gate_bin = torch.bucketize(g, self._bin_edges(device)[1], right=True)
            sums[_SCALARS:_SCALARS + GATE_HISTOGRAM_BINS].index_add_(0, gate_bin, torch.ones_like(g))
        else:
            scalars += [torch.zeros_like(p)] * 3
        scalars += [((y != 0) & (y != 1)).to(torch.float64), bad_probs.to(torch.float64)]
        sums[:_SCALARS] += torch.stack(scalars, dim=1).sum(dim=0)
        # AUC histograms: positives in [off, off + bins), negatives in [off + bins, off + 2 bins).
        bin_ = self._auc_bin(p.nan_to_num(0.0).clamp(0.0, 1.0), device)
        off = _SCALARS + GATE_HISTOGRAM_BINS
        sums.index_add_(0, off + bin_ + self.auc_bins * (~pos).long(), torch.ones_like(p))
        extremes.scatter_reduce_(0, torch.cat([bin_, bin_ + self.auc_bins]), torch.cat([p, -p]), "amax")
        # GAUC rows; a bad probability is refused at compute, its row is never used.
        bits = probs.detach().to(torch.float32).clamp(0.0, 1.0).nan_to_num(0.0).view(torch.int32).long()
        self._gauc_rows.append(torch.stack([groups.detach().long(), (bits << 1) | pos.long()], dim=1))

    def _bin_edges(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """On ``device``, made once per device: the AUC bins' edges with ``-inf`` and ``inf`` at the ends (bin
        ``b`` is ``[edges[b], edges[b + 1])``), and the inner edges of the gate histogram
        (:func:`~mdaf_rec.metrics.gate_summary`'s)."""
        if device not in self._edges:
            inf = torch.tensor([math.inf], dtype=torch.float64)
            auc = torch.cat([-inf, auc_bin_edges(self.auc_bins), inf])
            gate = torch.from_numpy(np.linspace(0.0, 1.0, GATE_HISTOGRAM_BINS + 1)[1:-1])
            self._edges[device] = (auc.to(device), gate.to(device))
        return self._edges[device]

    def _auc_bin(self, p: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[B]`` AUC bin of each probability in ``[0, 1]``: exactly ``torch.bucketize(p, inner edges,
        right=True)``, found from the logit by arithmetic and then corrected against the edges (the rounding of
        the arithmetic moves a value by at most one bin; a binary search over 262,144 edges is 5x slower)."""
        edges = self._bin_edges(device)[0]
        step = 2 * AUC_LOGIT_RANGE / (self.auc_bins - 2)
        logit = torch.log(p) - torch.log1p(-p)  # -inf / inf at 0 / 1
        guess = torch.floor((logit + AUC_LOGIT_RANGE) / step + 1).clamp(0, self.auc_bins - 1).long()
        guess -= (p < edges[guess]).long()
        guess += (p >= edges[guess + 1]).long()
        return guess

    def compute(self, process_group: Optional[dist.ProcessGroup] = None) -> Dict[str, Any]:
        """Metrics over the rows of every rank (collective when ``torch.distributed`` is initialised and the
        group has more than one rank); the same dict on every rank, with ``auc_error_bound``."""
        size = _SCALARS + GATE_HISTOGRAM_BINS + 2 * self.auc_bins
        sums = self._sums if self._sums is not None else torch.zeros(size, dtype=torch.float64)
        extremes = (self._extremes if self._extremes is not None
                    else torch.full((2 * self.auc_bins,), -math.inf, dtype=torch.float64))
        rows = (torch.cat(self._gauc_rows) if self._gauc_rows
                else torch.zeros((0, 2), dtype=torch.int64, device=sums.device))
        self._gauc_rows = [rows]  # the batches' pieces are freed (compute may be called again)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        if distributed:
            rows = _route_by_user(rows, process_group)
        weighted, weight = _gauc_of_rows(rows.cpu().numpy())
        del rows
        totals = torch.cat([sums, torch.tensor([weighted, float(weight)], dtype=torch.float64, device=sums.device)])
        if distributed:
            device = collective_device(process_group, preferred=sums.device)
            totals, extremes = totals.to(device), extremes.to(device)
            dist.all_reduce(totals, group=process_group)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=process_group)
        totals, extremes = totals.cpu().numpy(), extremes.cpu().numpy()
        return _metrics(totals, extremes, self.auc_bins)


def _metrics(totals: np.ndarray, extremes: np.ndarray, bins: int) -> Dict[str, Any]:
    """The metrics dict from the reduced SUM vector (plus GAUC sums) and per-bin ``[max, -min]``."""
    if totals[_BAD_LABELS] > 0:
        raise ValueError("labels must be 0 or 1")
    if totals[_BAD_PROBS] > 0:
        raise ValueError("probabilities must be in [0, 1]")
    n, gated = int(totals[_ROWS]), int(totals[_GATED])
    if gated not in (0, n):
        raise ValueError("some ranks passed gates to StreamingMetricAccumulator.update() and others did not")
    off = _SCALARS + GATE_HISTOGRAM_BINS
    pos_hist, neg_hist = totals[off:off + bins], totals[off + bins:off + 2 * bins]
    pos_hist, neg_hist = pos_hist.astype(np.int64), neg_hist.astype(np.int64)  # counts: exact in float64
    positives, negatives = int(pos_hist.sum()), int(neg_hist.sum())
    neg_below = np.cumsum(neg_hist) - neg_hist
    u2 = int(np.sum(2 * neg_below * pos_hist + pos_hist * neg_hist))  # exact int64 below ~4e9 rows
    spread = extremes[:bins] + extremes[bins:] > 0  # max > min: the bin holds two distinct scores
    pairs2 = 2 * positives * negatives
    bound = int(np.sum(pos_hist[spread] * neg_hist[spread])) / pairs2 if pairs2 else 0.0
    sums = MetricSums(
        count=n,
        positives=int(totals[_POSITIVES]),
        prob_sum=float(totals[_PROB_SUM]),
        logloss_sum=float(totals[_LOGLOSS_SUM]),
        auc_u2=u2,
        auc_pairs2=pairs2,
        gauc_weighted=float(totals[-2]),
        gauc_weight=int(totals[-1]),
        auc_error_bound=bound,
    )
    gate = None
    if gated:
        mean = totals[_GATE_SUM] / n
        edges = np.linspace(0.0, 1.0, GATE_HISTOGRAM_BINS + 1)
        gate = {
            "mean": float(mean),
            "std": math.sqrt(max(totals[_GATE_SQ] / n - mean * mean, 0.0)),
            "histogram": {"edges": edges.tolist(),
                          "counts": [int(c) for c in totals[_SCALARS:_SCALARS + GATE_HISTOGRAM_BINS]]},
        }
    return summarize(sums, gate)


def _route_by_user(rows: torch.Tensor, process_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sends every GAUC row of ``rows`` ``[n, 2]`` (user, score word) to rank ``user % world`` (``all_to_all``);
    returns the rows this rank owns."""
    world = dist.get_world_size(process_group)
    device = collective_device(process_group, preferred=rows.device)
    rows = rows.to(device)
    owner = rows[:, 0] % world
    order = torch.argsort(owner)
    send_counts = torch.bincount(owner, minlength=world)
    rows = rows[order].contiguous()
    del owner, order
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=process_group)
    received = torch.empty((int(recv_counts.sum()), 2), dtype=torch.int64, device=device)
    dist.all_to_all_single(received, rows, output_split_sizes=recv_counts.tolist(),
                           input_split_sizes=send_counts.tolist(), group=process_group)
    return received


def _gauc_of_rows(rows: np.ndarray) -> Tuple[float, int]:
    """``(sum of weight x AUC, sum of weight)`` over the users of GAUC rows ``[n, 2]`` (user, score word),
    sorted here by (user, score), :data:`GAUC_CHUNK_ROWS` rows (whole users) at a time."""
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    users, words = rows[:, 0], rows[:, 1]
    del rows
    weighted: List[float] = []
    weight = 0
    start = 0
    while start < users.size:
        end = min(start + GAUC_CHUNK_ROWS, users.size)
        if end < users.size:  # extend to the end of the last user of the chunk
            end = int(np.searchsorted(users, users[end - 1], side="right"))
        chunk = words[start:end]
        w, c = gauc_sums(users[start:end], chunk >> 1, (chunk & 1).astype(bool))
        weighted.append(w)
        weight += c
        start = end
    return math.fsum(weighted), weight


EXACT_MAX_ROWS = 1_000_000
"""``eval.metrics: null`` computes exact metrics for splits of at most this many rows, streaming ones above."""

def metrics_mode(configured: Optional[str], rows: int) -> str:
    """``configured`` (``exact`` / ``streaming``), or by the split's total ``rows`` when ``None``."""
    return configured or ("exact" if rows <= EXACT_MAX_ROWS else "streaming")


def make_accumulator(mode: str, auc_bins: int = AUC_BINS) -> Union[MetricAccumulator, StreamingMetricAccumulator]:
    """An empty accumulator of ``mode`` (``exact`` or ``streaming`` with ``auc_bins`` bins)."""
    return MetricAccumulator() if mode == "exact" else StreamingMetricAccumulator(auc_bins)
