"""Public names of a package, imported on first use (PEP 562), so that ``import mdaf_rec`` and
``import mdaf_rec.models`` stay light: the dense model modules import without TorchRec
(``tests/test_models.py``) and a command's ``--help`` does not load the training stack."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Dict, List, Mapping, Tuple


def lazy_exports(package: str, exports: Mapping[str, str], namespace: Dict[str, Any]) -> Tuple[
    Callable[[str], Any], Callable[[], List[str]]
]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for ``exports`` (public name ->
    defining module). A name is imported from its module on first access and kept in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
