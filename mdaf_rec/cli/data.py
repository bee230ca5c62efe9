"""``mdaf-rec data <format> ...``: raw public data (or synthetic data) → a canonical dataset folder.

One sub-command per format of :data:`mdaf_rec.data.converters.CONVERTERS`; each converter module declares
its options (``add_arguments(parser)``) and converts (``run(args) -> meta``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List

from mdaf_rec.data.converters import CONVERTER_MODULES, CONVERTERS
from mdaf_rec.data.converters.common import ConversionError
from mdaf_rec.logs import setup_logging

logger = logging.getLogger(__name__)


def build_parser(prog: str = "mdaf-rec data") -> argparse.ArgumentParser:
    """A parser with one subcommand per available format (a format whose module is absent is left
    out with a warning)."""
    parser = argparse.ArgumentParser(prog=prog, description="Convert raw data into a canonical dataset folder.")
    subparsers = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name in CONVERTERS:
        try:
            module = CONVERTERS[name]
        except ModuleNotFoundError as e:
            if e.name != CONVERTER_MODULES[name]:
                raise
            logger.warning("format %r unavailable: module %s not found", name, e.name)
            continue
        sub = subparsers.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                                    description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
    return parser


def main(argv: List[str]) -> int:
    """``mdaf-rec data <format> ...``: converts and prints nothing but log lines; returns the exit code.

    Malformed input raises :class:`ConversionError` naming file, line and column (the ``mdaf-rec``
    command line prints it as one line and exits 2).
    """
    setup_logging()
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out}: exists and is not a folder")
    meta = CONVERTERS[args.format].run(args)
    logger.info("%s: %d rows (%s), %d bad rows dropped", args.out, meta["rows"],
                ", ".join(f"{s} {v['rows']}" for s, v in meta["splits"].items()), meta.get("dropped_total", 0))
    return 0
