"""Managed ids (TorchRec MCH): the input hash, the frozen serving map, eviction of a DMP-sharded MC-EC on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection, MCHManagedCollisionModule
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from mdaf_rec.data.vocab import stable_hash
from test_train import REPO, _env, _free_port
from mdaf_rec.managed_ids import (
    EVICTION_POLICIES,
    INPUT_HASH_SIZE,
    FrozenIdMap,
    ManagedEmbeddingCollectionSharder,
    hash_ids,
    managed_collision_module,
)

ROWS = 8
CPU = torch.device("cpu")


def test_hash_is_vocab_stable_hash_in_range() -> None:
    ids = np.array([0, 1, -1, 2**62, 2**63 - 1, -(2**63), 123456789012345], dtype=np.int64)
    expected = (stable_hash(ids) & np.uint64(INPUT_HASH_SIZE)) % np.uint64(INPUT_HASH_SIZE)
    hashed = hash_ids(torch.from_numpy(ids))
    assert hashed.tolist() == expected.astype(np.int64).tolist()
    assert bool(((hashed >= 0) & (hashed < INPUT_HASH_SIZE)).all())
    # spread: raw ids below 2**62 (all on rank 0 of 2 unhashed) land on both halves of the input range
    assert 0.3 < float((hash_ids(torch.arange(1000)) < 2**62).float().mean()) < 0.7


def _train(mch: MCHManagedCollisionModule, batches: List[List[int]]) -> None:
    mch.train()
    for ids in batches:
        mch({"t": JaggedTensor(values=torch.tensor(ids), lengths=torch.tensor([len(ids)]))})


@pytest.mark.parametrize("eviction", sorted(EVICTION_POLICIES))
def test_frozen_map_maps_as_the_trained_module(eviction: str) -> None:
    mch = managed_collision_module(ROWS, eviction, eviction_interval=1, device=CPU)
    raw = [10**15 + 7 * i for i in range(12)]  # 12 ids for 7 rows: evictions
    _train(mch, [raw[:5], raw[3:9], raw[6:12], raw[8:12], raw[:2]])
    mch.eval()
    ids = torch.tensor(raw + [-5, 99])  # every id seen, and two never seen
    expected = mch({"t": JaggedTensor(values=ids, lengths=torch.tensor([len(ids)]))})["t"].values()
    frozen = FrozenIdMap(mch)
    assert frozen(ids).tolist() == expected.tolist()
    assert int((expected == ROWS - 1).sum()) >= 5 + 2  # 12 ids, 7 rows: at least 5 evicted, 2 new
    assert len(set(expected[expected != ROWS - 1].tolist())) == int((expected != ROWS - 1).sum())  # own rows
    exported = torch.export.export(frozen, (ids,)).module()
    assert exported(ids).tolist() == expected.tolist()


@pytest.fixture()
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tables = [EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=ROWS, feature_names=["f"])]
        self.mc_ec = ManagedCollisionEmbeddingCollection(
            EmbeddingCollection(tables=tables, device=torch.device("meta")),
            ManagedCollisionCollection({"t": managed_collision_module(ROWS, "lru", 1, CPU, "t")}, tables),
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        embeddings, _ = self.mc_ec(kjt)
        return embeddings["f"].values().square().sum()


def _sharded(
    sharder: ManagedCollisionEmbeddingCollectionSharder,
    process_group,
    plan_with: ManagedCollisionEmbeddingCollectionSharder,
) -> DistributedModelParallel:
    """The model planned with ``plan_with`` and sharded by DMP with ``sharder``."""
    torch.manual_seed(0)
    model = _Lookup()
    _apply_optimizer_in_backward(RowWiseAdagrad, list(model.mc_ec._embedding_module.parameters()), {"lr": 0.1})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), batch_size=4)
    plan = planner.collective_plan(model, [plan_with], process_group)  # row-wise: the one MC sharding type
    return DistributedModelParallel(model, device=CPU, plan=plan, sharders=[sharder])


def _step(dmp: DistributedModelParallel, ids: List[int]) -> None:
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor(ids), torch.ones(len(ids), dtype=torch.int32))
    dmp(kjt).backward()


def test_sharded_mc_ec_evicts_on_cpu(process_group) -> None:
    ours, stock = ManagedEmbeddingCollectionSharder(), ManagedCollisionEmbeddingCollectionSharder()
    # TorchRec's sharder offers the planner GPU kernels on CPU
    with pytest.raises(ValueError, match="unsupported compute kernel: fused_uvm"):
        _sharded(stock, process_group, plan_with=stock)
    with pytest.raises(NotImplementedError, match="reset_weight_momentum"):  # fbgemm-gpu-cpu has no CPU kernel
        _step(_sharded(stock, process_group, plan_with=ours), [11, 12, 13])

    dmp = _sharded(ours, process_group, plan_with=ours)
    for step in range(4):  # 4 new ids a step for 7 rows: evictions from step 2 on
        _step(dmp, [100 * step + i for i in range(4)])
    sharded = dmp.module.mc_ec
    tbe, index = sharded._table_to_tbe_and_index["t"]
    (momentum,) = tbe.split_optimizer_states()[int(index)]  # rowwise_adagrad: one state per row
    weight = tbe.split_embedding_weights()[int(index)]
    with torch.no_grad():
        momentum.fill_(1.0)
        weight.fill_(5.0)
    sharded._evict({"t": torch.tensor([2, 5])})
    assert momentum.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    bound = (1 / ROWS) ** 0.5  # TorchRec's default init: uniform in [-sqrt(1/rows), sqrt(1/rows)]
    assert bool((weight[[2, 5]].abs() <= bound).all()) and bool((weight[[0, 1, 3, 4, 6, 7]] == 5.0).all())


def _probe(*args: str, nproc: int = 0) -> dict:
    """Runs ``tools/probe_managed_ids.py`` (under torchrun with ``nproc`` processes); its JSON line."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    cmd = [*launcher, "tools/probe_managed_ids.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_rank_mapping_resumes_and_serves_exactly(tmp_path: Path) -> None:
    """Sharded over 2 ranks (each owns half the hashed ids and half the rows), trained with evictions, saved by
    DCP: reloaded on 2 ranks it maps every probe id to the same row, and so does the frozen serving map built
    from the unsharded state, misses included (each to its shard's miss row)."""
    saved = _probe("--save", str(tmp_path), "--steps", "8", nproc=2)
    assert saved["distinct_rows"] == 128  # all 126 own rows in use, and both shards' miss rows
    assert saved["reloaded_same_row"] == saved["probe_ids"]
    frozen = _probe("--frozen", str(tmp_path))
    assert frozen["segments"] == [0, 64, 128] and frozen["same_row"] == saved["probe_ids"]
