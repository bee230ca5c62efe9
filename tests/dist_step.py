"""Training steps under DMP, for ``tests/test_equivalence.py`` (run as 1 process or under torchrun).

``python tests/dist_step.py --config C --data D --out DIR [--init CKPT] [--constraints JSON] [--steps N]
[--eval] [--set k=v ...]``

Opens a session with the package's own functions (:func:`mdaf_rec.train.open_session`), loads the initial
weights from ``--init`` (under ``features.id_mapping: managed`` all but the remapping state; or, when absent, writes them to ``DIR/checkpoints/step_0``), runs ``--steps`` steps
of the recipe's own step (:func:`mdaf_rec.train.train_steps`, the training pipeline) on the first global
training batches of epoch 0 (each rank gets its part, as in training), then writes the
weights to ``DIR/checkpoints/after``, the last step's dense gradients (DDP-averaged, identical on every
rank) to ``DIR/dense_grads.pt`` and the plan, rank 0's losses, the training rows (split row numbers) each
rank stepped on and (``--eval``) validation metrics to ``DIR/result.json``. ``--constraints`` (JSON: table ->
sharding type) forces the sharding plan, so one run covers several sharding types at once.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import Config, load_config
from mdaf_rec.data.batch import Batch
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.distributed import DistEnv, init_distributed, shutdown_distributed
from mdaf_rec.planning import planning_model
from mdaf_rec.sharding import plan_sharding
from mdaf_rec.train import evaluate, open_session, train_steps


def forced_plan(cfg: Config, env: DistEnv, vocabs: Optional[Vocabularies], types: Dict[str, str]) -> ShardingPlan:
    """The planner's plan for the data's table sizes with one forced sharding type per named table."""
    cfg.planning.vocab_sizes = vocabs.sizes if vocabs is not None else {}
    model = planning_model(cfg, env.device.type)
    constraints = {t: ParameterConstraints(sharding_types=[s]) for t, s in types.items()}
    return plan_sharding(
        model, world_size=env.world_size, local_world_size=env.local_world_size, compute_device=env.device.type,
        batch_size=max(1, cfg.train.batch_size // env.world_size), constraints=constraints,
        process_group=dist.group.WORLD,
    )


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--init", type=Path, help="checkpoint with the initial weights (written here when absent)")
    p.add_argument("--constraints", help="JSON: table -> forced sharding type")
    p.add_argument("--steps", type=int, default=1, help="training steps (default 1)")
    p.add_argument("--eval", action="store_true", help="score the validation split after the steps")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    env = init_distributed()
    cfg = load_config(args.config, [*args.overrides, f"data.path={args.data}"])
    managed = cfg.features.id_mapping == "managed"
    vocabs = None if managed else Vocabularies.load_or_build(Dataset.open(cfg.data.path), cfg.features)
    plan = forced_plan(cfg, env, vocabs, json.loads(args.constraints)) if args.constraints else None
    session = open_session(cfg, args.out, env, vocabs=vocabs, plan=plan)
    model = session.model
    if args.init is not None and managed:
        # the fresh remapping state of step_0 stays as it is: TorchRec cannot reshard it (1 -> 2 ranks)
        state = {k: v for k, v in model.state_dict().items() if "_managed_collision_modules" not in k}
        ckpt.load_checkpoint(args.init, {"model": state})
        model.load_state_dict(state, strict=False)
    elif args.init is not None:
        ckpt.load_model_weights(args.init, model)
    else:
        ckpt.save_checkpoint(args.out, "step_0", {"model": model.state_dict()}, {}, is_best=False)

    rows: List[int] = []

    def recorded(batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            rows.extend(batch.row_index.tolist())
            yield batch

    batches = itertools.islice(iter(session.loader("train", epoch=0, train=True)), args.steps)
    losses: List[float] = [float(out.loss) for out in train_steps(session, recorded(batches))]
    rank_rows: List[Optional[List[int]]] = [None] * env.world_size
    dist.all_gather_object(rank_rows, rows)
    val = evaluate(session, "val") if args.eval else {}

    ckpt.save_checkpoint(args.out, "after", {"model": model.state_dict()}, {}, is_best=False)
    if env.is_main:
        grads = {name: p.grad.detach().clone() for name, p in in_backward_optimizer_filter(model.named_parameters())
                 if p.grad is not None}
        torch.save(grads, args.out / "dense_grads.pt")
        plan = {table: s.sharding_type for m in session.plan.plan.values() for table, s in m.items()}  # type: ignore[union-attr]
        result = {"plan": plan, "rank0_losses": losses, "rank_rows": rank_rows,
                  "val": {k: val[k] for k in ("auc", "logloss", "count") if k in val}}
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
