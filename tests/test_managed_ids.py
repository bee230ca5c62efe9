"""Managed ids (TorchRec MCH): the input hash, the frozen serving map, eviction of a DMP-sharded MC-EC on CPU."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc  # noqa
import pyarrow.parquet as pq
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

from mdaf_rec import checkpoint as ckpt
from mdaf_rec import registry
from mdaf_rec.config import BSTConfig, ConfigError, ModelConfig, check_managed_world_size, load_config
from mdaf_rec.data.batch import build_batch
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.loader import BatchLoader
from mdaf_rec.cli.export import main as export_main
from mdaf_rec.cli.predict import main as predict_main
from mdaf_rec.data.vocab import Vocabularies, stable_hash
from mdaf_rec.export import remapping_keys
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.factory import build_model
from mdaf_rec.predict import ExportedModel
from mdaf_rec.tables import CheckpointTables, IdMap, write_id_map
from mdaf_rec.trainable import build_train_module
from test_equivalence import SETTINGS
from test_equivalence import step as dist_step
from test_export import REFERENCE, _one_line_error, assert_numpy_server_scores_as_predict
from test_train import REPO, TINY, _env, _free_port, mdaf, train
from mdaf_rec.managed_ids import (
    EVICTION_POLICIES,
    INPUT_HASH_SIZE,
    FrozenIdMap,
    ManagedEmbeddingCollectionSharder,
    ManagedSettingsError,
    check_managed_settings,
    check_remapping_world_size,
    frozen_id_maps,
    hash_ids,
    managed_collision_module,
    managed_fingerprint,
    remap,
    reshard_remapping,
    shard_layout,
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


def test_reshard_moves_ids_rows_and_counters_to_their_new_shards() -> None:
    """A 1-shard LFU remapping (12 ids for 7 rows) laid out for 2 shards: each id with a row goes to the shard that
    owns its hashed id, with its count, on a row whose embedding comes from its old row; a shard with more ids than
    rows keeps the most counted; misses take the old miss row's embedding."""
    mch = managed_collision_module(ROWS, "lfu", eviction_interval=1, device=CPU, buckets=ROWS)
    raw = [10**15 + 7 * i for i in range(12)]
    _train(mch, [raw[:5], raw[3:9], raw[6:12], raw[8:12], raw[:2], raw[:3]])
    buffers = {name: getattr(mch, name).clone() for name in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping",
                                                                "_mch_counts")}
    old = FrozenIdMap(mch)
    moved, source_rows, dropped = reshard_remapping(buffers, [0, ROWS], [0, 4, ROWS], buckets=ROWS)
    layout = shard_layout(ROWS, ROWS, [0, 4, ROWS])
    ids, rows = moved["_mch_sorted_raw_ids"], moved["_mch_remapped_ids_mapping"]
    owned = ids != INPUT_HASH_SIZE
    assert sorted(rows[:4].tolist()) == [0, 1, 2, 3] and sorted(rows[4:].tolist()) == [4, 5, 6, 7]
    assert not owned[3] and not owned[7]  # each shard's last slot stays empty: its miss row
    for j, (a, b) in enumerate([(0, 4), (4, 8)]):
        mine = ids[a:b][owned[a:b]]
        assert mine.tolist() == sorted(mine.tolist())
        assert all((h // layout.bucket_size) // layout.buckets_per_shard == j for h in mine.tolist())
    new = remap(hash_ids(torch.tensor(raw)), ids[owned], rows[owned], torch.tensor(layout.miss_rows), layout)
    before = old(torch.tensor(raw))
    kept = new != torch.tensor(layout.miss_rows)[(hash_ids(torch.tensor(raw)) // layout.bucket_size)
                                                  // layout.buckets_per_shard]
    assert source_rows[new[kept]].tolist() == before[kept].tolist()  # the old row's embedding
    assert bool((before[~kept] == ROWS - 1).sum() + dropped == int((~kept).sum()))  # misses, or no room
    assert source_rows[[3, 7]].tolist() == [ROWS - 1, ROWS - 1]  # both miss rows from the one old miss row
    counts = dict(zip(buffers["_mch_sorted_raw_ids"].tolist(), buffers["_mch_counts"].tolist()))
    assert all(counts[h] == c for h, c in zip(ids[owned].tolist(), moved["_mch_counts"][owned].tolist()))


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


# -- features.id_mapping: managed -------------------------------------------------------------------------------

MANAGED = ["features.id_mapping=managed", "features.id_spaces.user.rows=300", "features.id_spaces.item.rows=800",
           "features.id_spaces.category.rows=32"]


@pytest.mark.parametrize("overrides, message", [
    (["features.id_mapping=managed"], r"'features.id_spaces.user.rows': features.id_mapping=managed needs the table rows"),
    (["features.id_spaces.item.rows=64"], r"'features.id_spaces.item.rows': is for features.id_mapping=managed"),
    (["features.id_mapping=hashed"], r"'features.id_mapping': 'hashed' is not one of \['vocab', 'managed'\]"),
    (MANAGED + ["features.id_spaces.item.eviction=fifo"], r"'features.id_spaces.item.eviction': 'fifo' is not one of"),
    (MANAGED + ["features.id_spaces.item.size=64"], r"unknown config key 'features.id_spaces.item.size'"),
    (MANAGED + ["features.id_spaces.item.hash_buckets=64"], r"'features.id_spaces.item.hash_buckets': is for"),
    (MANAGED + ["features.id_spaces.item.eviction_interval=4", "train.checkpoint_every_steps=6"],
     r"'train.checkpoint_every_steps': 6 is not a multiple of features.id_spaces.item.eviction_interval=4"),
    (MANAGED + ["features.id_spaces.item.eviction_interval=2", "train.checkpoint_every_minutes=5"],
     r"'train.checkpoint_every_minutes': timed checkpoints fall between eviction rounds"),
    (MANAGED + ["features.extra_sparse=[shop_id]"], r"'features.extra_sparse': extra sparse fields need a vocabulary"),
    (MANAGED + ["model.name=dnn", "optimizer.sparse=dense"], r"'optimizer.sparse': 'dense' tables are data_parallel"),
])
def test_managed_settings_are_validated(overrides: List[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_managed_rows_must_divide_among_the_ranks() -> None:
    cfg = load_config(None, MANAGED)
    check_managed_world_size(cfg.features, 4)  # 300, 800, 32 rows: 4 ranks share each evenly
    with pytest.raises(ConfigError, match=r"'features.id_spaces.user.rows': 300 is not a multiple of the world size "
                                          r"8 \(a managed table is sharded row-wise in equal blocks"):
        check_managed_world_size(cfg.features, 8)


def test_loader_puts_raw_ids_into_the_kjts(dataset: Path) -> None:
    """Under managed no vocabulary is built or read: the KJTs hold the split's raw ids, the static KJT every
    history too (the managed lookup reads that one KJT)."""
    cfg = load_config(None, MANAGED + ["features.max_history=10"])
    spec = FeatureSpec.build(cfg.features, {})
    assert spec.static_input_keys == ["user", "item", "category", "hour", "dayofweek", "item_history", "category_history"]
    batch = next(iter(BatchLoader(Dataset.open(dataset), "val", spec, None, 64)))
    table = pa.concat_tables(pq.read_table(f) for f in Dataset.open(dataset).split_files("val")).take(batch.row_index.numpy())
    static = batch.static_features.to_dict()
    for key, column in (("user", "user_id"), ("item", "item_id"), ("category", "category_id")):
        assert static[key].values().tolist() == table.column(column).to_pylist()
    history = [ids[-10:] for ids in table.column("item_history").to_pylist()]
    assert static["item_history"].values().tolist() == [i for ids in history for i in ids]
    assert batch.sequence_features.to_dict()["item_history"].values().tolist() == static["item_history"].values().tolist()
    assert batch.user_id.tolist() == table.column("user_id").to_pylist()
    with pytest.raises(ValueError, match="vocabularies are needed exactly when ids are not managed"):
        BatchLoader(Dataset.open(dataset), "val", spec, Vocabularies({}, 1, []), 64)


def test_static_and_sequence_lookups_of_a_space_share_one_mapping() -> None:
    """MDAF under managed: one remapping per id space (user, item, category) for both archs; an item id as a target
    and in a history reads the same row: the same static part (pooled history of that one id) and sequence part."""
    cfg = load_config(None, MANAGED + ["features.static_dim=4", "features.sequence_dim=8", "features.max_history=4",
                                       "features.pooled_history=true"])
    spec = FeatureSpec.build(cfg.features, {})
    model = build_model(spec, ModelConfig(name="mdaf_bst", bst=BSTConfig(num_heads=2)))
    remappings = [m for m in model.modules() if isinstance(m, MCHManagedCollisionModule)]
    assert sorted(m._name for m in remappings) == ["managed_category", "managed_item", "managed_user"]
    widths = {c.name: c.embedding_dim for c in spec.managed_embedding_configs(static=True, sequence=True)}
    assert widths == {"managed_user": 4, "managed_item": 12, "managed_category": 12}  # user: static part only
    big = 2**62 + 12345  # raw 63-bit ids, no vocabulary
    batch = build_batch(
        spec, static_ids=[torch.tensor([7, 8]), torch.tensor([big, big + 1]), torch.tensor([5, 6]),
                          torch.tensor([1, 2]), torch.tensor([0, 3])],
        target_ids=[torch.tensor([big, big + 1]), torch.tensor([5, 6])],
        history_ids=[torch.tensor([big]), torch.tensor([6])], history_lengths=torch.tensor([0, 1]),
        dense_features=torch.zeros(2, 0), labels=torch.zeros(2), row_index=torch.arange(2), user_ids=torch.tensor([7, 8]),
    )
    model.train()
    lookup = model.managed_lookup(batch)
    assert lookup.static["item"].values().shape == (2, 4) and lookup.sequence["item"].values().shape == (2, 8)
    torch.testing.assert_close(lookup.static["item_history"].values()[0], lookup.static["item"].values()[0])
    torch.testing.assert_close(lookup.sequence["item_history"].values()[0], lookup.sequence["item"].values()[0])
    torch.testing.assert_close(lookup.sequence["category_history"].values()[0], lookup.sequence["category"].values()[1])
    assert not torch.equal(lookup.sequence["item"].values()[0], lookup.sequence["item"].values()[1])  # own rows
    assert model(batch).shape == (2,)


def test_eviction_policies_are_the_registered_names() -> None:
    assert tuple(EVICTION_POLICIES) == registry.EVICTION_POLICIES


# Managed tables start nearly constant (every row within 1e-9 of 0), so what an id's row holds after training does
# not depend on WHICH row it got: 1 process and 2 (each owning half the rows and the ids hashed to its half) give
# one id other rows; its embedding must come out the same. The model is dnn with pooled histories (targets and
# histories through the managed tables): a sequence model's token LayerNorm turns rows this close to 0 into
# gradients of ~1e5.
# Rows enough that no id of the 3 steps is evicted, also with half of them on each of 2 ranks.
MANAGED_EQUIVALENCE = MANAGED + ["features.id_spaces.user.rows=1000", "features.id_spaces.item.rows=4000",
                                 "features.id_spaces.category.rows=200", "features.table_init_scale=1e-9"]
TIME_TABLES = {"static_hour": "data_parallel", "static_dayofweek": "table_wise"}


def _unsharded(run: Path, checkpoint: str, world_size: int):
    """The unsharded training module with ``run``'s checkpoint loaded, and its frozen id maps."""
    cfg = load_config("configs/dnn.yaml", [*SETTINGS, *MANAGED_EQUIVALENCE])
    module = build_train_module(cfg, {}, table_device="cpu", dense_device="cpu", compute_device="cpu",
                                with_sparse_optimizer=False).module
    ckpt.load_model_weights(run / "checkpoints" / checkpoint, module)
    return module, frozen_id_maps(module, world_size)


def test_two_rank_managed_steps_equal_one_process(dataset: Path, tmp_path: Path) -> None:
    """Three training steps with managed ids on 2 ranks (row-wise sharded remapping and tables, gloo) equal the
    1-process steps: every dense weight, and every raw id's embedding (targets and histories)."""
    extra = [a for s in MANAGED_EQUIVALENCE for a in ("--set", s)]
    dist_step(dataset, tmp_path / "one", TIME_TABLES, "--steps", "3", *extra, config="configs/dnn.yaml")
    init = str(tmp_path / "one" / "checkpoints" / "step_0")
    result = dist_step(dataset, tmp_path / "two", TIME_TABLES, "--steps", "3", "--init", init, *extra, nproc=2,
                  config="configs/dnn.yaml")
    assert {t: s for t, s in result["plan"].items() if t.startswith("managed_")} == {
        "managed_user": "row_wise", "managed_item": "row_wise", "managed_category": "row_wise"}
    one, one_maps = _unsharded(tmp_path / "one", "after", 1)
    two, two_maps = _unsharded(tmp_path / "two", "after", 2)
    served = {name: _served_id_maps(tmp_path / name / "checkpoints" / "after", module, world, tmp_path / f"{name}_maps")
              for name, module, world in (("one", one, 1), ("two", two, 2))}
    start, _ = _unsharded(tmp_path / "one", "step_0", 1)
    ones, twos, starts = one.state_dict(), two.state_dict(), start.state_dict()
    dense = [k for k in ones if "managed_ids" not in k]
    assert dense and all(float((ones[k] - twos[k]).abs().max()) < 1e-5 for k in dense), \
        {k: float((ones[k] - twos[k]).abs().max()) for k in dense}
    moved = max(float((ones[k] - starts[k]).abs().max()) for k in dense)
    assert moved > 1e-3
    train = pa.concat_tables(pq.read_table(f) for f in Dataset.open(dataset).split_files("train"))
    ids = {"user": train.column("user_id").to_numpy(), "category": train.column("category_id").to_numpy(),
           "item": np.concatenate([train.column("item_id").to_numpy(),
                                   pc.list_flatten(train.column("item_history")).to_numpy()])}
    for space, raw in ids.items():
        raw = torch.from_numpy(np.unique(np.asarray(raw)))
        table = f"managed_{space}"
        weight = next(k for k in ones if k.endswith(f"embeddings.{table}.weight"))
        rows_one, rows_two = one_maps[table](raw), two_maps[table](raw)
        assert len(set(rows_one.tolist())) > 0.3 * len(raw)  # own rows, not the miss row
        assert rows_two.ge(two_maps[table].miss_rows[0] + 1).any() and rows_two.le(two_maps[table].miss_rows[0]).any()
        a, b = ones[weight][rows_one], twos[weight][rows_two]
        assert float(a.abs().max()) > 1e-6  # trained 1000x away from the 1e-9 start
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-3, msg=space)
        # the export's id map files, written from each checkpoint's shards, map as the trained remapping
        assert served["one"][table](raw).tolist() == rows_one.tolist()
        assert served["two"][table](raw).tolist() == rows_two.tolist()


def _served_id_maps(checkpoint: Path, module: nn.Module, world_size: int, folder: Path):
    """Table -> :class:`IdMap` over the id map files the export writes from ``checkpoint`` (trained on
    ``world_size`` processes) for the remappings of ``module`` (its unsharded training module)."""
    source = CheckpointTables(checkpoint)
    return {table: IdMap(folder, write_id_map(source, f"model.{prefix}", folder, table, world_size, buckets))
            for table, (prefix, buckets) in remapping_keys(module).items()}


# Fewer rows than ids (300 users, 800 items, 30 categories in the data): eviction at work in every epoch.
EVICTING = ["features.id_mapping=managed", "features.id_spaces.user.rows=128", "features.id_spaces.item.rows=256",
            "features.id_spaces.category.rows=16"]


EVICTING_SETS = [a for s in [*EVICTING, "train.checkpoint_every_steps=7", "train.keep_step_checkpoints=1"]
                 for a in ("--set", s)]


@pytest.fixture(scope="module")
def evicting_run(dataset: Path, tmp_path_factory) -> Path:
    """An epoch of MDAF-BST with managed ids and evictions (18 steps, checkpoints every 7)."""
    run = tmp_path_factory.mktemp("managed") / "straight"
    train(dataset, run, "--epochs", "1", *EVICTING_SETS, config="configs/mdaf_bst.yaml")
    return run


def test_kill_mid_epoch_then_rerun_equals_the_uninterrupted_managed_run(
    dataset: Path, evicting_run: Path, tmp_path: Path
) -> None:
    """MDAF-BST with managed ids and evictions, killed after its step-14 checkpoint (mid-epoch 1), rerun: the same
    losses and metrics as the run that was never stopped (the remapping, its counters and the step counter are in
    the checkpoint)."""
    sets = EVICTING_SETS
    straight, crashed = evicting_run, tmp_path / "crashed"
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", "configs/mdaf_bst.yaml", "--data", str(dataset),
           "--out", str(crashed), *[a for s in TINY for a in ("--set", s)], "--epochs", "1", *sets]
    proc = subprocess.run(cmd, cwd=REPO, env={**_env(), "MDAF_FAULT_KILL_AT_STEP": "14"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    rerun = train(dataset, crashed, "--epochs", "1", *sets, config="configs/mdaf_bst.yaml")
    assert "step_14 (epoch 1, step 14)" in rerun.stderr
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (straight, crashed))
    for split in ("val", "test"):
        for key in ("auc", "logloss", "gauc"):
            assert b[split][key] == pytest.approx(a[split][key], abs=1e-6), (split, key)
    la, lb = ([json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, crashed))
    assert lb == pytest.approx(la, abs=1e-6) and len(la) == 1
    model, maps = _unsharded_run(straight)
    item = maps["managed_item"](torch.arange(10**6))  # the synthetic item ids are small integers
    assert 200 < len(set(item.tolist())) <= 256  # the table is full: ids were admitted, evicted, and miss


def _unsharded_run(run: Path):
    """The unsharded training module of ``run`` (its config) with its best checkpoint, and its frozen id maps."""
    cfg = load_config(run / "config.yaml")
    module = build_train_module(cfg, {}, table_device="cpu", dense_device="cpu", compute_device="cpu",
                                with_sparse_optimizer=False).module
    state = ckpt.load_model_weights(ckpt.checkpoint_path(run, "best"), module)
    return module, frozen_id_maps(module, state["world_size"])


def test_checkpoint_records_the_managed_settings_instead_of_a_vocabulary() -> None:
    cfg = load_config(None, EVICTING)
    recorded = managed_fingerprint(cfg.features)
    check_managed_settings(recorded, cfg.features, "checkpoint X")  # the same settings
    check_managed_settings(None, cfg.features, "checkpoint X")  # a checkpoint that recorded none
    other = load_config(None, [*EVICTING, "features.id_spaces.item.eviction=lru"])
    with pytest.raises(ManagedSettingsError, match="checkpoint X was trained with other managed id settings"):
        check_managed_settings(recorded, other.features, "checkpoint X")
    with pytest.raises(ManagedSettingsError, match="checkpoint X was trained with vocabularies"):
        check_managed_settings("0f" * 32, cfg.features, "checkpoint X")


@pytest.fixture(scope="module")
def managed_model(evicting_run: Path, tmp_path_factory) -> Path:
    """``mdaf-rec export`` of :func:`evicting_run` (fp32 tables, portable program only)."""
    model_dir = tmp_path_factory.mktemp("managed_export") / "model"
    assert export_main(["--run", str(evicting_run), "--out", str(model_dir), "--no-compile"]) == 0
    return model_dir


def test_managed_export_serves_raw_ids_as_the_trained_model(dataset: Path, evicting_run: Path, managed_model: Path,
                                                            tmp_path: Path) -> None:
    """``mdaf-rec export`` of a managed MDAF-BST run (tables of two row widths: user [static], item and category
    [static | sequence]; fewer rows than ids) writes each space's frozen remapping beside the table files;
    ``mdaf-rec predict`` on raw ids scores the test split as the trained model does under DMP (<= 1e-5), ids unseen
    in training and ids evicted during training included (each to its miss row; nothing is inserted)."""
    model_dir = managed_model
    subprocess.run([sys.executable, "-c", REFERENCE, str(evicting_run), str(tmp_path / "ref.pt")], cwd=REPO,
                   env=_env(), check=True, capture_output=True, timeout=300)
    ref = torch.load(tmp_path / "ref.pt")
    expected = ref["scores"].numpy()[np.argsort(ref["row_index"].numpy())]
    assert predict_main(["--model", str(model_dir), "--data", str(dataset / "test.parquet"),
                         "--out", str(tmp_path / "scores.parquet")]) == 0
    scored = pq.read_table(tmp_path / "scores.parquet")
    assert scored.column("row_index").to_pylist() == list(range(len(expected)))
    assert float(np.abs(scored.column("probability").to_numpy() - expected).max()) <= 1e-5

    served = ExportedModel(model_dir)
    assert sorted(served.tables.id_maps) == ["managed_category", "managed_item", "managed_user"]
    assert {t: served.tables.tables[t].dim for t in served.tables.id_maps} == {
        "managed_user": 4, "managed_item": 20, "managed_category": 20}
    assert not (model_dir / "vocab").exists()
    test = pq.read_table(dataset / "test.parquet")
    inputs = served.inputs(test, "test.parquet", 0)
    raw = inputs["target_ids"][:, 0]
    assert raw.tolist() == test.column("item_id").to_pylist()  # raw ids in, no vocabulary
    _, maps = _unsharded_run(evicting_run)  # the trained module's remapping, frozen
    for table, id_map in served.tables.id_maps.items():
        probe = torch.cat([torch.arange(2000), torch.tensor([2**62 + 5, -3])])
        assert id_map(probe).tolist() == maps[table](probe).tolist(), table
    train_split = pq.read_table(dataset / "train.parquet")
    trained_ids = set(train_split.column("item_id").to_pylist())
    trained_ids |= set(pc.list_flatten(train_split.column("item_history")).to_pylist())
    item = served.tables.id_maps["managed_item"]
    miss = item(raw) == int(item.miss_rows[0])
    seen = torch.tensor([int(i) in trained_ids for i in raw])
    assert bool(miss[~seen].all()) and int((~seen).sum()) > 10  # unseen in training: the miss row
    assert int((miss & seen).sum()) > 10 and int((~miss).sum()) > 100  # evicted ones too; the rest own rows
    before = {f: (model_dir / f).read_bytes() for f in ("id_maps/managed_item.ids.bin", "tables/managed_item.bin")}
    served.score(test, "test.parquet", 0)
    assert all((model_dir / f).read_bytes() == data for f, data in before.items())  # serving never inserts


def test_a_server_maps_raw_ids_without_mdaf_rec(managed_model: Path, dataset: Path, tmp_path: Path) -> None:
    """docs/serving.md's id map rule is enough to serve raw ids: a numpy server (mdaf_rec, torchrec and fbgemm_gpu
    blocked) scores as ``mdaf-rec predict``."""
    assert_numpy_server_scores_as_predict(managed_model, pq.read_table(dataset / "test.parquet"), tmp_path)


@pytest.mark.parametrize("tamper", ["modify", "remove"])
def test_a_tampered_or_missing_id_map_is_one_line(managed_model: Path, dataset: Path, tmp_path: Path, capsys,
                                                  tamper: str) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(managed_model, model_dir)
    path = model_dir / "id_maps" / "managed_item.rows.bin"
    if tamper == "modify":
        data = bytearray(path.read_bytes())
        data[:8] = (int.from_bytes(data[:8], "little") ^ 1).to_bytes(8, "little")  # one id to a neighbouring row
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    argv = ["--model", str(model_dir), "--data", str(dataset / "test.parquet"), "--out", str(tmp_path / "o.parquet")]
    err = _one_line_error(predict_main, argv, capsys)
    assert "id_maps/managed_item.rows.bin" in err and ("sha256 differs" if tamper == "modify" else "missing") in err


# 1 process: SOURCE_RUN OUT. Scores the test split with the source run's best checkpoint, then with a training session
# warm-started from it (same settings) before its first step; compares every remapping buffer. Writes OUT/result.json.
WARM_CHECK = """
import json, sys
from pathlib import Path
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import load_config
from mdaf_rec.distributed import init_distributed
from mdaf_rec.train import open_session, predictions, warm_start_session
from mdaf_rec.warm_start import check_id_mapping, resolve_source

src, out = sys.argv[1:3]
env = init_distributed()
source = resolve_source(src)

def scores(session):
    rows, probs = zip(*((b.row_index, torch.sigmoid(o.logit)) for b, o in predictions(session, "test")))
    return torch.cat(probs)[torch.argsort(torch.cat(rows))]

def remapping(session):  # this rank's part of every remapping buffer
    return {k: torch.cat([s.tensor for s in v.local_shards()]) if isinstance(v, ShardedTensor) else v
            for k, v in session.model.state_dict().items() if "_managed_collision_modules" in k}

ref = open_session(load_config(source.run.config), source.run.path, env, vocabs=None, training=False)
ckpt.load_model_weights(source.checkpoint, ref.model)
cfg = load_config(source.run.config, [f"train.init_from={src}"])
check_id_mapping(source, cfg, env.world_size)
warm = open_session(cfg, Path(out) / "warm", env, vocabs=None)
fresh = scores(warm)
record = warm_start_session(warm, source)
mine, theirs = remapping(warm), remapping(ref)
result = {"diff": float((scores(warm) - scores(ref)).abs().max()),
          "fresh_diff": float((fresh - scores(ref)).abs().max()),
          "buffers": sorted(k.rsplit(".", 1)[-1] for k in mine),
          "same": all(torch.equal(mine[k], theirs[k]) for k in mine),
          "keys_match": sorted(mine) == sorted(theirs), "record": record}
(Path(out) / "result.json").write_text(json.dumps(result))
"""


def test_warm_start_carries_the_remapping(evicting_run: Path, dataset: Path, tmp_path: Path) -> None:
    """``--init-from`` a managed run with the same settings: right after loading, the warm-started model scores the
    test split as the source (every raw id on its row, the row's embedding), its remapping buffers (sorted ids, rows,
    LFU counts, iteration) are the source's; then training continues from there."""
    script = tmp_path / "check.py"
    script.write_text(WARM_CHECK)
    proc = subprocess.run([sys.executable, str(script), str(evicting_run), str(tmp_path)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["diff"] <= 1e-7 and result["fresh_diff"] > 1e-3  # the source's scores, not a fresh model's
    assert result["same"] and result["keys_match"]
    assert {"_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts", "_current_iter_tensor"} <= set(
        result["buffers"])
    assert result["record"]["grown_tables"] == {} and result["record"]["step"] == 18
    run = tmp_path / "next"
    train(dataset, run, "--epochs", "1", *EVICTING_SETS, "--set", "train.max_steps_per_epoch=3",
          "--init-from", str(evicting_run), config="configs/mdaf_bst.yaml")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["init_from"]["step"] == 18
    assert np.isfinite(metrics["test"]["auc"])


def test_warm_start_refuses_other_managed_settings_naming_the_key(evicting_run: Path) -> None:
    from mdaf_rec.run_dir import RunDir
    from mdaf_rec.warm_start import InitSource, WarmStartError, check_id_mapping

    source = InitSource(str(evicting_run), RunDir(evicting_run), ckpt.checkpoint_path(evicting_run, "best"))
    config = evicting_run / "config.yaml"
    check_id_mapping(source, load_config(config), 1)
    check_id_mapping(source, load_config(config), 2)  # resharded on load (test_warm_start_reshards_the_remapping)
    for sets, message in (
        (["features.id_spaces.item.rows=512"], r"'features.id_spaces.item.rows': 512 here, 256 in the source"),
        (["features.id_spaces.category.eviction=lru"], r"'features.id_spaces.category.eviction': 'lru' here, 'lfu'"),
        (["features.id_spaces.user.eviction_interval=7"], r"'features.id_spaces.user.eviction_interval': 7 here, 1"),
        (["features.id_mapping=vocab", "features.id_spaces.user.rows=null", "features.id_spaces.item.rows=null",
          "features.id_spaces.category.rows=null"], r"trained with features.id_mapping: managed, this run has vocab"),
    ):
        with pytest.raises(WarmStartError, match=message):
            check_id_mapping(source, load_config(config, sets), 1)
    with_optimizer = load_config(config, [f"train.init_from={evicting_run}", "train.init_optimizer=true"])
    check_id_mapping(source, with_optimizer, 1)
    with pytest.raises(WarmStartError, match=r"'train.init_optimizer': .* trained on 1 processes, this run has 2"):
        check_id_mapping(source, with_optimizer, 2)


def test_resume_on_another_world_size_reshards_the_remapping(dataset: Path, evicting_run: Path, tmp_path: Path) -> None:
    """The 1-process managed run resumed on 2 processes (TorchRec's DCP refuses to reshard the remapping): the model
    loads as a warm start does, remapping resharded, and the epoch goes on from the checkpoint's position."""
    run = tmp_path / "run"
    shutil.copytree(evicting_run, run)
    proc = train(dataset, run, "--epochs", "2", *EVICTING_SETS, config="configs/mdaf_bst.yaml", nproc=2)
    assert "remapping of 1 shards resharded to 2" in proc.stderr and "resuming" in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["world_size"] == 2 and np.isfinite(metrics["test"]["auc"])


def test_eval_stays_on_the_checkpoint_world_size() -> None:
    """``mdaf-rec eval`` loads through DCP, which does not reshard a remapping (2 -> 1 silently loses ids): another
    world size than the checkpoint's is refused in one line."""
    check_remapping_world_size(2, 2, "checkpoint X")
    check_remapping_world_size(None, 1, "checkpoint X")  # not recorded: 1 process
    with pytest.raises(ManagedSettingsError, match=r"checkpoint X: its managed-id remapping was trained on 2 "
                                                   r"processes and is not resharded for 1"):
        check_remapping_world_size(2, 1, "checkpoint X")


# Under torchrun: SOURCE_RUN OUT. A training session warm-started from the source on this world size, its model
# state saved as checkpoint OUT/checkpoints/after (the layout it trains from).
WARM_SAVE = """
import sys
from pathlib import Path
from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import load_config
from mdaf_rec.distributed import init_distributed
from mdaf_rec.train import open_session, warm_start_session
from mdaf_rec.warm_start import check_id_mapping, resolve_source

src, out = sys.argv[1:3]
env = init_distributed()
source = resolve_source(src)
cfg = load_config(source.run.config, [f"train.init_from={src}"])
check_id_mapping(source, cfg, env.world_size)
session = open_session(cfg, Path(out), env, vocabs=None)
warm_start_session(session, source)
ckpt.save_checkpoint(Path(out), "after", {"model": session.model.state_dict()}, {"world_size": env.world_size},
                     is_best=False)
"""


def test_warm_start_reshards_the_remapping(evicting_run: Path, dataset: Path, tmp_path: Path) -> None:
    """``--init-from`` the 1-process managed run on 2 processes: the remapping is resharded on load. Every id keeps
    its embedding (on a row of the shard that now owns it), but the few for which that shard had no room (they
    lose their row, as an evicted id); ids without a row keep the miss row's embedding; dense weights as trained."""
    script = tmp_path / "warm.py"
    script.write_text(WARM_SAVE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), str(evicting_run), str(tmp_path / "warm")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    source, source_maps = _unsharded_run(evicting_run)
    cfg = load_config(evicting_run / "config.yaml")
    warm = build_train_module(cfg, {}, table_device="cpu", dense_device="cpu", compute_device="cpu",
                              with_sparse_optimizer=False).module
    ckpt.load_model_weights(tmp_path / "warm" / "checkpoints" / "after", warm)
    warm_maps = frozen_id_maps(warm, 2)
    old, new = source.state_dict(), warm.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if "managed_ids" not in k)
    train_split = pq.read_table(dataset / "train.parquet")
    ids = {space: np.concatenate([train_split.column(f"{space}_id").to_numpy()] + (
        [pc.list_flatten(train_split.column(f"{space}_history")).to_numpy()] if space != "user" else []))
        for space in ("user", "item", "category")}  # every id the source trained on
    for space, raw in ids.items():
        raw = torch.from_numpy(np.unique(np.asarray(raw)))
        table = f"managed_{space}"
        weight = next(k for k in old if k.endswith(f"embeddings.{table}.weight"))
        before, after = source_maps[table](raw), warm_maps[table](raw)
        had, has = before != source_maps[table].miss_rows[0], ~torch.isin(after, warm_maps[table].miss_rows)
        assert not bool((has & ~had).any())  # no id gains a row
        # the ids of a shard beyond its rows - 1 lose theirs (a full table splits unevenly: a few)
        layout = warm_maps[table].layout
        shards = torch.bincount((hash_ids(raw[had]) // layout.bucket_size) // layout.buckets_per_shard, minlength=2)
        capacity = int(warm_maps[table].miss_rows[0])  # a shard's rows but its miss row (shard 0: rows [0, R/2))
        assert int(has.sum()) == int(shards.clamp(max=capacity).sum()) and int(has.sum()) > 0.3 * len(raw), space
        assert torch.equal(new[weight][after[has]], old[weight][before[has]]), space
        assert torch.equal(new[weight][after[~had]], old[weight][before[~had]]), space  # the miss row's embedding
