"""Models wrapped by DistributedModelParallel (world size 1, CPU, gloo) train with fused tables."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import random_batch, small_spec
from mdaf_rec.config import ModelConfig, OptimizerConfig
from mdaf_rec.models.ctr import CTRTrain
from mdaf_rec.models.factory import build_model
from mdaf_rec.sharding import apply_sparse_optimizer, build_optimizer, plan_sharding, shard_model


@pytest.fixture()
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["mdaf_mamba", "mdaf_bst"])
def test_dmp_model_trains_a_step(name: str, process_group) -> None:
    torch.manual_seed(0)
    spec = small_spec()
    device = torch.device("cpu")
    train = CTRTrain(build_model(spec, ModelConfig(name=name), table_device="meta"))
    optim_cfg = OptimizerConfig(sparse="rowwise_adagrad", sparse_lr=0.1, lr=1e-2)
    apply_sparse_optimizer(train, optim_cfg, device)
    plan = plan_sharding(
        train, world_size=1, local_world_size=1, compute_device="cpu", batch_size=32, process_group=process_group
    )
    model = shard_model(train, device, plan)
    optimizer = build_optimizer(model, optim_cfg)
    batch = random_batch(spec, batch_size=32, seed=5)

    tables = {k: _local(v).clone() for k, v in model.state_dict().items() if "embedding" in k and "weight" in k}
    assert {k.rsplit(".", 2)[-2] for k in tables} >= {"static_item", "sequence_item", "sequence_category"}
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss, out = model(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    after = {k: _local(v) for k, v in model.state_dict().items()}
    # The fused optimizer updated exactly the table rows the batch touched.
    item_ids = batch.static_features["item"].values().unique()
    key = next(k for k in tables if k.endswith("static_item.weight"))
    changed = (after[key] != tables[key]).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, item_ids.sort().values)
    hist = batch.sequence_features.to_dict()
    seq_ids = torch.cat([hist["item"].values(), hist["item_history"].values()]).unique()
    key = next(k for k in tables if k.endswith("sequence_item.weight"))
    changed = (after[key] != tables[key]).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, seq_ids.sort().values)


def _local(t):
    """The local tensor of a (world-size-1) ShardedTensor, or the tensor itself."""
    return t.local_shards()[0].tensor if hasattr(t, "local_shards") else t


def test_fused_adam_is_refused_on_cpu() -> None:
    train = CTRTrain(build_model(small_spec(), ModelConfig(name="dcnv3"), table_device="meta"))
    with pytest.raises(ValueError, match="optimizer.sparse.*'adam'.*GPU"):
        apply_sparse_optimizer(train, OptimizerConfig(sparse="adam"), torch.device("cpu"))


def test_dense_optimizer_decays_weight_matrices_only(process_group) -> None:
    """Biases, LayerNorms, position tables, Mamba's ``D`` (1-d) and ``A_log`` (marked ``_no_weight_decay``)
    sit in the dense optimizer's no-decay group, and a step with zero gradients leaves exactly them unmoved."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    for name in ("mdaf_mamba", "mdaf_bst"):
        train = CTRTrain(build_model(small_spec(), ModelConfig(name=name), table_device="meta"))
        optim_cfg = OptimizerConfig(weight_decay=0.1, lr=1e-2)
        apply_sparse_optimizer(train, optim_cfg, device)
        plan = plan_sharding(train, world_size=1, local_world_size=1, compute_device="cpu", batch_size=32,
                             process_group=process_group)
        model = shard_model(train, device, plan)
        optimizer = build_optimizer(model, optim_cfg)
        dense = optimizer.optimizers[-1][1]  # [fused tables, dense]
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in dense.param_groups}
        assert set(groups) == {0.1, 0.0}
        decayed, kept = groups[0.1], groups[0.0]
        assert not decayed & kept and decayed | kept == set(dense.params)
        assert all(n.endswith(".weight") and "norm" not in n for n in decayed), sorted(decayed)
        assert {n for n in decayed | kept if n.endswith(".bias")} <= kept
        assert any(n.endswith("fusion.gate.weight") for n in decayed)
        assert any(n.endswith("fusion.gate.bias") for n in kept)
        if name == "mdaf_mamba":
            assert {n.rsplit(".", 1)[1] for n in kept} >= {"A_log", "D", "bias", "weight"}
            assert any(n.endswith("mamba.in_proj.weight") for n in decayed)
            assert not any(n.endswith(("A_log", ".D")) for n in decayed)
        else:
            assert any(n.endswith("position.weight") for n in kept)
        # Zero gradients: Adam's L2 term alone moves the decayed weights, nothing else.
        params = dict(model.named_parameters())
        before = {n: params[n].detach().clone() for n in decayed | kept}
        for n in decayed | kept:
            params[n].grad = torch.zeros_like(params[n])
        dense.step()
        moved = {n for n in before if not torch.equal(params[n].detach(), before[n])}
        assert moved == decayed


def test_the_planner_at_train_time_gets_this_machines_memory(monkeypatch, caplog, tmp_path) -> None:
    """``open_session`` plans with this machine's memory per rank (host memory / local ranks; on CUDA the GPU's,
    below) or ``planning.hbm_gb`` / ``planning.ddr_gb``, never TorchRec's 32 GiB HBM / 128 GiB DDR defaults."""
    import logging
    import os

    from mdaf_rec import train as train_mod
    from mdaf_rec.config import Config
    from mdaf_rec.data.dataset import Dataset
    from mdaf_rec.data.synth import generate
    from mdaf_rec.data.vocab import Vocabularies
    from mdaf_rec.distributed import DistEnv

    gib = 1024**3
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    class Planned(Exception):
        pass

    def planner(module, **kwargs):
        raise Planned(kwargs)

    monkeypatch.setattr(train_mod, "plan_sharding", planner)
    monkeypatch.setattr(train_mod, "_validated", lambda *args: None)  # no process group here (world size 2 faked)
    generate(tmp_path, rows=400, users=30, items=60, categories=5, max_history=5, seed=0)
    cfg = Config()
    cfg.data.path = str(tmp_path)
    cfg.model.name = "dcnv3"
    vocabs = Vocabularies.load_or_build(Dataset.open(tmp_path), cfg.features)
    env = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu"), backend="gloo")
    for hbm_gb, ddr_gb, hbm, ddr in ((None, None, None, host // 2), (40.0, 64.0, 40 * gib, 64 * gib)):
        cfg.planning.hbm_gb, cfg.planning.ddr_gb = hbm_gb, ddr_gb
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mdaf_rec.sharding"), pytest.raises(Planned) as planned:
            train_mod.open_session(cfg, tmp_path / "run", env, vocabs=vocabs)
        kwargs = planned.value.args[0]
        assert (kwargs["hbm_cap"], kwargs["ddr_cap"]) == (hbm, ddr)
        assert f"planner topology per rank: HBM {'-' if hbm is None else '40.0 GiB'}" in caplog.text


def test_planner_memory_reads_the_gpu(monkeypatch, caplog) -> None:
    import logging
    import os
    import types

    from mdaf_rec.sharding import planner_memory

    gib = 1024**3
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=141 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    with caplog.at_level(logging.INFO, logger="mdaf_rec.sharding"):
        assert planner_memory(torch.device("cuda", 3), 8) == (141 * gib, host // 8)
    assert "HBM 141.0 GiB (NVIDIA H200)" in caplog.text and "/ 8 ranks" in caplog.text
    assert planner_memory(torch.device("cuda", 3), 8, hbm_gb=70.5) == (int(70.5 * gib), host // 8)
