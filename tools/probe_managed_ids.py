"""What of TorchRec's managed-collision stack runs here: a DMP-sharded MC-EC trained, saved and reloaded by DCP.

Run under torchrun (gloo, CPU). ``--save DIR`` trains an ``ManagedCollisionEmbeddingCollection`` (one table of
``--rows`` rows in 2 buckets, LFU eviction, hashed raw ids, :class:`~mdaf_rec.managed_ids.ManagedEmbeddingCollectionSharder`,
fused row-wise Adagrad) for ``--steps`` global batches of skewed raw 63-bit ids, each rank taking its slice,
writes the model's state with DCP to ``DIR/ckpt`` and the eval-mode rows of a fixed probe set of ids to
``DIR/rows.json``. ``--load DIR`` builds the same model on this world size, loads ``DIR/ckpt`` with DCP and
compares its rows for the probe ids with ``DIR/rows.json`` (same world size: the exact-resume check; another
world size: the resharding check). ``--frozen DIR`` (plain ``python``, no torchrun) loads ``DIR/ckpt`` into the
unsharded model and compares :class:`~mdaf_rec.managed_ids.FrozenIdMap` (the serving remap) with ``DIR/rows.json``.
One line of JSON per run on rank 0.

``torchrun --nproc_per_node=1 tools/probe_managed_ids.py --save /tmp/p1``, then
``torchrun --nproc_per_node=2 tools/probe_managed_ids.py --load /tmp/p1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_rec.managed_ids import FrozenIdMap, ManagedEmbeddingCollectionSharder, managed_collision_module

CPU = torch.device("cpu")
BATCH = 64  # global ids per step


class Lookup(nn.Module):
    """One managed table; returns a loss and the remapped ids."""

    def __init__(self, rows: int, device: torch.device) -> None:
        super().__init__()
        tables = [EmbeddingConfig(name="t", embedding_dim=8, num_embeddings=rows, feature_names=["f"])]
        self.mc_ec = ManagedCollisionEmbeddingCollection(
            EmbeddingCollection(tables=tables, device=device),
            ManagedCollisionCollection({"t": managed_collision_module(rows, "lfu", 1, CPU, "t", buckets=2)}, tables),
            return_remapped_features=True,
        )

    def forward(self, kjt: KeyedJaggedTensor):
        embeddings, remapped = self.mc_ec(kjt)
        return embeddings["f"].values().square().sum(), remapped


def raw_ids(step: int, n: int) -> torch.Tensor:
    """``[n]`` skewed raw ids (a few hundred distinct, Zipf-like), large 63-bit values."""
    g = torch.Generator().manual_seed(step)
    rank = (torch.rand(n, generator=g) ** 3 * 400).long()
    return rank * 1_000_003 + (1 << 60)


def kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.ones(len(ids), dtype=torch.int32))


def frozen_check(folder: Path, rows: int) -> None:
    """Loads ``folder/ckpt`` into the unsharded model, freezes its remapping with the shard boundaries the checkpoint
    records, and compares the frozen rows of the probe ids with those the sharded model gave."""
    model = Lookup(rows, CPU)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(folder / "ckpt"), no_dist=True)
    prefix = "mc_ec._managed_collision_collection._managed_collision_modules.t."
    segments = [int(s) for s in state[prefix + "_output_segments_tensor"] if s >= 0]
    model.load_state_dict(state)
    frozen = FrozenIdMap(model.mc_ec._managed_collision_collection._managed_collision_modules["t"], segments)
    saved = json.loads((folder / "rows.json").read_text())
    got = frozen(torch.tensor(saved["ids"])).tolist()
    print(json.dumps({"saved_world": saved["world"], "segments": segments, "probe_ids": len(got),
                      "same_row": sum(a == b for a, b in zip(saved["rows"], got))}))


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--save", type=Path)
    p.add_argument("--load", type=Path)
    p.add_argument("--frozen", type=Path, help="check FrozenIdMap against DIR/rows.json (1 process, no torchrun)")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.frozen:
        frozen_check(args.frozen, args.rows)
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Lookup(args.rows, torch.device("meta"))
    _apply_optimizer_in_backward(RowWiseAdagrad, list(model.mc_ec._embedding_module.parameters()), {"lr": 0.1})
    sharder = ManagedEmbeddingCollectionSharder()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), batch_size=BATCH)
    plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
    dmp = DistributedModelParallel(model, device=CPU, plan=plan, sharders=[sharder])
    per_rank = BATCH // world
    if args.save:
        for step in range(args.steps):
            loss, _ = dmp(kjt(raw_ids(step, BATCH)[rank * per_rank : (rank + 1) * per_rank]))
            loss.backward()
        dcp.save(dmp.state_dict(), checkpoint_id=str(args.save / "ckpt"))
    else:
        state = dmp.state_dict()
        dcp.load(state, checkpoint_id=str(args.load / "ckpt"))
        dmp.load_state_dict(state)
    dmp.eval()
    probe = torch.unique(raw_ids(10_000, 4096))  # the ids seen in training, and some not
    probe = probe[: len(probe) // world * world]
    mine = probe[rank * (len(probe) // world) : (rank + 1) * (len(probe) // world)]
    with torch.no_grad():
        _, remapped = dmp(kjt(mine))
    rows = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(rows, remapped.values())
    rows_all = torch.cat(rows).tolist()
    if rank == 0:
        if args.save:
            (args.save / "rows.json").write_text(json.dumps({"ids": probe.tolist(), "rows": rows_all, "world": world}))
            print(json.dumps({"saved_world": world, "probe_ids": len(probe), "distinct_rows": len(set(rows_all))}))
        else:
            saved = json.loads((args.load / "rows.json").read_text())
            same = sum(a == b for a, b in zip(saved["rows"], rows_all)) if saved["ids"] == probe.tolist() else 0
            print(json.dumps({"saved_world": saved["world"], "loaded_world": world, "probe_ids": len(probe),
                              "same_row": same}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
