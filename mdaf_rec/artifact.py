"""The serving artifact folder (MODEL_DIR): its file names, its manifest, and how it is written and verified.

``manifest.json`` lists every file ``mdaf-rec export`` wrote (path relative to MODEL_DIR → ``sha256`` and
``size``), whatever those files are, under the model format marker (:mod:`mdaf_rec.marker`); the sha256 of
``manifest.json`` itself is the artifact's hash, printed by ``export`` and checked by ``predict
--manifest-sha256``. Files not listed (a ``notes.txt`` a user adds) are never read and never deleted, and a
listed file is replaced only when the whole folder is still the export as written (:func:`earlier_export`).
See ``docs/serving.md`` for the trust boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from mdaf_rec import manifest
from mdaf_rec.errors import UserError
from mdaf_rec.manifest import MANIFEST_FILE
from mdaf_rec.marker import PROJECT, format_marker, is_format_marker

SPEC_FILE = "feature_spec.json"
PROGRAM_FILE = "model.pt2"
CPU_PROGRAM_FILE = "model.cpu.pt2"
OPS_LIBRARY_FILE = "ops/mdaf_rec_ops.so"
# of a MODEL_DIR (feature_spec.json, the manifest's marker); 2: the checksums moved to manifest.json; 3: the tables
# are raw files (tables/) looked up outside the program, whose inputs are the indices and the rows
FORMAT_VERSION = 3
MODEL_KIND = "model"  # the manifest's format marker: {"project": "mdaf_rec", "kind": "model", "format_version": 3}

class ArtifactError(UserError, RuntimeError):
    """A MODEL_DIR is incomplete or was modified, or an export target is unsafe (the message names the file)."""


def write_manifest(folder: Path) -> str:
    """Writes ``folder``'s ``manifest.json`` under the model format marker (what lets a later export recognise
    the folder as its own); returns the manifest's sha256."""
    return manifest.write_manifest(folder, format_marker=format_marker(MODEL_KIND, FORMAT_VERSION))


def has_model_marker(folder: Path) -> bool:
    """True if ``folder``'s ``manifest.json`` carries the model format marker (its files are not checked here)."""
    return is_format_marker(manifest.read_format(folder), MODEL_KIND, FORMAT_VERSION)


def read_manifest(model_dir: Path, expected_sha256: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """``{path: {"sha256", "size"}}`` of ``model_dir``'s manifest (:func:`mdaf_rec.manifest.read_manifest`),
    its own sha256 checked first if given; :class:`ArtifactError` naming the manifest otherwise."""
    return manifest.read_manifest(model_dir, ArtifactError, expected_sha256,
                                  missing="missing (not a model folder written by `mdaf-rec export`?)")


def verify_artifact(model_dir: Path, expected_sha256: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Checks every file listed in ``model_dir``'s manifest (size and sha256), with ``expected_sha256`` the
    manifest's own hash first; returns the manifest (:func:`read_manifest`).

    Raises :class:`ArtifactError` naming the first missing or modified file.
    """
    files = read_manifest(model_dir, expected_sha256)
    bad = manifest.first_mismatch(model_dir, files)
    if bad is not None:
        file, problem = bad
        if problem == "missing":
            raise ArtifactError(f"{file}: missing from the model folder (listed in {MANIFEST_FILE})")
        raise ArtifactError(f"{file}: sha256 differs from {MANIFEST_FILE} (file modified or corrupted)")
    return files


def read_feature_spec(model_dir: Path, expected_sha256: Optional[str] = None) -> Dict[str, Any]:
    """``feature_spec.json`` of ``model_dir``, read only after :func:`verify_artifact` passed."""
    verify_artifact(model_dir, expected_sha256)
    path = model_dir / SPEC_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (not a model folder written by `mdaf-rec export`?)")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {doc.get('format_version')!r}, expected {FORMAT_VERSION}")
    return doc


class ArtifactWriter:
    """Writes a MODEL_DIR ``out`` safely: ``with ArtifactWriter(out) as artifact:`` write the files into
    ``artifact.folder`` (a new folder beside ``out``); leaving the block writes their manifest and moves
    them into ``out`` (``artifact.sha256`` is then the manifest's sha256); an exception removes them.

    The files listed in ``out``'s earlier export are replaced or deleted; any other file of ``out`` stays.
    Refused with :class:`ArtifactError`: an ``out`` that is a symbolic link, a file, or a non-empty folder that
    is not an earlier export (:func:`earlier_export`: at construction, before anything is written, and again
    before anything is deleted), and a user's file in the way of a new one (before ``out`` is changed). The
    manifest moves last, so an interrupted move leaves no manifest vouching for a half-written folder.

    Args:
        out: the MODEL_DIR to write.
    """

    def __init__(self, out: Path) -> None:
        if out.is_symlink():
            raise ArtifactError(f"--out {out}: is a symbolic link; give the folder itself")
        if out.exists() and not out.is_dir():
            raise ArtifactError(f"--out {out}: is a file, not a folder")
        earlier_export(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        self.sha256: Optional[str] = None

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.sha256 = self._publish()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _publish(self) -> str:
        """Writes the manifest of :attr:`folder` and moves its files into :attr:`out`; returns the manifest's sha256."""
        out, staged = self.out, self.folder
        digest = write_manifest(staged)
        new = sorted(read_manifest(staged))
        old = earlier_export(out)
        for name in new:
            in_the_way = _in_the_way(out, name, old)
            if in_the_way is not None:
                raise ArtifactError(
                    f"{in_the_way}: exists and is not a file of the earlier export; refusing to replace it"
                )
        for name in [MANIFEST_FILE, *old]:
            (out / name).unlink(missing_ok=True)
            _remove_empty_parents(out / name, out)
        for name in new:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / name, out / name)
        os.replace(staged / MANIFEST_FILE, out / MANIFEST_FILE)
        return digest


def earlier_export(out: Path) -> List[str]:
    """The files of the earlier export in ``out`` (its manifest's list): the only files an export may replace.

    ``[]`` for a new or empty folder. A non-empty folder must still be an export of this project exactly as
    written: a ``manifest.json`` (a regular file) under the model format marker, and every file it lists a
    regular file, reached through no symbolic link, of the recorded size and sha256. Anything else (a
    hand-written or another tool's ``manifest.json``, a checkpoint folder, an export of an earlier version,
    an edited export) is an :class:`ArtifactError` naming the reason, and nothing is touched.
    """
    if not out.is_dir() or not any(out.iterdir()):
        return []
    refused = "nothing written or deleted: give a new or empty folder"
    if not os.path.lexists(out / MANIFEST_FILE):
        raise ArtifactError(
            f"--out {out}: folder is not empty and holds no earlier export ({MANIFEST_FILE} missing); {refused}"
        )
    if not has_model_marker(out):
        raise ArtifactError(
            f"--out {out}: {MANIFEST_FILE} is not one `mdaf-rec export` wrote (no {PROJECT} model format "
            f"{FORMAT_VERSION} marker; exports of earlier versions have none); {refused}"
        )
    files = read_manifest(out)
    for name in files:
        link = _link_on_path(out, name)
        if link is not None:
            raise ArtifactError(
                f"--out {out}: {link} is a symbolic link; an export never deletes through one; {refused}"
            )
    bad = manifest.first_mismatch(out, files)
    if bad is not None:
        file, problem = bad
        raise ArtifactError(
            f"--out {out}: {file} is {problem} (listed in {MANIFEST_FILE}): the folder is no longer the export "
            f"as written; {refused}"
        )
    return sorted(files)


def _link_on_path(root: Path, name: str) -> Optional[Path]:
    """The first symbolic link among ``root/name`` and the folders between them, if any."""
    parts = Path(name).parts
    for depth in range(1, len(parts) + 1):
        path = root.joinpath(*parts[:depth])
        if path.is_symlink():
            return path
    return None


def _in_the_way(out: Path, name: str, old: List[str]) -> Optional[Path]:
    """The user's file, folder or link that writing ``out/name`` would replace or write through, if any."""
    if os.path.lexists(out / name) and name not in old:
        return out / name
    for folder in Path(name).parents[:-1]:
        if (out / folder).is_symlink() or ((out / folder).exists() and not (out / folder).is_dir()):
            return out / folder
    return None


def _remove_empty_parents(path: Path, root: Path) -> None:
    """Removes the now-empty folders between ``path`` and ``root`` (exclusive)."""
    for parent in path.parents:
        if parent == root or not parent.is_relative_to(root):
            return
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
