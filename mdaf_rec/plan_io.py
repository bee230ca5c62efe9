"""Sharding plans as JSON: written by ``mdaf-rec plan --json``, read by ``mdaf-rec train --plan``.

The JSON keeps, per module path and table: sharding type, compute kernel, ranks and the shards
(offsets, sizes, placement). Other ``ParameterSharding`` options (cache, bounds check, ...) are the
planner's defaults and are not stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from torch import nn
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection

from mdaf_rec.errors import UserError

FORMAT = "mdaf_rec.sharding_plan/1"


class PlanFileError(UserError, ValueError):
    """A plan file is unreadable or malformed (the message names the file and entry)."""


def plan_to_dict(plan: ShardingPlan, world_size: int) -> Dict[str, Any]:
    """Plain-data form of a plan for ``world_size`` ranks."""
    modules: Dict[str, Any] = {}
    for module_path, module_plan in plan.plan.items():
        tables: Dict[str, Any] = {}
        for table, sharding in module_plan.items():  # type: ignore[union-attr]
            shards: List[Dict[str, Any]] = []
            if isinstance(sharding.sharding_spec, EnumerableShardingSpec):
                shards = [
                    {"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "placement": str(s.placement)}
                    for s in sharding.sharding_spec.shards
                ]
            tables[table] = {
                "sharding_type": sharding.sharding_type,
                "compute_kernel": sharding.compute_kernel,
                "ranks": sharding.ranks,
                "shards": shards,
            }
        modules[module_path] = tables
    return {"format": FORMAT, "world_size": world_size, "modules": modules}


def plan_from_dict(data: Dict[str, Any], source: str = "<plan>") -> ShardingPlan:
    """Inverse of :func:`plan_to_dict`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("modules"), dict):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise PlanFileError(f"{source}: not a sharding plan written by mdaf-rec (format {found!r})")
    plan: Dict[str, EmbeddingModuleShardingPlan] = {}
    for module_path, tables in data["modules"].items():
        if not isinstance(tables, dict):
            raise PlanFileError(f"{source}: module {module_path!r}: expected a mapping of table -> sharding")
        module_plan = EmbeddingModuleShardingPlan()
        for table, entry in tables.items():
            try:
                spec = (
                    EnumerableShardingSpec(
                        [
                            ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"])
                            for s in entry["shards"]
                        ]
                    )
                    if entry["shards"]
                    else None
                )
                module_plan[table] = ParameterSharding(
                    sharding_type=entry["sharding_type"],
                    compute_kernel=entry["compute_kernel"],
                    ranks=entry["ranks"],
                    sharding_spec=spec,
                )
            except (KeyError, TypeError, ValueError) as e:
                raise PlanFileError(f"{source}: table {table!r} of {module_path!r} is malformed: {e}") from None
        plan[module_path] = module_plan
    return ShardingPlan(plan=plan)  # type: ignore[arg-type]


def save_plan(plan: ShardingPlan, world_size: int, path: Path) -> None:
    """Writes ``plan`` (made for ``world_size`` ranks) as JSON."""
    path.write_text(json.dumps(plan_to_dict(plan, world_size), indent=2))


def load_plan(path: Path, world_size: int) -> ShardingPlan:
    """Reads a plan written by :func:`save_plan`; it must have been made for ``world_size`` ranks."""
    data = _read_plan_file(path)
    if data["world_size"] != world_size:
        raise PlanFileError(
            f"{path}: the plan is for world size {data['world_size']}, this job has {world_size} processes"
        )
    return plan_from_dict(data, str(path))


def check_plan(plan: ShardingPlan, model: nn.Module, world_size: int, device_type: str, source: str) -> None:
    """Refuses, with a :class:`PlanFileError` naming ``source``, a plan that does not fit ``model``'s tables
    on ``world_size`` ranks of ``device_type``: an unknown or missing module or table, a rank or placement
    outside the job, shards that do not tile their table, or tables of other sizes (a plan that
    ``mdaf-rec plan`` made for other vocabulary sizes)."""
    tables = _embedding_tables(model)
    for module_path, module_plan in plan.plan.items():
        if module_path not in tables:
            raise PlanFileError(f"{source}: module {module_path!r} is not an embedding module of this model "
                                f"(it has {sorted(tables)})")
        for table, sharding in module_plan.items():  # type: ignore[union-attr]
            if table not in tables[module_path]:
                raise PlanFileError(f"{source}: table {table!r} is not a table of {module_path!r} "
                                    f"(it has {sorted(tables[module_path])})")
            _check_table(sharding, tables[module_path][table], world_size, device_type, f"{source}: table {table!r}")
    for module_path, module_tables in tables.items():
        missing = sorted(set(module_tables) - set(plan.plan.get(module_path, {})))
        if missing:
            raise PlanFileError(f"{source}: no sharding for table(s) {missing} of {module_path!r}")


def _embedding_tables(model: nn.Module) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """Module path -> table name -> ``(rows, dim)`` of every TorchRec embedding collection in ``model`` (a
    managed-collision collection is planned as one module: its path, not its inner collection's)."""
    tables: Dict[str, Dict[str, Tuple[int, int]]] = {}
    inner = set()
    for path, module in model.named_modules():
        if isinstance(module, ManagedCollisionEmbeddingCollection):
            inner.add(id(module._embedding_module))
            configs = module._embedding_module.embedding_configs()
        elif isinstance(module, EmbeddingBagCollection):
            configs = module.embedding_bag_configs()
        elif isinstance(module, EmbeddingCollection) and id(module) in inner:
            continue
        elif isinstance(module, EmbeddingCollection):
            configs = module.embedding_configs()
        else:
            continue
        tables[path] = {c.name: (c.num_embeddings, c.embedding_dim) for c in configs}
    return tables


def _check_table(sharding: ParameterSharding, shape: Tuple[int, int], world_size: int, device_type: str,
                 where: str) -> None:
    ranks = sharding.ranks or []
    outside = [r for r in ranks if not 0 <= r < world_size]
    if outside:
        raise PlanFileError(f"{where}: rank {outside[0]} is outside this job's ranks 0..{world_size - 1}")
    spec = sharding.sharding_spec
    if not isinstance(spec, EnumerableShardingSpec):
        return
    rows, dim = shape
    flat = [s for s in spec.shards if len(s.shard_offsets) != 2 or len(s.shard_sizes) != 2]
    if flat:
        raise PlanFileError(f"{where}: shard offsets {flat[0].shard_offsets} / sizes {flat[0].shard_sizes} are not "
                            "[row, column] pairs")
    extent = max(s.shard_offsets[0] + s.shard_sizes[0] for s in spec.shards)
    if extent != rows:
        raise PlanFileError(f"{where}: the plan's shards cover {extent} rows, this model's table has {rows}: the "
                            "plan was made for other vocabulary sizes (re-run `mdaf-rec plan` for this data)")
    for shard in spec.shards:
        placement = shard.placement
        rank, device = placement.rank(), placement.device()
        if not 0 <= rank < world_size or device.type != device_type:
            raise PlanFileError(f"{where}: shard placement {str(placement)!r} is not a {device_type} device of "
                                f"ranks 0..{world_size - 1}")
        (row, col), (height, width) = shard.shard_offsets, shard.shard_sizes
        if min(row, col) < 0 or min(height, width) < 1 or row + height > rows or col + width > dim:
            raise PlanFileError(f"{where}: shard at offsets {[row, col]} of sizes {[height, width]} does not fit "
                                f"the table's [{rows}, {dim}]")
    if sum(s.shard_sizes[0] * s.shard_sizes[1] for s in spec.shards) != rows * dim:
        raise PlanFileError(f"{where}: the shards' sizes do not tile the table's [{rows}, {dim}]")


def plan_world_size(path: Path) -> int:
    """The world size a plan file was made for."""
    return _read_plan_file(path)["world_size"]


def _read_plan_file(path: Path) -> Dict[str, Any]:
    """The JSON document of a plan file, with an integer ``world_size``; :class:`PlanFileError` naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanFileError(f"{path}: cannot read sharding plan: {e}") from None
    world_size = data.get("world_size") if isinstance(data, dict) else None
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        raise PlanFileError(f"{path}: not a sharding plan written by mdaf-rec (no integer 'world_size')")
    return data
