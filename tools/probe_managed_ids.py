"""What of TorchRec's managed-collision stack runs here: a DMP-sharded MC-EC trained, saved and reloaded by DCP.

Run under torchrun (gloo, CPU). ``--save DIR`` trains a ``ManagedCollisionEmbeddingCollection`` (one table of
``--rows`` rows in 2 buckets, LFU eviction, hashed raw ids,
:class:`~mdaf_rec.managed_ids.ManagedEmbeddingCollectionSharder`, fused row-wise Adagrad) for ``--steps`` global
batches of skewed raw 63-bit ids, each rank taking its slice, writes the model's state with DCP to ``DIR/ckpt``
and the eval-mode rows of a fixed probe set of ids to ``DIR/rows.json``, then reloads the checkpoint into a fresh
sharded model and counts the probe ids it maps to the same row (the exact-resume check). ``--load DIR`` builds
the same model on this world size, loads ``DIR/ckpt`` with DCP and compares its rows for the probe ids with
``DIR/rows.json`` (another world size: the resharding check). ``--frozen DIR`` (plain ``python``, no torchrun)
loads ``DIR/ckpt`` into the unsharded model and compares :class:`~mdaf_rec.managed_ids.FrozenIdMap` (the
serving remap) with ``DIR/rows.json``. One line of JSON per run on rank 0.

``torchrun --nproc_per_node=1 tools/probe_managed_ids.py --save /tmp/p1``, then
``torchrun --nproc_per_node=2 tools/probe_managed_ids.py --load /tmp/p1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional, Tuple

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


def sharded(rows: int, world: int) -> DistributedModelParallel:
    """A fresh model (seeded), planned and sharded by DMP with the project's MC-EC sharder."""
    torch.manual_seed(0)
    model = Lookup(rows, torch.device("meta"))
    _apply_optimizer_in_backward(RowWiseAdagrad, list(model.mc_ec._embedding_module.parameters()), {"lr": 0.1})
    sharder = ManagedEmbeddingCollectionSharder()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), batch_size=BATCH)
    plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
    return DistributedModelParallel(model, device=CPU, plan=plan, sharders=[sharder])


def load(dmp: DistributedModelParallel, folder: Path) -> None:
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=str(folder / "ckpt"))
    dmp.load_state_dict(state)


def probe_rows(dmp: DistributedModelParallel, rank: int, world: int) -> Tuple[List[int], List[int]]:
    """The probe ids (those seen in training, and some not) and their rows in ``eval()``, all ranks together."""
    dmp.eval()
    probe = torch.unique(raw_ids(10_000, 4096))
    probe = probe[: len(probe) // world * world]
    mine = probe[rank * (len(probe) // world) : (rank + 1) * (len(probe) // world)]
    with torch.no_grad():
        _, remapped = dmp(kjt(mine))
    rows = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(rows, remapped.values())
    return probe.tolist(), torch.cat(rows).tolist()


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
    dmp = sharded(args.rows, world)
    if args.save:
        per_rank = BATCH // world
        for step in range(args.steps):
            loss, _ = dmp(kjt(raw_ids(step, BATCH)[rank * per_rank : (rank + 1) * per_rank]))
            loss.backward()
        dcp.save(dmp.state_dict(), checkpoint_id=str(args.save / "ckpt"))
        ids, rows = probe_rows(dmp, rank, world)
        reloaded = sharded(args.rows, world)
        load(reloaded, args.save)
        _, rows_reloaded = probe_rows(reloaded, rank, world)
        if rank == 0:
            (args.save / "rows.json").write_text(json.dumps({"ids": ids, "rows": rows, "world": world}))
            print(json.dumps({"saved_world": world, "probe_ids": len(ids), "distinct_rows": len(set(rows)),
                              "reloaded_same_row": sum(a == b for a, b in zip(rows, rows_reloaded))}))
    else:
        load(dmp, args.load)
        ids, rows = probe_rows(dmp, rank, world)
        if rank == 0:
            saved = json.loads((args.load / "rows.json").read_text())
            same = sum(a == b for a, b in zip(saved["rows"], rows)) if saved["ids"] == ids else 0
            print(json.dumps({"saved_world": saved["world"], "loaded_world": world, "probe_ids": len(ids),
                              "same_row": same}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
