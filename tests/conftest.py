"""Shared test helpers: small feature specs and random batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest
import torch

from mdaf_rec.config import FeaturesConfig
from mdaf_rec.data.batch import Batch, build_batch
from mdaf_rec.data.synth import generate
from mdaf_rec.features import FeatureSpec

SHARED_DATA = Path(os.environ.get("MDAF_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


# The slowest test files, slowest first (seconds under `make test` on the 2-core machine, 2026-12-03: 116, 106,
# 79, 79, 65, 46, 39, 30, 22, 20, 19; every other file takes under 15). `--dist loadfile` hands files to the two
# workers in collection order, so these go first and the workers finish together instead of one waiting on a
# long file that happened to come last in alphabetical order.
SLOW_FILES_FIRST = (
    "test_export.py", "test_hardening.py", "test_managed_ids.py", "test_converters_spark.py", "test_train.py",
    "test_train_step.py", "test_equivalence.py", "test_pooled_lists.py", "test_converters.py", "test_launch.py",
    "test_warm_start.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Moves the files of :data:`SLOW_FILES_FIRST` to the front (stable: each file keeps its tests' order)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def shared_data(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the test cleanly when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def one_thread():
    """Runs the test with one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset (3,000 rows, 300 users, 800 items) shared by the end-to-end tests."""
    path = tmp_path_factory.mktemp("synth")
    generate(path, rows=3000, users=300, items=800, categories=30, max_history=10, seed=3)
    return path


def small_spec(
    max_history: int = 8, sequence_dim: int = 32, static_dim: int = 8, extra_sparse=(), dense=()
) -> FeatureSpec:
    cfg = FeaturesConfig(
        static_dim=static_dim,
        sequence_dim=sequence_dim,
        max_history=max_history,
        extra_sparse=list(extra_sparse),
        dense=list(dense),
    )
    sizes = {"user": 50, "item": 200, "category": 20}
    sizes.update({name: 30 for name in extra_sparse})
    return FeatureSpec.build(cfg, sizes)


def random_batch(
    spec: FeatureSpec, batch_size: int = 16, seed: int = 0, lengths: Optional[torch.Tensor] = None
) -> Batch:
    """A batch of random in-range ids; history lengths uniform in [0, max_history] unless given."""
    g = torch.Generator().manual_seed(seed)
    static_values = [torch.randint(0, f.num_embeddings, (batch_size,), generator=g) for f in spec.static_fields]
    if lengths is None:
        lengths = torch.randint(0, spec.max_history + 1, (batch_size,), generator=g)
    targets, histories = [], []
    for space in spec.sequence_spaces:
        targets.append(torch.randint(2, space.num_embeddings, (batch_size,), generator=g))
        histories.append(torch.randint(2, space.num_embeddings, (int(lengths.sum()),), generator=g))
    return build_batch(
        spec, static_values, targets, histories, lengths,
        dense_features=torch.randn(batch_size, len(spec.dense_features), generator=g),
        labels=torch.randint(0, 2, (batch_size,), generator=g).float(),
        row_index=torch.arange(batch_size),
        user_ids=static_values[spec.user_field] if spec.user_field is not None else torch.zeros(batch_size).long(),
    )
