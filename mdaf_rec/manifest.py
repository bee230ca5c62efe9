"""Manifests: the size and sha256 of every file of a folder (a checkpoint, an exported model), written after
the files and checked before anything in the folder is read.

``FOLDER/manifest.json`` is ``{"files": {relative path: {"sha256": hex, "size": bytes}}}``, plus a ``"format"``
marker (:mod:`mdaf_rec.marker`) where the caller gives one (an exported model). The callers raise
their own errors (:class:`~mdaf_rec.checkpoint.CheckpointError`, :class:`~mdaf_rec.artifact.ArtifactError`)
with messages that name the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type

MANIFEST_FILE = "manifest.json"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, format_marker: Optional[Dict[str, Any]] = None) -> str:
    """Writes ``manifest.json`` over every file below ``folder`` (with ``format_marker`` as its ``"format"``, if
    given); returns the manifest's sha256."""
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE
    }
    doc: Dict[str, Any] = {"files": files} if format_marker is None else {"format": format_marker, "files": files}
    data = json.dumps(doc, indent=2).encode()
    (folder / MANIFEST_FILE).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(
    folder: Path, error: Type[Exception], expected_sha256: Optional[str] = None, missing: str = "missing"
) -> Dict[str, Dict[str, Any]]:
    """``{path: {"sha256", "size"}}`` of ``folder``'s manifest, after checking the manifest's own sha256 if one is
    given.

    Args:
        folder: the folder.
        error: the exception class raised (its message names the manifest).
        expected_sha256: the manifest's expected sha256 (hex), if known.
        missing: what the message says when the manifest does not exist.
    """
    path = folder / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    if expected_sha256 is not None:
        expected = expected_sha256.strip().lower()
        if not _SHA256_HEX.fullmatch(expected):
            raise error(f"--manifest-sha256 {expected_sha256!r}: expected 64 hex digits")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise error(f"{path}: sha256 {actual} is not the expected {expected} (another or a modified folder)")
    try:
        files = {str(name): {"sha256": str(e["sha256"]), "size": int(e["size"])}
                 for name, e in json.loads(data)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise error(f"{path}: not a valid manifest ({type(e).__name__}: {e})") from None
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise error(f"{path}: lists {name!r}, a path outside {folder}")
    return files


def read_format(folder: Path) -> Any:
    """The ``"format"`` entry of ``folder``'s manifest; ``None`` if there is none, or no readable manifest (a
    symbolic link is not read)."""
    path = folder / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc.get("format") if isinstance(doc, dict) else None


def first_mismatch(folder: Path, files: Dict[str, Dict[str, Any]]) -> Optional[Tuple[Path, str]]:
    """The first file of ``files`` (a manifest) that is ``"missing"`` or ``"modified"`` below ``folder``, with
    which; ``None`` when every file matches (same size and sha256)."""
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            return file, "missing"
        if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
            return file, "modified"
    return None
