"""Raw-data converters: ``mdaf-rec data <format> --raw PATH --out DIR`` -> a canonical dataset folder.

:data:`CONVERTERS` maps a format name to its module; each module exposes
``add_arguments(parser)`` and ``run(args) -> meta``. Modules are imported on first access, so a
format whose module is not installed does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Mapping

from mdaf_rec.data.converters.common import ConversionError

logger = logging.getLogger(__name__)

_MODULES: Dict[str, str] = {
    "taobao-ad": "mdaf_rec.data.converters.taobao_ad",
    "taobao-behavior": "mdaf_rec.data.converters.taobao_behavior",
    "movielens": "mdaf_rec.data.converters.movielens",
    "synth": "mdaf_rec.data.synth",
}


class _LazyModules(Mapping[str, ModuleType]):
    """Format name -> converter module, imported on first access."""

    def __init__(self, modules: Mapping[str, str]) -> None:
        self._modules = dict(modules)

    def __getitem__(self, name: str) -> ModuleType:
        return importlib.import_module(self._modules[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


CONVERTERS: Mapping[str, ModuleType] = _LazyModules(_MODULES)


def build_parser(prog: str = "mdaf-rec data") -> argparse.ArgumentParser:
    """A parser with one subcommand per available format (a format whose module is absent is left
    out with a warning)."""
    parser = argparse.ArgumentParser(prog=prog, description="Convert raw data into a canonical dataset folder.")
    subparsers = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name in CONVERTERS:
        try:
            module = CONVERTERS[name]
        except ModuleNotFoundError as e:
            if e.name != _MODULES[name]:
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out}: exists and is not a folder")
    meta = CONVERTERS[args.format].run(args)
    logger.info("%s: %d rows (%s), %d bad rows dropped", args.out, meta["rows"],
                ", ".join(f"{s} {v['rows']}" for s, v in meta["splits"].items()), meta.get("dropped_total", 0))
    return 0
