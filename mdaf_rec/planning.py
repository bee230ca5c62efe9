"""``mdaf-rec plan``: the TorchRec planner for a topology, without data, GPUs or a process group.

The model's tables are built on ``meta`` at ``cfg.planning.vocab_sizes`` (the Taobao set-up by default),
the configured fused table optimizer is attached (its state counts towards memory), and
:func:`mdaf_rec.sharding.plan_sharding` runs the planner for ``world_size`` ranks on ``nodes`` hosts. The
planner only *estimates* (storage from table shapes, perf from its cost model), so GPU topologies are
planned on a CPU machine. Printed: per table the sharding type, compute kernel and ranks; per rank the
HBM/DDR use and the estimated compute/communication time, computed as TorchRec's ``EmbeddingStats`` does
(shard storage and perf summed per rank, plus the planner's dense and input reservations).

``--json OUT`` writes the plan with :func:`mdaf_rec.plan_io.save_plan` (``mdaf-rec train --plan OUT``
reads it) with the per-rank summary under the extra key ``planner_summary``. ``--sweep --out DIR`` runs
the planner over world sizes x sharding choices and writes ``sweep.csv`` and ``sweep.png``.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.stats import _compute_mem_usage_and_perf, _compute_storage
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    PlannerError,
    ShardingOption,
    Stats,
    StorageReservation,
)
from torchrec.distributed.types import ShardingPlan, ShardingType

from mdaf_rec.config import Config, ConfigError
from mdaf_rec.errors import UserError
from mdaf_rec.plan_io import save_plan
from mdaf_rec.plots import plot_sweep
from mdaf_rec.sharding import plan_sharding, sharders, table_configs
from mdaf_rec.trainable import build_train_module

logger = logging.getLogger(__name__)

GB = 1024**3
SHARDING_TYPES = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS = tuple(k.value for k in EmbeddingComputeKernel)
SWEEP_WORLD_SIZES = (1, 2, 4, 8, 16, 64)
SWEEP_CHOICES = ("auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


class PlanningError(UserError, ValueError):
    """The tables cannot be planned for the topology (the message names tables and memory)."""


# --------------------------------------------------------------------------------------------------
# Topology and model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopologySpec:
    """The cluster to plan for.

    Attributes:
        world_size: ranks in all.
        nodes: hosts; ``world_size / nodes`` ranks per host.
        device: ``cuda`` or ``cpu``.
        hbm_gb / ddr_gb: per-rank device / host memory in GiB (planner defaults when ``None``).
        batch_size: GLOBAL batch size (as ``train.batch_size``); each rank plans with its share.
    """

    world_size: int
    nodes: int
    device: str
    hbm_gb: Optional[float]
    ddr_gb: Optional[float]
    batch_size: int

    @property
    def local_world_size(self) -> int:
        return self.world_size // self.nodes

    @property
    def per_rank_batch(self) -> int:
        return max(1, self.batch_size // self.world_size)

    def caps(self) -> Dict[str, Optional[int]]:
        """``hbm_cap`` / ``ddr_cap`` in bytes for :class:`Topology` (``None``: the planner's default)."""
        return {"hbm_cap": _bytes(self.hbm_gb), "ddr_cap": _bytes(self.ddr_gb)}

    def validate(self) -> None:
        if self.world_size < 1 or self.nodes < 1 or self.world_size % self.nodes:
            raise ConfigError(f"--world-size {self.world_size} must be a positive multiple of --nodes {self.nodes}")


def _bytes(gb: Optional[float]) -> Optional[int]:
    return None if gb is None else int(gb * GB)


def planning_model(cfg: Config, device: str) -> nn.Module:
    """The training module (``CTRTrain``, as ``mdaf-rec train`` shards it) with tables on ``meta`` at
    ``cfg.planning.vocab_sizes`` and the fused table optimizer attached."""
    return build_train_module(cfg, cfg.planning.vocab_sizes, table_device="meta", dense_device="meta",
                              compute_device=device, with_sparse_optimizer=True).module


def table_sharding_types(model: nn.Module, device: str) -> Dict[str, List[str]]:
    """Table name -> sharding types its module's sharder supports on ``device``."""
    by_type = {s.module_type: s for s in sharders()}
    tables: Dict[str, List[str]] = {}
    for module, configs in table_configs(model):
        allowed = by_type[type(module)].sharding_types(device)
        tables.update({c.name: list(allowed) for c in configs})
    return tables


# --------------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------------


def parse_constraints(data: Any, tables: Mapping[str, Sequence[str]], source: str) -> Dict[str, ParameterConstraints]:
    """``{table: {sharding_types: [...], compute_kernels: [...]}}`` -> ``ParameterConstraints``.

    Raises :class:`ConfigError` naming an unknown table, key, sharding type or compute kernel.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of table name -> constraints")
    constraints: Dict[str, ParameterConstraints] = {}
    for table, entry in data.items():
        if table not in tables:
            raise ConfigError(f"{source}: unknown table {table!r} (tables: {sorted(tables)})")
        if not isinstance(entry, Mapping) or set(entry) - {"sharding_types", "compute_kernels"}:
            raise ConfigError(f"{source}: table {table!r}: expected keys 'sharding_types' and/or 'compute_kernels'")
        types = list(entry.get("sharding_types") or [])
        kernels = list(entry.get("compute_kernels") or [])
        for t in types:
            if t not in SHARDING_TYPES:
                raise ConfigError(f"{source}: table {table!r}: unknown sharding type {t!r} (known: {list(SHARDING_TYPES)})")
            if t not in tables[table]:
                raise ConfigError(f"{source}: table {table!r}: sharding type {t!r} is not supported for it "
                                  f"(supported: {list(tables[table])})")
        for k in kernels:
            if k not in COMPUTE_KERNELS:
                raise ConfigError(f"{source}: table {table!r}: unknown compute kernel {k!r} (known: {list(COMPUTE_KERNELS)})")
        constraints[table] = ParameterConstraints(sharding_types=types or None, compute_kernels=kernels or None)
    return constraints


def load_constraints(path: Path, tables: Mapping[str, Sequence[str]]) -> Dict[str, ParameterConstraints]:
    """Reads a YAML or JSON constraints file (see :func:`parse_constraints`)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read constraints: {e}") from None
    return parse_constraints(data, tables, str(path))


def uniform_constraints(choice: str, tables: Mapping[str, Sequence[str]]) -> Dict[str, ParameterConstraints]:
    """Sweep choice -> constraints forcing ``choice`` on every table that supports it (none for ``auto``)."""
    if choice == "auto":
        return {}
    return {t: ParameterConstraints(sharding_types=[choice]) for t, allowed in tables.items() if choice in allowed}


# --------------------------------------------------------------------------------------------------
# Running the planner
# --------------------------------------------------------------------------------------------------


class _PlanRecorder(Stats):
    """Keeps what the planner hands its stats: the chosen (or last failed) ``ShardingOption``s."""

    def __init__(self) -> None:
        self.options: List[ShardingOption] = []
        self.topology: Optional[Topology] = None
        self.reservation: Optional[StorageReservation] = None

    def log(self, sharding_plan: ShardingPlan, topology: Topology, batch_size: int,  # type: ignore[override]
            storage_reservation: StorageReservation, num_proposals: int, num_plans: int, run_time: float,
            best_plan: List[ShardingOption], **kwargs: Any) -> None:
        self.options = list(best_plan)
        self.topology = topology
        self.reservation = storage_reservation


@dataclass
class TableRow:
    """One table's placement."""

    table: str
    module: str
    sharding_type: str
    compute_kernel: str
    ranks: List[int]
    hbm_bytes: int
    ddr_bytes: int


@dataclass
class RankRow:
    """One rank's estimated memory (bytes) and time (ms) for one step."""

    rank: int
    hbm_bytes: int
    ddr_bytes: int
    fwd_compute_ms: float
    fwd_comms_ms: float
    bwd_compute_ms: float
    bwd_comms_ms: float
    total_ms: float


@dataclass
class PlanReport:
    """A plan with the planner's per-table and per-rank estimates."""

    topology: TopologySpec
    plan: ShardingPlan
    tables: List[TableRow] = field(default_factory=list)
    ranks: List[RankRow] = field(default_factory=list)

    @property
    def max_rank_memory_gb(self) -> float:
        """Largest per-rank HBM + DDR use in GiB."""
        return max(r.hbm_bytes + r.ddr_bytes for r in self.ranks) / GB

    @property
    def step_ms(self) -> float:
        """Estimated embedding step time: the slowest rank's total (ranks wait for each other)."""
        return max(r.total_ms for r in self.ranks)

    def summary(self) -> Dict[str, Any]:
        return {"topology": asdict(self.topology), "tables": [asdict(t) for t in self.tables],
                "ranks": [asdict(r) for r in self.ranks], "max_rank_memory_gb": self.max_rank_memory_gb,
                "step_ms": self.step_ms}


def run_planner(model: nn.Module, topo: TopologySpec,
                constraints: Optional[Dict[str, ParameterConstraints]] = None) -> PlanReport:
    """Plans ``model`` for ``topo``; raises :class:`PlanningError` naming tables and memory when nothing fits."""
    recorder = _PlanRecorder()
    try:
        plan = plan_sharding(
            model, world_size=topo.world_size, local_world_size=topo.local_world_size, compute_device=topo.device,
            batch_size=topo.per_rank_batch, constraints=constraints, stats=[recorder], **topo.caps(),
        )
    except PlannerError as e:
        raise PlanningError(_no_fit_message(model, topo, constraints, recorder.reservation)) from e
    return _report(topo, plan, recorder)


def _report(topo: TopologySpec, plan: ShardingPlan, recorder: _PlanRecorder) -> PlanReport:
    """Per-table and per-rank numbers from the chosen options, as ``EmbeddingStats`` computes them."""
    assert recorder.topology is not None and recorder.reservation is not None
    _, dense, kjt = _compute_storage(recorder.reservation, recorder.topology)
    _, used_hbm, used_ddr, perf = _compute_mem_usage_and_perf(recorder.topology, recorder.options, dense, kjt)
    tables = [
        TableRow(table=o.name, module=o.path, sharding_type=o.sharding_type, compute_kernel=o.compute_kernel,
                 ranks=sorted({int(s.rank) for s in o.shards if s.rank is not None}),
                 hbm_bytes=o.total_storage.hbm, ddr_bytes=o.total_storage.ddr)
        for o in recorder.options
    ]
    ranks = [
        RankRow(rank=r, hbm_bytes=used_hbm[r], ddr_bytes=used_ddr[r], fwd_compute_ms=p.fwd_compute,
                fwd_comms_ms=p.fwd_comms, bwd_compute_ms=p.bwd_compute, bwd_comms_ms=p.bwd_comms, total_ms=p.total)
        for r, p in enumerate(perf)
    ]
    return PlanReport(topo, plan, tables, ranks)


def _no_fit_message(model: nn.Module, topo: TopologySpec, constraints: Optional[Dict[str, ParameterConstraints]],
                    reservation: Optional[StorageReservation]) -> str:
    """Which tables need how much memory versus what the topology offers.

    A table none of whose allowed options has every shard fit on one rank is named with its smallest
    shard's HBM/DDR need versus a rank's; when each table fits alone, the total need versus the total.
    """
    topology = Topology(world_size=topo.world_size, local_world_size=topo.local_world_size,
                        compute_device=topo.device, **topo.caps())
    options = EmbeddingEnumerator(topology=topology, batch_size=topo.per_rank_batch,
                                  constraints=constraints).enumerate(model, sharders())
    devices = ((reservation.last_reserved_topology if reservation is not None else None) or topology).devices
    hbm, ddr = min(d.storage.hbm for d in devices), min(d.storage.ddr for d in devices)
    total: Dict[str, int] = {}
    shard: Dict[str, Tuple[int, int]] = {}  # table -> (HBM, DDR) of the largest shard of its best option
    for o in options:
        total[o.name] = min(total.get(o.name, o.total_storage.hbm + o.total_storage.ddr),
                            o.total_storage.hbm + o.total_storage.ddr)
        largest = (max(s.storage.hbm for s in o.shards), max(s.storage.ddr for s in o.shards))  # type: ignore[union-attr]
        if o.name not in shard or sum(largest) < sum(shard[o.name]):
            shard[o.name] = largest
    per_rank = f"{topo.world_size} {topo.device} rank(s) with {hbm / GB:.2f} GB HBM + {ddr / GB:.2f} GB DDR each " \
               f"(after the planner's reservations; --hbm-gb {topo.hbm_gb}, --ddr-gb {topo.ddr_gb})"
    unplaceable = [t for t, (h, d) in shard.items() if h > hbm or d > ddr]
    if unplaceable:
        named = "; ".join(f"table {t!r} ({total[t] / GB:.2f} GB in all) needs at least {shard[t][0] / GB:.2f} GB "
                          f"HBM + {shard[t][1] / GB:.2f} GB DDR on one rank" for t in unplaceable)
        return f"no sharding plan fits {per_rank}: {named}. Add ranks or memory, or allow other sharding types / " \
               f"UVM kernels"
    largest_tables = sorted(total.items(), key=lambda kv: -kv[1])[:3]
    return (f"no sharding plan fits {per_rank}: the tables need {sum(total.values()) / GB:.2f} GB in all "
            f"(largest: {', '.join(f'{t!r} {n / GB:.2f} GB' for t, n in largest_tables)}), the ranks have "
            f"{len(devices) * (hbm + ddr) / GB:.2f} GB. Add ranks or memory")


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def format_report(report: PlanReport) -> str:
    """Human-readable tables: per table, then per rank."""
    t = report.topology
    lines = [f"plan for {t.world_size} {t.device} rank(s) on {t.nodes} node(s), global batch {t.batch_size} "
             f"({t.per_rank_batch} per rank)", "",
             f"{'table':<22} {'sharding type':<15} {'compute kernel':<18} {'GB':>8}  ranks"]
    for row in report.tables:
        lines.append(f"{row.table:<22} {row.sharding_type:<15} {row.compute_kernel:<18} "
                     f"{(row.hbm_bytes + row.ddr_bytes) / GB:>8.3f}  {_ranks(row.ranks)}")
    lines += ["", f"{'rank':>5} {'HBM GB':>9} {'DDR GB':>9} {'fwd comp':>9} {'fwd comm':>9} {'bwd comp':>9} "
              f"{'bwd comm':>9} {'total ms':>9}"]
    for r in report.ranks:
        lines.append(f"{r.rank:>5} {r.hbm_bytes / GB:>9.3f} {r.ddr_bytes / GB:>9.3f} {r.fwd_compute_ms:>9.3f} "
                     f"{r.fwd_comms_ms:>9.3f} {r.bwd_compute_ms:>9.3f} {r.bwd_comms_ms:>9.3f} {r.total_ms:>9.3f}")
    lines += ["", f"largest per-rank memory {report.max_rank_memory_gb:.3f} GB; estimated embedding step "
              f"{report.step_ms:.3f} ms (slowest rank; dense compute not included)"]
    return "\n".join(lines)


def _ranks(ranks: List[int]) -> str:
    if len(ranks) > 8 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]} ({len(ranks)})"
    return ",".join(map(str, ranks))


def write_json(report: PlanReport, path: Path) -> None:
    """The plan (``plan_io`` format, loadable by ``mdaf-rec train --plan``) plus ``planner_summary``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_plan(report.plan, report.topology.world_size, path)
    data = json.loads(path.read_text())
    data["planner_summary"] = report.summary()
    path.write_text(json.dumps(data, indent=2))


# --------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------

SWEEP_FIELDS = ("world_size", "choice", "feasible", "max_rank_memory_gb", "step_ms", "sharding_types", "error")


def sweep(cfg: Config, base: TopologySpec, out_dir: Path, world_sizes: Sequence[int] = SWEEP_WORLD_SIZES,
          choices: Sequence[str] = SWEEP_CHOICES) -> List[Dict[str, Any]]:
    """Plans every (world size, choice) and writes ``sweep.csv`` and ``sweep.png`` into ``out_dir``.

    ``base`` gives device, memory, global batch and ranks per node (``world_size / nodes``, capped at the
    swept world size).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = planning_model(cfg, base.device)
    tables = table_sharding_types(model, base.device)
    per_node = base.local_world_size
    rows: List[Dict[str, Any]] = []
    for world in world_sizes:
        local = min(per_node, world)
        topo = TopologySpec(world, world // local, base.device, base.hbm_gb, base.ddr_gb, base.batch_size)
        for choice in choices:
            row: Dict[str, Any] = {"world_size": world, "choice": choice}
            try:
                report = run_planner(model, topo, uniform_constraints(choice, tables))
                types = sorted({t.sharding_type for t in report.tables})
                row.update(feasible=True, max_rank_memory_gb=round(report.max_rank_memory_gb, 4),
                           step_ms=round(report.step_ms, 4), sharding_types="+".join(types), error="")
            except PlanningError as e:
                row.update(feasible=False, max_rank_memory_gb="", step_ms="", sharding_types="", error=str(e))
            logger.info("world %d %-14s %s", world, choice, row.get("step_ms") or "infeasible")
            rows.append(row)
    with open(out_dir / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SWEEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep(rows, out_dir / "sweep.png", title=f"{cfg.model.name}, {base.device}, "
               f"{base.hbm_gb or 'default'} GB HBM/rank, global batch {base.batch_size}")
    return rows
