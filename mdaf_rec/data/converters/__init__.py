"""Raw-data converters: ``mdaf-rec data <format> --raw PATH --out DIR`` -> a canonical dataset folder.

:data:`CONVERTERS` maps a format name to its module; each module exposes
``add_arguments(parser)`` and ``run(args) -> meta`` (the command line, :mod:`mdaf_rec.cli.data`, builds
one sub-command per format). Modules are imported on first access, so a format whose module is not
installed does not break the others.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Iterator, Mapping

# Format name -> module implementing it.
CONVERTER_MODULES: Dict[str, str] = {
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


CONVERTERS: Mapping[str, ModuleType] = _LazyModules(CONVERTER_MODULES)

