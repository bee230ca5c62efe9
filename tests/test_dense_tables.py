"""``optimizer.sparse: dense``: the tables are data_parallel with the dense kernel, get no fused optimizer and
are trained by the dense optimizer in a group of their own (``sparse_lr``) — rows move, the loss falls.

The end-to-end case runs in a subprocess (a process group per process, as in training).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.distributed.types import ParameterSharding, ShardingPlan

from conftest import small_spec
from mdaf_rec.config import ConfigError, ModelConfig, OptimizerConfig, load_config
from mdaf_rec.models.ctr import CTRTrain
from mdaf_rec.models.factory import build_model
from mdaf_rec.sharding import apply_sparse_optimizer, check_plan_optimizer, table_constraints

REPO = Path(__file__).resolve().parents[1]

SESSION = """
import itertools, json, sys
from pathlib import Path
import torch
from mdaf_rec.config import load_config
from mdaf_rec.distributed import init_distributed
from mdaf_rec.sharding import sharded_table_parameters
from mdaf_rec.train import evaluate, open_session, train_steps

config, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = load_config(config, [f"data.path={data}", "features.static_dim=4", "features.sequence_dim=16",
                           "features.max_history=10", "model.head_hidden=[16, 8]", "train.batch_size=128",
                           "train.threads=1", "optimizer.sparse=dense", "optimizer.sparse_lr=0.01"])
env = init_distributed()
session = open_session(cfg, out, env)
plan = {name: [p.sharding_type, p.compute_kernel] for module_plan in session.plan.plan.values()
        for name, p in module_plan.items()}
tables = sharded_table_parameters(session.model)
groups = [g for _, o in session.optimizer.optimizers for g in o.param_groups]
table_group = [g for g in groups if any(p is t for p in g["params"] for t in tables)]
weights = {k: v.detach().clone() for k, v in session.model.state_dict().items() if k.endswith(".weight")
           and any(f".{name}.weight" in k for name in plan)}
before = evaluate(session, "train")["logloss"]
first = list(itertools.islice(iter(session.loader("train", epoch=0, train=True)), 1))
assert len(list(train_steps(session, iter(first)))) == 1
moved = {k: float((session.model.state_dict()[k] - v).abs().max()) for k, v in weights.items()}
for epoch in range(3):
    for _ in train_steps(session, iter(session.loader("train", epoch=epoch, train=True))):
        pass
after = evaluate(session, "train")["logloss"]
print(json.dumps({"plan": plan, "fused": len(list(session.model.fused_optimizer.params)),
                  "table_groups": [{"lr": g["lr"], "weight_decay": g["weight_decay"], "n": len(g["params"])}
                                   for g in table_group],
                  "n_tables": len(tables), "moved": moved, "before": before, "after": after}))
"""


@pytest.mark.parametrize("config", ["configs/dnn.yaml", "configs/dcnv3.yaml"])
def test_dense_tables_are_data_parallel_and_trained_by_the_dense_optimizer(
    config: str, dataset: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SESSION, config, str(dataset), str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["plan"] and all(kind == ["data_parallel", "dense"] for kind in r["plan"].values()), r["plan"]
    assert r["fused"] == 0
    # Every table parameter is in one group of the dense optimizer, at optimizer.sparse_lr, without decay.
    assert r["table_groups"] == [{"lr": 0.01, "weight_decay": 0.0, "n": r["n_tables"]}], r["table_groups"]
    # One step moves every table (the first Adam step moves each looked-up element by ~lr) ...
    assert len(r["moved"]) == len(r["plan"]) and all(d > 1e-3 for d in r["moved"].values()), r["moved"]
    # ... and a few epochs lower the training loss from ln 2.
    assert r["before"] > 0.68 and r["after"] < r["before"] - 0.05, (r["before"], r["after"])


def test_dense_tables_constrain_the_planner_and_refuse_other_plans() -> None:
    model = CTRTrain(build_model(small_spec(), ModelConfig(name="dnn"), table_device="meta"))
    dense = OptimizerConfig(sparse="dense", sparse_lr=0.01)
    constraints = table_constraints(model, dense)
    assert constraints is not None
    assert set(constraints) == {"static_user", "static_item", "static_category", "static_hour", "static_dayofweek"}
    assert all(c.sharding_types == ["data_parallel"] and c.compute_kernels == ["dense"] for c in constraints.values())
    assert table_constraints(model, OptimizerConfig()) is None
    apply_sparse_optimizer(model, dense, torch.device("cpu"))  # attaches no fused optimizer
    assert not any(hasattr(p, "_in_backward_optimizers") for p in model.parameters())
    plan = ShardingPlan({"model.embeddings.embedding_bag_collection": {
        "static_user": ParameterSharding(sharding_type="table_wise", compute_kernel="fused", ranks=[0]),
        "static_item": ParameterSharding(sharding_type="data_parallel", compute_kernel="dense", ranks=[0])}})
    with pytest.raises(ConfigError, match=r"plan.json: optimizer.sparse=dense .* the plan has static_user "
                                          r"\(table_wise/fused\)$"):
        check_plan_optimizer(plan, dense, "plan.json")
    check_plan_optimizer(plan, OptimizerConfig(), "plan.json")  # the fused optimizers take any plan


def test_dense_tables_take_weight_decay_and_static_models_only() -> None:
    cfg = load_config(None, ["model.name=dnn", "optimizer.sparse=dense", "optimizer.sparse_weight_decay=1e-4"])
    assert cfg.optimizer.sparse == "dense" and cfg.optimizer.sparse_weight_decay == 1e-4
    with pytest.raises(ConfigError, match=r"config key 'optimizer.sparse': 'dense' tables train with dcnv3, dnn only, "
                                          r"not 'mdaf_bst'"):
        load_config(None, ["model.name=mdaf_bst", "optimizer.sparse=dense"])
