"""Cost of managed ids vs a vocabulary, on the id-mapping and table part of a training step (one process, CPU).

Both ways train the same table (rows = the number of distinct ids, so nothing is evicted for lack of room) on the
same batches of raw 63-bit ids (``--batch-size`` samples of one target and ``--history`` history ids, Zipf-like
over ``--ids`` distinct ids), with DMP (world size 1, gloo) and a fused row-wise Adagrad:

* ``vocab`` — the host maps raw ids to rows with a :class:`~mdaf_rec.data.vocab.Vocabulary` (sorted ids, binary
  search: 63-bit ids are too large for its direct table), then an ``EmbeddingCollection`` looks them up;
* ``managed`` — the raw ids go into a ``ManagedCollisionEmbeddingCollection`` (LFU, :mod:`mdaf_rec.managed_ids`),
  which remaps them inside the model; an admission/eviction round (sorting the table's id, row and counter
  arrays) every ``--intervals`` steps (1: resume is exact from any checkpoint; 8, 64).

The history is read two ways (``--histories``): ``sequence`` — one row per history id, as the sequence models
read it (both mappings look up through an ``EmbeddingCollection``); ``pooled`` — mean-pooled, as ``dnn`` /
``dcnv3`` read it: ``vocab`` pools in an ``EmbeddingBagCollection`` (MEAN), ``managed`` looks the rows up
through the MC-EC and pools them by hand (``models.embeddings._mean_rows``), which is what ``dnn`` does under
each mapping. A step is: id mapping, lookup, ``sum(out²)`` backward (the fused optimizer updates the rows). This
is the part of a training step the mapping changes; the dense model is the same in both. ``--ids`` takes several
table sizes. Prints a markdown table of samples/s and the mapping state's host bytes per id; ``--mode`` /
``--intervals`` run one way only (to read each one's peak RSS with ``/usr/bin/time -v``). ``--out FILE`` replaces
the ``## Managed ids vs vocabulary`` section of that file.

``python tools/bench_managed_ids.py --threads 1 --ids 40000 1000000 --out docs/benchmarks.md``
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import ManagedCollisionCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_rec.data.vocab import SpaceSettings, Vocabulary
from mdaf_rec.features import NUM_RESERVED_INDICES
from mdaf_rec.managed_ids import ManagedEmbeddingCollectionSharder, managed_collision_module
from mdaf_rec.models.embeddings import _mean_rows

CPU = torch.device("cpu")
DIM = 64
SECTION = "## Managed ids vs vocabulary (tools/bench_managed_ids.py)"


class Lookup(nn.Module):
    """``kjt -> sum(out²)`` through an EC, or an MC-EC when ``managed``; with ``pooled`` the history's rows are
    mean-pooled (``vocab``: by an EBC; ``managed``: by hand, as ``dnn`` under each mapping)."""

    def __init__(self, rows: int, managed: bool, eviction_interval: int, pooled: bool, history: int) -> None:
        super().__init__()
        self.managed, self.pooled, self.history = managed, pooled, history
        meta = torch.device("meta")
        self.ec: nn.Module
        if pooled and not managed:
            bags = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=rows,
                                       feature_names=["item", "history"], pooling=PoolingType.MEAN)]
            self.ec = EmbeddingBagCollection(tables=bags, device=meta)
            return
        tables = [
            EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=rows, feature_names=["item", "history"])
        ]
        self.ec = EmbeddingCollection(tables=tables, device=meta)
        if managed:
            mch = managed_collision_module(rows, "lfu", eviction_interval, CPU, "t")
            mcc = ManagedCollisionCollection({"t": mch}, tables)
            self.ec = ManagedCollisionEmbeddingCollection(self.ec, mcc)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = self.ec(kjt)
        if self.pooled and not self.managed:  # KeyedTensor of [B, DIM] per key
            return out["item"].square().sum() + out["history"].square().sum()
        jagged = out[0] if self.managed else out
        history = _mean_rows(jagged["history"], self.history) if self.pooled else jagged["history"].values()
        return jagged["item"].values().square().sum() + history.square().sum()


def sharded(rows: int, managed: bool, eviction_interval: int, pooled: bool, history: int) -> DistributedModelParallel:
    torch.manual_seed(0)
    model = Lookup(rows, managed, eviction_interval, pooled, history)
    tables = [p for n, p in model.named_parameters() if "embeddings" in n]
    _apply_optimizer_in_backward(RowWiseAdagrad, tables, {"lr": 0.05})
    sharders = [ManagedEmbeddingCollectionSharder()] if managed else get_default_sharders()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), batch_size=1024)
    plan = planner.plan(model, sharders)
    return DistributedModelParallel(model, device=CPU, plan=plan, sharders=sharders)


def batches(ids: np.ndarray, batch_size: int, history: int, count: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``count`` batches of (targets ``[B]``, histories ``[B * history]``) raw ids, Zipf-like (exponent 1.1)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        pick = np.minimum(rng.zipf(1.1, batch_size * (1 + history)) - 1, len(ids) - 1)
        raw = ids[pick]
        out.append((raw[:batch_size], raw[batch_size:]))
    return out


def kjt(targets: np.ndarray, histories: np.ndarray, history: int) -> KeyedJaggedTensor:
    lengths = np.concatenate([np.ones(len(targets)), np.full(len(targets), history)]).astype(np.int32)
    return KeyedJaggedTensor.from_lengths_sync(
        ["item", "history"], torch.from_numpy(np.concatenate([targets, histories])), torch.from_numpy(lengths)
    )


def run(
    mode: str, ids: np.ndarray, data: List[Tuple[np.ndarray, np.ndarray]], history: int, eviction_interval: int = 1,
    pooled: bool = False,
) -> Dict[str, float]:
    """Trains one pass over ``data`` (after 2 warm-up steps); samples/s and mapping bytes per distinct id."""
    managed = mode == "managed"
    rows = len(ids) + (1 if managed else NUM_RESERVED_INDICES)  # managed: + the miss row; vocab: padding, OOV
    dmp = sharded(rows, managed, eviction_interval, pooled, history)
    vocab = None if managed else Vocabulary(SpaceSettings("item", "item_id", "item_history", None), np.sort(ids))

    def step(targets: np.ndarray, histories: np.ndarray) -> None:
        if vocab is not None:
            targets, histories = vocab.lookup(targets), vocab.lookup(histories)
        dmp(kjt(targets, histories, history)).backward()

    for targets, histories in data[:2]:
        step(targets, histories)
    start = time.perf_counter()
    for targets, histories in data[2:]:
        step(targets, histories)
    seconds = time.perf_counter() - start
    if managed:
        mch = dmp.module.ec._managed_collision_collection._managed_collision_modules["t"]
        state = sum(b.numel() * b.element_size() for n, b in mch.named_buffers() if n.startswith("_mch_"))
    else:
        state = vocab.ids.nbytes
    samples = sum(len(t) for t, _ in data[2:])
    return {"samples_per_s": samples / seconds, "bytes_per_id": state / len(ids)}


def write_section(path: str, text: str) -> None:
    with open(path) as f:
        doc = f.read()
    if SECTION in doc:
        start = doc.index(SECTION)
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[end:] if end >= 0 else "\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(doc)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", type=int, nargs="+", default=[40_000, 1_000_000],
                   help="distinct raw ids (= table rows), one table size after the other")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=["both", "vocab", "managed"], default="both")
    p.add_argument("--intervals", type=lambda v: [int(i) for i in v.split(",")], default=[1, 8, 64],
                   help="managed: eviction intervals to run, comma-separated")
    p.add_argument("--histories", nargs="+", choices=["sequence", "pooled"], default=["sequence", "pooled"],
                   help="how the history is read: a row per id (sequence models) or mean-pooled (dnn)")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    results = []  # (table rows, history, mapping, result)
    for count in args.ids:
        rng = np.random.default_rng(1)
        ids = np.unique(rng.integers(1 << 40, (1 << 63) - 1, size=count, dtype=np.int64))
        data = batches(ids, args.batch_size, args.history, args.steps + 2)
        for history in args.histories:
            pooled = history == "pooled"
            ways = ([("vocab", 1)] if args.mode in ("both", "vocab") else []) + (
                [("managed", i) for i in args.intervals] if args.mode in ("both", "managed") else [])
            for mode, interval in ways:
                name = "vocab" if mode == "vocab" else f"managed, eviction interval {interval}"
                results.append((len(ids), history, name, run(mode, ids, data, args.history, interval, pooled)))
                print(f"{len(ids):,} {history} {name}: {results[-1][3]['samples_per_s']:,.0f} samples/s", flush=True)
    command = shlex.join(["python", "tools/bench_managed_ids.py", *sys.argv[1:]])
    lines = [
        SECTION,
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"{args.threads} thread(s); torch {torch.__version__}; {time.strftime('%Y-%m-%d')}. One table of N rows x "
        f"{DIM} and N distinct 63-bit raw ids (Zipf 1.1), batches of {args.batch_size} samples x "
        f"(1 + {args.history}) ids, {args.steps} timed steps of id mapping + lookup + backward with fused "
        f"row-wise Adagrad (DMP, world size 1). Same process, same batches. `{command}`.",
        "",
        "| table rows N | history | mapping | samples/s | mapping state, bytes per id |",
        "|---:|---|---|---:|---:|",
    ]
    for rows, history, mode, r in results:
        lines.append(f"| {rows:,} | {history} | {mode} | {r['samples_per_s']:,.0f} | {r['bytes_per_id']:.0f} |")
    lines += [
        "",
        "Only the id mapping and the table differ between the two; the dense model is the same and not run here. "
        "`vocab` holds the sorted raw ids on the host (8 bytes per id, a numpy array, no dict) and maps by binary "
        "search; `managed` holds, in the model, the sorted hashed ids, their rows and the LFU counters (8 bytes "
        "each per row); an admission/eviction round, which sorts those table-sized arrays, runs every "
        "interval-th step. `pooled`: `vocab` pools in an EBC, `managed` looks every history id up through the "
        "MC-EC (FBGEMM's non-pooled backward) and pools by hand, as `dnn` does under each mapping.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_section(args.out, text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
