"""``mdaf-rec train``, ``mdaf-rec eval`` and ``mdaf-rec demo``: the training commands around
:func:`mdaf_rec.train.train`, :func:`mdaf_rec.train.eval_run` and :func:`mdaf_rec.demo.run_demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Sequence, Union

import torch

from mdaf_rec.config import Config, check_sparse_optimizer, load_config
from mdaf_rec.distributed import is_main_process
from mdaf_rec.metrics import format_metric
from mdaf_rec.errors import Interrupted
from mdaf_rec.output import writing_to
from mdaf_rec.registry import MODEL_NAMES

DEMO_CONFIG = "demo"
"""The packaged config ``mdaf-rec demo`` trains (``configs/demo.yaml``)."""

_CONFIG_HELP = "YAML config file, or the name of a packaged config (mdaf_mamba, mdaf_bst, demo, ...: configs/)"


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show third-party log lines and warnings (TorchRec planner, FBGEMM, PyTorch)")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model", description="Train a model on a canonical dataset folder.")
    p.add_argument("--config", type=Path, required=True, help=_CONFIG_HELP)
    p.add_argument("--data", help="canonical dataset folder (train/val/test); overrides data.path")
    p.add_argument("--model", choices=MODEL_NAMES, help="overrides model.name")
    p.add_argument("--epochs", type=int, help="overrides train.epochs")
    p.add_argument("--batch-size", type=int, help="global batch size; overrides train.batch_size")
    p.add_argument("--out", type=Path, help="run directory (default runs/<model>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.gate=vector (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="insist on continuing from the run directory's last checkpoint (a re-run of the same command "
                   "on a run directory with a checkpoint of that run resumes without it)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory written by `mdaf-rec train` (it has mdaf_rec_run.json): "
                   "its own files are deleted, no other file; any other non-empty folder is refused")
    p.add_argument("--plan", type=Path, help="sharding plan JSON written by `mdaf-rec plan --json`")
    p.add_argument("--init-from", metavar="RUN[:last]",
                   help="warm start from another run's best checkpoint (RUN:last: its last; or a checkpoint folder): "
                   "its tables, grown by this data's new ids, and dense weights; overrides train.init_from")
    p.add_argument("--init-optimizer", action="store_true",
                   help="with --init-from, also take its optimizer state where shapes allow (train.init_optimizer)")
    p.add_argument("--from-date", metavar="YYYY-MM-DD",
                   help="train on the training rows of this local date (features.timezone) and later; data.from_date")
    p.add_argument("--to-date", metavar="YYYY-MM-DD",
                   help="train on the training rows of this local date and earlier; data.to_date")
    _add_verbose(p)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="re-score a saved run", description="Re-score a split with a saved checkpoint.")
    p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                   help="run directory written by `mdaf-rec train` (under torchrun, spell it --run-dir: torchrun's own "
                   "parser would take --run for its --run-path)")
    p.add_argument("--data", help="dataset folder (default: the run's); ids go through the run's vocabularies")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    _add_verbose(p)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data + MDAF-Mamba on CPU",
                       description="Synthetic data + MDAF-Mamba training on CPU, with the Bayes ceiling.")
    p.add_argument("--config", type=Path, default=Path(DEMO_CONFIG), help=f"{_CONFIG_HELP}; default {DEMO_CONFIG}")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_verbose(p)


def training_config(path: Union[str, Path], overrides: Sequence[str]) -> Config:
    """:func:`~mdaf_rec.config.load_config`, then refuses what this machine cannot train (``adam`` tables on CPU)."""
    cfg = load_config(path, overrides)
    check_sparse_optimizer(cfg.optimizer, "cuda" if torch.cuda.is_available() else "cpu")
    return cfg


def train_config(args: argparse.Namespace) -> Config:
    """The resolved config of ``mdaf-rec train``: file, then ``--set``, then the named flags."""
    overrides: List[str] = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    for key, value in (("train.init_from", args.init_from), ("data.from_date", args.from_date),
                       ("data.to_date", args.to_date)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # a quoted YAML string, whatever it spells
    if args.init_optimizer:
        overrides.append("train.init_optimizer=true")
    return training_config(args.config, overrides)


def run_command(args: argparse.Namespace) -> None:
    """Runs ``train``, ``eval`` or ``demo``."""
    if args.command == "train":
        from mdaf_rec.train import train

        cfg = train_config(args)
        out = args.out or Path("runs") / cfg.model.name
        try:
            with writing_to(out):
                final = train(cfg, out, resume=args.resume, plan_file=args.plan, overwrite=args.overwrite,
                              verbose=args.verbose)
        except KeyboardInterrupt:
            raise Interrupted(f"re-run the same command to continue: it resumes {out} from its last checkpoint "
                              "(or starts afresh if it has none yet)") from None
        _print_summary(final)
    elif args.command == "eval":
        from mdaf_rec.train import eval_run

        result = eval_run(args.run, args.data, args.split, args.checkpoint, verbose=args.verbose)
        if is_main_process():
            print(json.dumps(result, indent=2))
    elif args.command == "demo":
        from mdaf_rec.demo import run_demo

        with writing_to(args.out):
            run_demo(training_config(args.config, args.overrides), args.out, verbose=args.verbose)


def _print_summary(final: dict) -> None:
    if not is_main_process():
        return
    for split in ("val", "test"):
        m = final[split]
        print(f"{split}: auc {format_metric(m, 'auc')}  gauc {format_metric(m, 'gauc')}  "
              f"logloss {format_metric(m, 'logloss')}  calibration {format_metric(m, 'calibration', 3)}")
