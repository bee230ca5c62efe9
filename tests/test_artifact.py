"""ArtifactWriter: an export into a folder replaces only the earlier export's files, and only an intact export of
this project (no model needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mdaf_rec import manifest
from mdaf_rec.artifact import FORMAT_VERSION, ArtifactError, ArtifactWriter, verify_artifact


def _write(folder: Path, files: dict) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writes_manifest_over_every_file_and_replaces_the_earlier_export(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with ArtifactWriter(out) as first:
        _write(first.folder, {"model.pt2": "v1", "vocab/old.npy": "old", "vocab/vocab.json": "{}"})
    assert first.sha256 == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert verify_artifact(out, first.sha256) == {
        "model.pt2": {"sha256": hashlib.sha256(b"v1").hexdigest(), "size": 2},
        "vocab/old.npy": {"sha256": hashlib.sha256(b"old").hexdigest(), "size": 3},
        "vocab/vocab.json": {"sha256": hashlib.sha256(b"{}").hexdigest(), "size": 2},
    }
    _write(out, {"notes.txt": "mine", "vocab/README": "mine too"})

    with ArtifactWriter(out) as second:
        _write(second.folder, {"model.pt2": "v2", "vocab/vocab.json": "{}"})
    assert _snapshot(out) == {
        "manifest.json": (out / "manifest.json").read_bytes(),
        "model.pt2": b"v2",
        "notes.txt": b"mine",
        "vocab/README": b"mine too",
        "vocab/vocab.json": b"{}",
    }
    assert sorted(json.loads((out / "manifest.json").read_text())["files"]) == ["model.pt2", "vocab/vocab.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left


def test_a_file_in_the_way_or_a_failure_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with ArtifactWriter(out) as first:
        _write(first.folder, {"model.pt2": "v1"})
    _write(out, {"config.yaml": "the user's own"})
    before = _snapshot(out)

    with pytest.raises(ArtifactError, match=r"config.yaml: exists and is not a file of the earlier export"):
        with ArtifactWriter(out) as second:
            _write(second.folder, {"model.pt2": "v2", "config.yaml": "the run's"})
    assert _snapshot(out) == before

    with pytest.raises(RuntimeError, match="export failed"):
        with ArtifactWriter(out) as third:
            _write(third.folder, {"model.pt2": "v3"})
            raise RuntimeError("export failed")
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_refuses_a_file_or_a_folder_without_an_earlier_export(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        ArtifactWriter(tmp_path / "file")
    _write(tmp_path / "mine", {"feature_spec.json": "{}"})
    with pytest.raises(ArtifactError, match="folder is not empty and holds no earlier export"):
        ArtifactWriter(tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]


@pytest.mark.parametrize("how", ["hand_written_manifest", "checkpoint_manifest", "edited_export"])
def test_only_an_intact_export_of_this_project_is_replaced(tmp_path: Path, how: str) -> None:
    """A folder is an earlier export only by the manifest's format marker AND every listed file matching its
    hash: a user's hand-written manifest, a checkpoint's, or an export edited since are refused untouched."""
    out = tmp_path / "mine"
    if how == "edited_export":
        with ArtifactWriter(out) as first:
            _write(first.folder, {"model.pt2": "v1", "config.yaml": "the run's"})
        (out / "config.yaml").write_text("edited by hand")
        expected = "config.yaml is modified (listed in manifest.json)"
    else:
        _write(out, {"data.csv": "a,b\n1,2\n", "images/a.png": "png"})
        if how == "hand_written_manifest":  # the same shape and correct hashes, but another tool's
            files = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in _snapshot(out).items()}
            (out / "manifest.json").write_text(json.dumps({"files": files}))
        else:
            manifest.write_manifest(out)  # what every checkpoint folder holds
        expected = f"manifest.json is not one `mdaf-rec export` wrote (no mdaf_rec model format {FORMAT_VERSION} marker"
    before = _snapshot(out)
    with pytest.raises(ArtifactError) as e:
        with ArtifactWriter(out) as second:
            _write(second.folder, {"model.pt2": "v2"})
    assert f"--out {out}: " in str(e.value) and expected in str(e.value), str(e.value)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_an_export_never_deletes_through_a_link(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with ArtifactWriter(out) as first:
        _write(first.folder, {"model.pt2": "v1", "vocab/vocab.json": "{}", "vocab/item.npy": "ids"})
    elsewhere = tmp_path / "elsewhere"
    (out / "vocab").rename(elsewhere)  # the same files, now reached through a link
    (out / "vocab").symlink_to(elsewhere, target_is_directory=True)
    kept = _snapshot(elsewhere)
    with pytest.raises(ArtifactError, match=f"{out / 'vocab'} is a symbolic link"):
        with ArtifactWriter(out) as second:
            _write(second.folder, {"model.pt2": "v2", "vocab/vocab.json": "{}"})
    assert _snapshot(elsewhere) == kept and (out / "vocab").is_symlink() and (out / "model.pt2").read_text() == "v1"
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    with pytest.raises(ArtifactError, match=f"--out {link}: is a symbolic link"):
        ArtifactWriter(link)
