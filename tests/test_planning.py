"""``mdaf-rec plan``: plans for 8 and 64 GPUs, constraints, bad input, impossible fits, and a CPU plan
that ``mdaf-rec train --plan`` trains with. Every run is a subprocess, as a user would type it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict

import pytest
from test_train import REPO, TINY, mdaf, train

from mdaf_rec.config import ConfigError, load_config
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.synth import generate
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.plan_io import load_plan
from mdaf_rec.planning import (
    PlanningError,
    TopologySpec,
    parse_constraints,
    planning_model,
    run_planner,
    sweep,
    table_sharding_types,
    uniform_constraints,
)

TAOBAO = "configs/plan_taobao.yaml"
ITEMS_100M = "configs/plan_items_100m.yaml"
TABLES = {"static_user", "static_item", "static_category", "static_hour", "static_dayofweek", "sequence_item",
          "sequence_category"}


def plan_json(path: Path) -> Dict[str, Dict]:
    """Table -> entry of a plan file (all modules)."""
    data = json.loads(path.read_text())
    return {t: e for tables in data["modules"].values() for t, e in tables.items()}


@pytest.mark.parametrize("world_size,nodes", [(8, 1), (64, 8)])
def test_plan_prints_and_writes_gpu_plans(tmp_path: Path, world_size: int, nodes: int) -> None:
    out = tmp_path / "plan.json"
    proc = mdaf("plan", "--config", ITEMS_100M, "--world-size", str(world_size), "--nodes", str(nodes),
                "--device", "cuda", "--hbm-gb", "80", "--json", str(out))
    tables = plan_json(out)
    assert set(tables) == TABLES
    for name, entry in tables.items():
        assert entry["ranks"] and all(0 <= r < world_size for r in entry["ranks"]), name
        assert name in proc.stdout and entry["sharding_type"] in proc.stdout
    summary = json.loads(out.read_text())["planner_summary"]
    assert [r["rank"] for r in summary["ranks"]] == list(range(world_size))
    assert all(r["hbm_bytes"] > 0 and r["total_ms"] > 0 for r in summary["ranks"])
    assert "HBM GB" in proc.stdout and "total ms" in proc.stdout
    load_plan(out, world_size)  # readable by `mdaf-rec train --plan`


def test_constraints_force_row_wise(tmp_path: Path) -> None:
    constraints = tmp_path / "c.yaml"
    constraints.write_text("sequence_item: {sharding_types: [row_wise]}\nstatic_user: {sharding_types: [row_wise]}\n")
    out = tmp_path / "plan.json"
    mdaf("plan", "--config", TAOBAO, "--world-size", "4", "--constraints", str(constraints), "--json", str(out))
    tables = plan_json(out)
    assert tables["sequence_item"]["sharding_type"] == tables["static_user"]["sharding_type"] == "row_wise"
    assert tables["sequence_item"]["ranks"] == [0, 1, 2, 3]


def test_unknown_table_in_constraints_is_an_error_naming_it(tmp_path: Path) -> None:
    constraints = tmp_path / "c.yaml"
    constraints.write_text("sequence_itme: {sharding_types: [row_wise]}")
    proc = mdaf("plan", "--config", TAOBAO, "--constraints", str(constraints), check=False)
    assert proc.returncode == 2 and "unknown table 'sequence_itme'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("entry,named", [
    ({"sharding_types": ["row_wize"]}, "unknown sharding type 'row_wize'"),
    ({"sharding_types": ["table_row_wise"]}, "'table_row_wise' is not supported"),  # EC tables lack it
    ({"compute_kernels": ["fusd"]}, "unknown compute kernel 'fusd'"),
    ({"sharding_type": ["row_wise"]}, "expected keys"),
])
def test_bad_constraints_are_errors_naming_them(entry: Dict, named: str) -> None:
    tables = table_sharding_types(planning_model(load_config(REPO / TAOBAO), "cuda"), "cuda")
    with pytest.raises(ConfigError, match=named):
        parse_constraints({"sequence_item": entry}, tables, "c.yaml")


def test_impossible_fit_names_table_and_memory() -> None:
    proc = mdaf("plan", "--config", ITEMS_100M, "--world-size", "8", "--hbm-gb", "1", "--ddr-gb", "1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "table 'sequence_item' (48.06 GB in all) needs at least" in proc.stderr, proc.stderr
    assert "GB HBM + 1.00 GB DDR each" in proc.stderr


def test_infeasible_choice_names_the_table() -> None:
    cfg = load_config(REPO / ITEMS_100M)
    model = planning_model(cfg, "cuda")
    topo = TopologySpec(world_size=2, nodes=1, device="cuda", hbm_gb=16, ddr_gb=16, batch_size=2048)
    with pytest.raises(PlanningError, match="sequence_item"):
        run_planner(model, topo, uniform_constraints("data_parallel", table_sharding_types(model, "cuda")))


def test_small_sweep_writes_csv_and_png(tmp_path: Path) -> None:
    cfg = load_config(REPO / TAOBAO)
    base = TopologySpec(world_size=8, nodes=1, device="cuda", hbm_gb=80, ddr_gb=None, batch_size=2048)
    rows = sweep(cfg, base, tmp_path, world_sizes=(1, 2), choices=("auto", "row_wise", "data_parallel"))
    assert len(rows) == 6 and all(r["feasible"] for r in rows)
    with open(tmp_path / "sweep.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_train_with_a_cpu_plan(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data, rows=1500, users=150, items=400, categories=20, max_history=10, seed=5)
    cfg = load_config(REPO / "configs/dcnv3.yaml")
    sizes = Vocabularies.load_or_build(Dataset.open(data), cfg.features).sizes  # the tables training builds
    sets = [a for s in TINY + [f"planning.vocab_sizes={json.dumps(sizes)}"] for a in ("--set", s)]
    plan = tmp_path / "plan.json"
    mdaf("plan", "--config", "configs/dcnv3.yaml", "--device", "cpu", "--world-size", "1", "--json", str(plan), *sets)
    run = tmp_path / "run"
    train(data, run, "--epochs", "1", "--plan", str(plan), config="configs/dcnv3.yaml")
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1
    assert plan_json(run / "plan.json") == plan_json(plan)  # trained with the given plan
