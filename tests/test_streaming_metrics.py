"""Issue 19: streaming evaluation (:mod:`mdaf_rec.streaming_metrics`) against the exact metrics of
:mod:`mdaf_rec.metrics`: sums and GAUC equal, AUC within its reported bound (<= 1e-4 on real data), the same
numbers over two ranks, and no host sync per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from conftest import shared_data
from device_guards import no_host_sync
from mdaf_rec.config import ConfigError, load_config
from mdaf_rec.metrics import MetricAccumulator, auc_score
from mdaf_rec.streaming_metrics import (
    AUC_BINS,
    EXACT_MAX_ROWS,
    StreamingMetricAccumulator,
    make_accumulator,
    metrics_mode,
)
from test_metrics import make_data, two_rank_results

Data = Dict[str, torch.Tensor]
SUMS = ("logloss", "ne", "calibration", "ctr", "pred_ctr")


def scored_rows(n: int = 20_000, users: int = 300, seed: int = 0) -> Data:
    """Float32 model-like scores (a logit per row, shifted for positives), float labels, per-user rates."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, users, (n,), generator=g)
    labels = (torch.rand(n, generator=g) < torch.rand(users, generator=g)[groups] * 0.3).float()
    logit = 1.2 * torch.randn(n, generator=g) + 1.0 * labels - 2.0
    return {"probs": torch.sigmoid(logit), "labels": labels, "groups": groups, "gate": torch.rand(n, 2, generator=g)}


def both(data: Data, rows: torch.Tensor, batch: int = 997, **kwargs) -> List[Dict]:
    """``compute()`` of the exact and the streaming accumulator fed ``data[rows]`` in batches."""
    accs = [MetricAccumulator(), StreamingMetricAccumulator(**kwargs)]
    for chunk in rows.split(batch):
        for acc in accs:
            acc.update(*(data[k][chunk] for k in ("probs", "labels", "groups", "gate")))
    return [acc.compute() for acc in accs]


def assert_matches_exact(exact: Dict, streaming: Dict) -> None:
    """Sums to float64 rounding, GAUC and counts exactly, AUC within the reported bound."""
    assert streaming["count"] == exact["count"]
    for key in SUMS:
        assert streaming[key] == pytest.approx(exact[key], rel=1e-12, abs=0), key
    assert streaming["gauc"] == pytest.approx(exact["gauc"], rel=1e-14, abs=0)
    assert abs(streaming["auc"] - exact["auc"]) <= streaming["auc_error_bound"] + 1e-15
    assert exact["auc_error_bound"] == 0.0
    assert streaming["gate"]["histogram"] == exact["gate"]["histogram"]
    for key in ("mean", "std"):
        assert streaming["gate"][key] == pytest.approx(exact["gate"][key], rel=1e-12, abs=1e-15), key


def test_streaming_equals_exact_except_auc_which_stays_within_its_bound() -> None:
    data = scored_rows()
    exact, streaming = both(data, torch.arange(20_000))
    assert_matches_exact(exact, streaming)
    assert 0 < abs(streaming["auc"] - exact["auc"]) < 1e-5  # binned, not exact, but close
    assert 0 < streaming["auc_error_bound"] < 1e-4
    # Coarse bins: a larger error, still inside the (larger) bound.
    exact, coarse = both(data, torch.arange(20_000), auc_bins=64)
    assert_matches_exact(exact, coarse)
    assert abs(coarse["auc"] - exact["auc"]) > 1e-4
    assert coarse["auc_error_bound"] > 1e-3


def test_exact_ties_count_no_error() -> None:
    """Scores on 15 levels (many exact ties): each level has a bin of its own, so the histogram AUC is the
    exact AUC and the bound is 0; with 4 bins distinct levels share bins and the bound is positive."""
    data = make_data(n=3000, seed=5)
    exact, streaming = both(data, torch.arange(3000))
    assert streaming["auc"] == exact["auc"] and streaming["auc_error_bound"] == 0.0
    assert_matches_exact(exact, streaming)
    exact, coarse = both(data, torch.arange(3000), auc_bins=4)
    assert coarse["auc_error_bound"] > 0.01
    assert_matches_exact(exact, coarse)


def test_auc_error_at_the_default_resolution_on_real_data() -> None:
    """MovieLens (ml-latest-small, 100,836 ratings; label: rating >= 4): scores from a shrunk user + movie
    mean rating fitted on the earliest 80%, float32 probabilities like the model's, evaluated on the last 20%."""
    ratings = np.loadtxt(shared_data("ml-latest-small", "ratings.csv"), delimiter=",", skiprows=1)
    ratings = ratings[np.argsort(ratings[:, 3], kind="stable")]
    cut = int(0.8 * len(ratings))
    fit, held = ratings[:cut], ratings[cut:]
    mean = fit[:, 2].mean()

    def shrunk_means(column: int) -> Dict[float, float]:
        ids, inverse, counts = np.unique(fit[:, column], return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=fit[:, 2] - mean)
        return dict(zip(ids, sums / (counts + 5.0)))

    user, movie = shrunk_means(0), shrunk_means(1)
    logit = np.array([user.get(u, 0.0) + movie.get(m, 0.0) for u, m in held[:, :2]]) * 2.0 + 0.3
    data = {
        "probs": torch.sigmoid(torch.from_numpy(logit)).float(),
        "labels": torch.from_numpy((held[:, 2] >= 4.0).astype(np.float32)),
        "groups": torch.from_numpy(held[:, 0].astype(np.int64)),
        "gate": torch.rand(len(held), 1, generator=torch.Generator().manual_seed(0)),
    }
    exact, streaming = both(data, torch.arange(len(held)), batch=4096)
    assert exact["count"] == 20_168 and 0.6 < exact["auc"] < 0.8
    assert_matches_exact(exact, streaming)
    assert abs(streaming["auc"] - exact["auc"]) <= 1e-4
    assert streaming["auc_error_bound"] <= 1e-4


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    data = scored_rows(n=6000)
    perm = torch.randperm(6000, generator=torch.Generator().manual_seed(4))
    splits = [(perm[:2000], perm[2000:]), (torch.arange(6000), torch.arange(0))]
    per_rank = two_rank_results(tmp_path, StreamingMetricAccumulator, data, splits, batch=(300, 77))
    exact, single = both(data, torch.arange(6000))
    for results in per_rank:
        assert len(results) == 2
        for result in results:
            assert_matches_exact(exact, result)
            for key in ("auc", "auc_error_bound", "count"):  # integer histograms: identical
                assert result[key] == single[key], key
            assert result["gate"]["histogram"] == single["gate"]["histogram"]


def test_update_never_syncs_and_bad_rows_are_refused_at_compute() -> None:
    data = scored_rows(n=500)
    acc = StreamingMetricAccumulator()
    with no_host_sync():
        for chunk in torch.arange(500).split(128):
            acc.update(*(data[k][chunk] for k in ("probs", "labels", "groups", "gate")))
    assert acc.compute()["count"] == 500
    acc.reset()
    empty = acc.compute()
    assert empty["count"] == 0 and empty["auc"] is None and empty["not_computable"]["auc"] == "no rows"
    acc.update(torch.rand(3), torch.tensor([0.0, 2.0, 1.0]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        acc.compute()
    acc.reset()
    acc.update(torch.tensor([0.2, float("nan")]), torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probabilities must be in \[0, 1\]"):
        acc.compute()
    acc.reset()
    acc.update(torch.rand(2), torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="either every update"):
        acc.update(torch.rand(2), torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long), torch.rand(2, 1))


def test_mode_is_chosen_by_split_size_unless_configured() -> None:
    assert metrics_mode(None, EXACT_MAX_ROWS) == "exact"
    assert metrics_mode(None, EXACT_MAX_ROWS + 1) == "streaming"
    assert metrics_mode("exact", 10**9) == "exact" and metrics_mode("streaming", 10) == "streaming"
    assert isinstance(make_accumulator("streaming", 128), StreamingMetricAccumulator)
    assert make_accumulator("streaming", 128).auc_bins == 128
    assert isinstance(make_accumulator("exact"), MetricAccumulator)
    assert load_config("dcnv3", ["eval.metrics=streaming"]).eval.metrics == "streaming"
    assert load_config("dcnv3").eval.auc_bins == AUC_BINS and load_config("dcnv3").eval.metrics is None
    with pytest.raises(ConfigError, match=r"'eval\.metrics': 'approx' is not one of \['exact', 'streaming'\]"):
        load_config("dcnv3", ["eval.metrics=approx"])
    with pytest.raises(ConfigError, match=r"eval\.auc_bins"):
        load_config("dcnv3", ["eval.auc_bins=1"])
    # auc_score is unchanged by the refactoring: the exact pairwise definition.
    assert auc_score(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.875)


def test_gauc_groups_raw_64_bit_user_ids() -> None:
    """GAUC groups by the raw user id: ids far above 2**32 that share their low 32 bits stay apart."""
    data = scored_rows(n=4000)
    users = data["groups"] % 50 + (data["groups"] % 3) * (1 << 40) + (1 << 62)
    exact, streamed = both({**data, "groups": users}, torch.arange(4000))
    assert streamed["gauc"] == pytest.approx(exact["gauc"], abs=1e-12)
    low_bits = both({**data, "groups": users % (1 << 32)}, torch.arange(4000))[1]["gauc"]
    assert low_bits != pytest.approx(exact["gauc"], abs=1e-6)  # merging users would change it
