"""Manifests: the size and sha256 of every file of a folder (a checkpoint, an exported model), written after
the files and checked before anything in the folder is read.

``FOLDER/manifest.json`` is ``{"files": {relative path: {"sha256": hex, "size": bytes}}}``, plus a ``"format"``
marker (:mod:`mdaf_rec.marker`) where the caller gives one (an exported model). The callers raise
their own errors (:class:`~mdaf_rec.checkpoint.CheckpointError`, :class:`~mdaf_rec.artifact.ArtifactError`)
with messages that name the file.

For checkpoints (:mod:`mdaf_rec.checkpoint`), hashes this process computed (or took while writing a file,
:func:`remember_sha256`) are kept with the file's identity ``(device, inode, size, mtime_ns, ctime_ns)``; :func:`cached_sha256` re-reads a file only when that
identity changed. ``ctime`` is set by the kernel on every write, rename or ``utime`` and cannot be set back
from user space, so a file changed after it was hashed is hashed again; the one change that could go unseen
is one made within the same file-system timestamp tick (milliseconds) as this process's own hash — the same
window there is anyway between checking a file and reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Type

MANIFEST_FILE = "manifest.json"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_Identity = Tuple[int, int, int, int, int]
_HASHED: Dict[str, Tuple[_Identity, str]] = {}  # real path -> (identity when hashed, sha256)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember_sha256(path: Path, sha256: str) -> None:
    """Records that ``path``, as it is now on disk, has content hash ``sha256`` (hashed while it was written)."""
    _HASHED[os.path.realpath(path)] = (_identity(os.stat(path)), sha256)


def cached_sha256(path: Path) -> str:
    """Hex sha256 of ``path``: the one this process already computed or recorded if the file's identity (see
    the module docstring) is unchanged since, else hashed now (and recorded)."""
    key = os.path.realpath(path)
    before = _identity(os.stat(path))
    known = _HASHED.get(key)
    if known is not None and known[0] == before:
        return known[1]
    digest = sha256_file(path)
    if _identity(os.stat(path)) == before:  # not changed while it was read
        _HASHED[key] = (before, digest)
    return digest


def write_manifest(
    folder: Path,
    known: Optional[Dict[str, Dict[str, Any]]] = None,
    format_marker: Optional[Dict[str, Any]] = None,
) -> str:
    """Writes ``manifest.json`` over every file below ``folder``; returns the manifest's sha256.

    Args:
        folder: the folder.
        known: ``{relative path: {"sha256", "size"}}`` of files already hashed (by the processes that wrote
            them); a file of the folder that is not in it, or whose size differs, is hashed here.
        format_marker: the manifest's ``"format"`` entry (:mod:`mdaf_rec.marker`), if any (an exported model).
    """
    known = known or {}
    files = {}
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if not p.is_file() or name == MANIFEST_FILE:
            continue
        size = p.stat().st_size
        entry = known.get(name)
        files[name] = dict(entry) if entry is not None and entry["size"] == size else {"sha256": sha256_file(p),
                                                                                      "size": size}
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


def first_mismatch(
    folder: Path,
    files: Dict[str, Dict[str, Any]],
    names: Optional[Iterable[str]] = None,
    hasher: Callable[[Path], str] = sha256_file,
) -> Optional[Tuple[Path, str]]:
    """The first file of ``files`` (a manifest), or of its entries ``names`` only, that is ``"missing"`` or
    ``"modified"`` below ``folder``, with which; ``None`` when every one matches (same size, and sha256 by
    ``hasher``: :func:`sha256_file`, or :func:`cached_sha256`). A name the manifest does not list is
    ``"unlisted"``."""
    for name in files if names is None else names:
        entry = files.get(name)
        file = folder / name
        if entry is None:
            return file, "unlisted"
        if not file.is_file():
            return file, "missing"
        if file.stat().st_size != entry["size"] or hasher(file) != entry["sha256"]:
            return file, "modified"
    return None
