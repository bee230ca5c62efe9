"""The ``mdaf-rec`` command line (``python -m mdaf_rec.cli`` is the same).

``mdaf-rec data <format> ...``  convert raw public data (or generate synthetic data) to the canonical schema
``mdaf-rec train ...``          train a model (1 process, ``torchrun --nproc_per_node N``, or N nodes)
``mdaf-rec eval ...``           re-score a saved run
``mdaf-rec demo``               synthetic data + MDAF-Mamba training on CPU, with the Bayes ceiling
``mdaf-rec plan ...``           TorchRec planner for a GPU/CPU topology (and sweeps)
``mdaf-rec export ...``         a trained run → self-contained serving artifact
``mdaf-rec predict ...``        batch scoring with an exported artifact
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from mdaf_rec.errors import Interrupted, UserError

# Library modules do the work; this package only parses arguments and prints, one module per command group.
__all__ = ["main"]

# Sub-commands with their own argument parsers: name -> (module with ``main(argv) -> int``, help).
DELEGATED = {
    "data": ("mdaf_rec.cli.data", "convert raw data / generate synthetic data"),
    "plan": ("mdaf_rec.cli.plan", "plan embedding sharding for a topology"),
    "export": ("mdaf_rec.cli.export", "export a trained run as a serving artifact"),
    "predict": ("mdaf_rec.cli.predict", "score canonical-schema rows with an exported model"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``mdaf-rec``: every :class:`~mdaf_rec.errors.UserError` of every sub-command ends as one
    line on stderr and exit status 2; Ctrl-C (SIGINT) as one line (:class:`~mdaf_rec.errors.Interrupted`:
    with what to do next) and exit status 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except UserError as e:
        print(f"mdaf-rec: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nmdaf-rec: interrupted{': ' + _one_line(e) if isinstance(e, Interrupted) else ''}", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _run(argv: List[str]) -> int:
    """Runs one sub-command; returns its exit status."""
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:])
    # torch is imported here, not at the top: `mdaf-rec data` does not need it (3 s and ~150 MB per conversion)
    from mdaf_rec.cli.train import add_demo_parser, add_eval_parser, add_train_parser, run_command
    from mdaf_rec.distributed import shutdown_distributed

    parser = argparse.ArgumentParser(prog="mdaf-rec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_text} (mdaf-rec {name} --help)")
    add_train_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        run_command(args)
    finally:
        shutdown_distributed()
    return 0
