"""Exactness and rank aggregation of :mod:`mdaf_rec.metrics`; the PNGs of :mod:`mdaf_rec.plots`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from device_guards import no_host_sync
from mdaf_rec.metrics import MetricAccumulator, auc_score, format_metric, gauc_score, normalized_entropy
from mdaf_rec.plots import plot_gate_histogram, plot_training_curves

Data = Dict[str, torch.Tensor]


def make_data(n: int = 600, users: int = 40, gate_dim: int = 3, seed: int = 0) -> Data:
    """Random rows with many tied probabilities (15 levels); per-user label rates vary."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, users, (n,), generator=g)
    user_rate = torch.rand(users, generator=g)
    return {
        "probs": torch.randint(0, 15, (n,), generator=g).double() / 14,
        "labels": (torch.rand(n, generator=g) < user_rate[groups]).float(),
        "groups": groups,
        "gate": torch.rand(n, gate_dim, generator=g),
    }


def brute_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """O(n²) pairwise AUC: P(pos > neg) + 0.5 P(pos == neg)."""
    pos, neg = probs[labels == 1], probs[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size))


def feed(acc: MetricAccumulator, data: Data, rows: torch.Tensor, batch: int = 64) -> None:
    """``update`` with ``data[rows]`` in batches."""
    for chunk in rows.split(batch):
        acc.update(data["probs"][chunk], data["labels"][chunk], data["groups"][chunk], data["gate"][chunk])


def test_auc_matches_pairwise_bruteforce() -> None:
    for seed in range(3):
        data = make_data(seed=seed)
        p, y = data["probs"].numpy(), data["labels"].numpy()
        assert abs(auc_score(data["probs"], data["labels"]) - brute_auc(p, y)) < 1e-12
    assert auc_score(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.875)
    assert math.isnan(auc_score(torch.rand(5), torch.ones(5)))


def test_gauc_matches_per_user_loop() -> None:
    data = make_data(seed=1)
    p, y, g = data["probs"].numpy(), data["labels"].numpy(), data["groups"].numpy()
    num = den = 0.0
    skipped = 0
    for user in np.unique(g):
        mask = g == user
        if len(np.unique(y[mask])) < 2:
            skipped += 1
            continue
        num += mask.sum() * brute_auc(p[mask], y[mask])
        den += mask.sum()
    assert skipped > 0, "the data should contain one-class users"
    assert abs(gauc_score(p, y, g) - num / den) < 1e-12
    assert math.isnan(gauc_score(torch.rand(4), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 3])))


def test_logloss_calibration_and_gate_by_hand() -> None:
    acc = MetricAccumulator()
    acc.update(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([[1.0], [0.5]]))
    acc.update(torch.tensor([0.0, 0.5]), torch.tensor([1.0, 1.0]), torch.tensor([1, 1]), torch.tensor([[0.0], [0.25]]))
    out = acc.compute()
    expected_logloss = -(math.log(0.9) + math.log(0.8) + math.log(1e-7) + math.log(0.5)) / 4  # 0.0 clipped
    assert out["logloss"] == pytest.approx(expected_logloss, abs=1e-6)
    assert out["calibration"] == pytest.approx(1.6 / 3)
    # NE: the log loss over that of always predicting the observed CTR 0.75 (entropy 0.5623 nats)
    assert out["ne"] == pytest.approx(out["logloss"] / -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-12)
    assert out["ne"] == pytest.approx(expected_logloss / 0.5623351446, rel=1e-6)
    assert math.isnan(normalized_entropy(0.3, 1.0)) and math.isnan(normalized_entropy(0.3, 0.0))
    assert out["ctr"] == pytest.approx(0.75) and out["pred_ctr"] == pytest.approx(0.4) and out["count"] == 4
    assert out["auc"] == pytest.approx(brute_auc(np.array([0.9, 0.2, 0.0, 0.5]), np.array([1, 0, 1, 1])))
    assert out["gauc"] == 1.0  # only user 0 has both classes
    gate = out["gate"]
    assert gate["mean"] == pytest.approx(0.4375)
    assert gate["std"] == pytest.approx(np.std([1.0, 0.5, 0.0, 0.25]))
    assert len(gate["histogram"]["edges"]) == 21 and gate["histogram"]["counts"][-1] == 1
    assert sum(gate["histogram"]["counts"]) == 4
    acc.reset()
    assert acc.compute()["count"] == 0


def test_undefined_metrics_are_none_with_the_reason_never_nan() -> None:
    """Issue 20: a one-class or empty split gave ``auc: NaN`` in metrics.json (not even valid JSON)."""
    acc = MetricAccumulator()
    acc.update(torch.tensor([0.9, 0.2, 0.4]), torch.zeros(3), torch.tensor([0, 1, 1]))
    out = json.loads(json.dumps(acc.compute(), allow_nan=False))
    one_class = "one class only: 0 of 3 rows have label 1"
    assert out["not_computable"] == {"auc": one_class, "gauc": one_class, "ne": one_class, "calibration": one_class}
    assert out["auc"] is None and out["gauc"] is None and out["ne"] is None and out["calibration"] is None
    assert out["logloss"] == pytest.approx(-(math.log(0.1) + math.log(0.8) + math.log(0.6)) / 3) and out["ctr"] == 0.0
    assert format_metric(out, "auc") == f"n/a ({one_class})" and format_metric(out, "logloss", 3) == "1.012"
    acc.reset()
    acc.update(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))  # one row per user
    out = acc.compute()
    assert out["auc"] == 1.0 and out["not_computable"] == {"gauc": "no user has both a positive and a negative"}
    acc.reset()
    out = acc.compute()
    assert out["count"] == 0 and set(out["not_computable"]) == {"auc", "gauc", "logloss", "ne", "calibration", "ctr",
                                                                 "pred_ctr"}
    assert set(out["not_computable"].values()) == {"no rows"} and json.dumps(out, allow_nan=False)


def test_vector_gate_uses_per_sample_mean_and_order_does_not_matter() -> None:
    data = make_data(seed=2)
    n = data["probs"].shape[0]
    forward, shuffled = MetricAccumulator(), MetricAccumulator()
    feed(forward, data, torch.arange(n))
    feed(shuffled, data, torch.randperm(n, generator=torch.Generator().manual_seed(3)), batch=37)
    out = forward.compute()
    assert out == shuffled.compute()
    assert out["gate"]["mean"] == pytest.approx(data["gate"].double().mean().item(), abs=1e-12)
    assert out["gauc"] == pytest.approx(gauc_score(data["probs"], data["labels"], data["groups"]), abs=0)


def _splits(n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per-rank row indices for two scenarios: an unequal random split and one with an empty rank 1."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    return [(perm[: n // 3], perm[n // 3 :]), (torch.arange(n), torch.arange(0))]


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str, make_accumulator: Callable[[], Any],
                 data: Data, splits: List[Tuple[torch.Tensor, torch.Tensor]], batch: Tuple[int, int]) -> None:
    """Child process: feeds its share of each split, in batches of ``batch[0] + batch[1] * rank`` rows, to a new
    accumulator and writes the ``compute()`` results to ``out_dir``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for split in splits:
            acc = make_accumulator()
            feed(acc, data, split[rank], batch=batch[0] + batch[1] * rank)
            results.append(acc.compute())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def two_rank_results(tmp_path: Path, make_accumulator: Callable[[], Any], data: Data,
                     splits: List[Tuple[torch.Tensor, torch.Tensor]], batch: Tuple[int, int]) -> List[List[Dict]]:
    """Per rank of a 2-process gloo group: the ``compute()`` result of each split, rank ``r`` fed ``split[r]``."""
    args = (2, str(tmp_path / "pg"), str(tmp_path), make_accumulator, data, splits, batch)
    mp.spawn(_rank_worker, args=args, nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    data = make_data()
    per_rank = two_rank_results(tmp_path, MetricAccumulator, data, _splits(data["probs"].shape[0]), batch=(50, 13))
    single = MetricAccumulator()
    feed(single, data, torch.arange(data["probs"].shape[0]))
    expected = json.loads(json.dumps(single.compute()))  # the children's round trip (exact for floats)
    for results in per_rank:
        assert len(results) == 2
        for result in results:  # exact: every metric is independent of the row order
            assert result == expected


def test_plots_write_pngs(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = [
        {
            "epoch": e,
            "step": 100 * e,
            "train_loss": 0.6 - 0.05 * e,
            "val": {"auc": 0.6 + 0.02 * e, "logloss": 0.55 - 0.01 * e, "gauc": 0.58 + 0.02 * e, "calibration": 1.0},
        }
        for e in range(1, 5)
    ]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    curves = plot_training_curves(log, tmp_path / "out" / "curves.png")
    data = make_data()
    acc = MetricAccumulator()
    feed(acc, data, torch.arange(data["probs"].shape[0]))
    hist = plot_gate_histogram(acc.compute()["gate"], tmp_path / "gate.png", "MDAF gate (validation)")
    for png in (curves, hist):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000


def test_update_leaves_rows_on_their_device_and_compute_checks_labels() -> None:
    """``update`` never reads a value on the host (on a GPU it only queues work); labels are checked once,
    at ``compute``."""
    data = make_data(n=40)
    acc = MetricAccumulator()
    with no_host_sync():
        feed(acc, data, torch.arange(40), batch=16)
    assert acc.compute()["count"] == 40
    acc.reset()
    acc.update(torch.rand(3), torch.tensor([0.0, 2.0, 1.0]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        acc.compute()
    with pytest.raises(ValueError, match="one device"):
        acc.update(torch.rand(2), torch.ones(2, device="meta"), torch.zeros(2, dtype=torch.long))
