"""``mdaf-rec plan``: the TorchRec planner for a topology (and sweeps); the work is :mod:`mdaf_rec.planning`'s."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import List, Optional

from mdaf_rec import planning
from mdaf_rec.config import ConfigError, load_config
from mdaf_rec.logs import setup_logging
from mdaf_rec.sharding import table_constraints


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdaf-rec plan", description=planning.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True,
                   help="YAML config or packaged config name; tables sized by planning.vocab_sizes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable)")
    p.add_argument("--world-size", type=int, default=8, help="ranks in all (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="hosts; world-size/nodes ranks per host (default 1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="compute device (default cuda)")
    p.add_argument("--hbm-gb", type=float, help="device memory per rank in GiB (planner default: 32)")
    p.add_argument("--ddr-gb", type=float, help="host memory per rank in GiB (planner default: 128)")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (default train.batch_size)")
    p.add_argument("--constraints", type=Path, help="YAML/JSON: table -> {sharding_types: [...], compute_kernels: [...]}")
    p.add_argument("--json", type=Path, help="write the plan here (for `mdaf-rec train --plan`)")
    p.add_argument("--sweep", action="store_true",
                   help=f"plan world sizes {list(planning.SWEEP_WORLD_SIZES)} x choices {list(planning.SWEEP_CHOICES)} "
                   "(needs --out)")
    p.add_argument("--out", type=Path, help="sweep output folder (sweep.csv, sweep.png)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``mdaf-rec plan``; bad input or a plan that cannot fit raises a :class:`UserError`
    (:class:`ConfigError`, :class:`~mdaf_rec.planning.PlanningError`), which the ``mdaf-rec`` command line
    prints as one line, exit 2."""
    args = _parser().parse_args(argv)
    # Our progress at INFO; TorchRec's planner chatter (its root-logger warning about data-parallel tables
    # having no sharding spec, by design) only when it is an error.
    setup_logging()
    warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
    cfg = load_config(args.config, args.overrides)
    topo = planning.TopologySpec(args.world_size, args.nodes, args.device, args.hbm_gb, args.ddr_gb,
                                 args.batch_size or cfg.train.batch_size)
    topo.validate()
    if args.sweep:
        if args.out is None:
            raise ConfigError("--sweep needs --out DIR")
        planning.sweep(cfg, topo, args.out)
        print(f"wrote {args.out / 'sweep.csv'} and {args.out / 'sweep.png'}")
        return 0
    model = planning.planning_model(cfg, args.device)
    constraints = table_constraints(model, cfg.optimizer)  # optimizer.sparse=dense: data_parallel tables only
    if args.constraints:
        if constraints is not None:
            raise ConfigError(f"--constraints {args.constraints}: optimizer.sparse=dense places every table "
                              "data_parallel with the dense kernel; it takes no other constraints")
        constraints = planning.load_constraints(args.constraints, planning.table_sharding_types(model, args.device))
    report = planning.run_planner(model, topo, constraints)
    print(planning.format_report(report))
    if args.json:
        planning.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
