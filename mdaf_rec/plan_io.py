"""Sharding plans as JSON: written by ``mdaf-rec plan --json``, read by ``mdaf-rec train --plan``.

The JSON keeps, per module path and table: sharding type, compute kernel, ranks and the shards
(offsets, sizes, placement). Other ``ParameterSharding`` options (cache, bounds check, ...) are the
planner's defaults and are not stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

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
