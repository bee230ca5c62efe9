"""The one builder of the trainable module: checkpoint keys shared by DMP and the unsharded module, and an
evaluation module without fused-optimizer state (world size 1, CPU, gloo)."""

from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.types import ShardedTensor

from mdaf_rec.config import load_config
from mdaf_rec.sharding import plan_sharding, shard_model
from mdaf_rec.trainable import build_train_module

SIZES: Dict[str, int] = {"user": 60, "item": 300, "category": 25}
SMALL = ["features.sequence_dim=8", "features.static_dim=4", "features.max_history=6", "model.head_hidden=[8]",
         "model.bst.num_heads=2", "optimizer.sparse=adagrad"]


@pytest.fixture()
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _sharded(cfg, with_sparse_optimizer: bool, process_group):
    module = build_train_module(cfg, SIZES, table_device="meta", dense_device="cpu", compute_device="cpu",
                                with_sparse_optimizer=with_sparse_optimizer).module
    plan = plan_sharding(module, world_size=1, local_world_size=1, compute_device="cpu", batch_size=16,
                         process_group=process_group)
    return shard_model(module, torch.device("cpu"), plan), plan


def _state_elements(optimizer) -> int:
    """Number of optimizer-state values (table rows' accumulators etc.) held by ``optimizer``."""
    total = 0
    for entry in optimizer.state_dict()["state"].values():
        for value in entry.values():
            if isinstance(value, ShardedTensor):
                total += sum(shard.tensor.numel() for shard in value.local_shards())
            elif isinstance(value, torch.Tensor):
                total += value.numel()
    return total


@pytest.mark.parametrize("name", ["mdaf_mamba", "mdaf_bst", "dcnv3"])
def test_unsharded_module_has_the_keys_of_the_dmp_checkpoint(name: str, process_group) -> None:
    """Export loads a training checkpoint (DMP's state dict) into an unsharded CTRTrain by key."""
    cfg = load_config(name, SMALL)
    dmp, _ = _sharded(cfg, True, process_group)
    unsharded = build_train_module(cfg, SIZES, table_device="cpu", dense_device="cpu", compute_device="cpu",
                                   with_sparse_optimizer=False).module
    dmp_keys, plain_keys = set(dmp.state_dict()), set(unsharded.state_dict())
    assert dmp_keys == plain_keys, (sorted(dmp_keys - plain_keys)[:5], sorted(plain_keys - dmp_keys)[:5])
    assert all(k.startswith("model.") for k in plain_keys)
    tables = [k for k in plain_keys if "embedding_bags" in k or "embedding_collection" in k]
    assert len(tables) >= 5, tables  # the tables (sharded under DMP) are among the matching keys


def test_evaluation_module_shards_with_fused_kernels_and_holds_no_optimizer_state(process_group) -> None:
    cfg = load_config("mdaf_mamba", SMALL)
    trained, train_plan = _sharded(cfg, True, process_group)
    evaluated, eval_plan = _sharded(cfg, False, process_group)

    def kernels(plan) -> Dict[str, str]:
        return {t: s.compute_kernel for m in plan.plan.values() for t, s in m.items()}

    fused = {t: k for t, k in kernels(eval_plan).items() if k == "fused"}
    assert fused and fused == {t: k for t, k in kernels(train_plan).items() if k == "fused"}
    # Adagrad keeps one accumulator per weight of a fused table: the training module holds them (4140 here),
    # the evaluation module none.
    fused_weights = sum(math.prod(shard.shard_sizes) for m in train_plan.plan.values() for s in m.values()
                        if s.compute_kernel == "fused" for shard in s.sharding_spec.shards)
    assert fused_weights == 60 * 4 + 300 * 4 + 25 * 4 + 300 * 8 + 25 * 8
    assert _state_elements(trained.fused_optimizer) == fused_weights
    assert _state_elements(evaluated.fused_optimizer) == 0


@pytest.mark.parametrize("d_conv, device, ok", [(5, "cuda", False), (1, "cuda", False), (4, "cuda", True),
                                                (2, "cuda", True), (5, "cpu", True)])
def test_mamba_d_conv_outside_2_to_4_is_refused_for_cuda(d_conv: int, device: str, ok: bool) -> None:
    """causal-conv1d's CUDA kernel takes widths 2..4: a config that would fail there is refused naming the key
    (checked on the meta device, nothing is allocated); the CPU path runs any width."""
    from mdaf_rec.config import ConfigError

    cfg = load_config("configs/mdaf_mamba.yaml", [f"model.mamba.d_conv={d_conv}"])
    build = lambda: build_train_module(cfg, {"user": 10, "item": 10, "category": 5}, table_device="meta",  # noqa: E731
                                       dense_device="meta", compute_device=device, with_sparse_optimizer=False)
    if ok:
        build()
    else:
        with pytest.raises(ConfigError, match=rf"model.mamba.d_conv.*{d_conv} is not supported on CUDA.*2 to 4"):
            build()
