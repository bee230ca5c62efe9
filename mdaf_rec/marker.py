"""Format markers: how the project recognises a folder it wrote before it replaces or deletes anything in it.

A marker is the JSON object ``{"project": "mdaf_rec", "kind": KIND, "format_version": N}``: a run directory's
``mdaf_rec_run.json`` (:mod:`mdaf_rec.run_dir`, kind ``run``), the ``format`` entry of an exported model's
``manifest.json`` (:mod:`mdaf_rec.artifact`, kind ``model``). A file name alone (``config.yaml``,
``manifest.json``) is never enough: other tools write files of those names.
"""

from __future__ import annotations

from typing import Any, Dict

PROJECT = "mdaf_rec"


def format_marker(kind: str, format_version: int) -> Dict[str, Any]:
    """The marker of a folder of ``kind`` written in ``format_version``."""
    return {"project": PROJECT, "kind": kind, "format_version": format_version}


def is_format_marker(doc: Any, kind: str, format_version: int) -> bool:
    """True if ``doc`` (parsed JSON, anything) is exactly the marker of ``kind`` in ``format_version``."""
    expected = format_marker(kind, format_version)
    return isinstance(doc, dict) and {k: doc.get(k) for k in expected} == expected
