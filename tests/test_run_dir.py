"""Issue 20: a training overwrites only a run directory the project marked, only its own files, never
through a link. Folders are built by hand; no model is trained (the commands are in test_hardening.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
import yaml

from mdaf_rec.artifact import ArtifactWriter
from mdaf_rec.run_dir import MARKER_FILE, RunDir, RunDirError, Start, decide_start

CONFIG = {"model": {"name": "dcnv3"}, "train": {"epochs": 2}}


def _write(folder: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _snapshot(folder: Path) -> Dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder`` (links are not followed into)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refusal(run: RunDir, **flags: bool) -> str:
    with pytest.raises(RunDirError) as e:
        decide_start(run, CONFIG, resume=flags.get("resume", False), overwrite=flags.get("overwrite", False))
    return str(e.value)


def _marked_run(path: Path) -> RunDir:
    """A marked run of CONFIG with a checkpoint, as `mdaf-rec train` leaves it (the marker as documented)."""
    marker = {"project": "mdaf_rec", "kind": "run", "format_version": 1, "created": "2026-01-01 00:00:00"}
    _write(path, {MARKER_FILE: json.dumps(marker), "config.yaml": yaml.safe_dump(CONFIG), "metrics.jsonl": "{}\n", "vocab/vocab.json": "{}",
                  "tensorboard/events.out.tfevents.1": "e", "checkpoints/index.json": '{"last": "epoch_1"}',
                  "checkpoints/epoch_1/manifest.json": "{}"})
    return RunDir(path)


def test_a_new_run_is_marked_first_and_only_its_own_files_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.mkdir()
    run = RunDir(path)
    assert decide_start(run, CONFIG, resume=False, overwrite=False) is Start.FRESH
    run.start_fresh()  # what train() does first once the run is committed
    assert [p.name for p in path.iterdir()] == [MARKER_FILE]
    marker = json.loads((path / MARKER_FILE).read_text())
    assert {k: marker[k] for k in ("project", "kind", "format_version")} == {
        "project": "mdaf_rec", "kind": "run", "format_version": 1}
    assert run.is_marked() and run.is_run() and not run.is_legacy_run()

    run = _marked_run(tmp_path / "marked")
    _write(run.path, {"README.txt": "mine", "checkpoints/my_folder/w.pt": "mine too"})
    assert decide_start(run, CONFIG, resume=False, overwrite=False) is Start.RESUME
    assert decide_start(run, CONFIG, resume=False, overwrite=True) is Start.FRESH
    run.start_fresh()
    assert _snapshot(run.path) == {MARKER_FILE: (run.path / MARKER_FILE).read_bytes(), "README.txt": b"mine",
                                   "checkpoints/my_folder/w.pt": b"mine too"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_user_folder_with_a_runs_file_names_is_never_overwritten(tmp_path: Path, overwrite: bool) -> None:
    """The issue's folder: config.yaml, tensorboard/, vocab/, checkpoints/epoch_1/, metrics.json, no marker."""
    path = tmp_path / "mine"
    _write(path, {"config.yaml": "experiment: 7\n", "tensorboard/events": "my logs", "vocab/words.txt": "a b",
                  "checkpoints/epoch_1/weights.bin": "w", "metrics.json": '{"acc": 0.9}'})
    before = _snapshot(path)
    message = _refusal(RunDir(path), overwrite=overwrite)
    assert f"--out {path} exists and is not a run directory (no {MARKER_FILE})" in message, message
    assert "--overwrite" not in message, message
    assert _snapshot(path) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_export_folder_is_not_a_run(tmp_path: Path, overwrite: bool) -> None:
    path = tmp_path / "model"
    with ArtifactWriter(path) as artifact:
        _write(artifact.folder, {"config.yaml": yaml.safe_dump(CONFIG), "vocab/vocab.json": "{}", "model.pt2": "p",
                                 "feature_spec.json": "{}"})
    before = _snapshot(path)
    message = _refusal(RunDir(path), overwrite=overwrite)
    assert f"--out {path} exists and is a model folder written by `mdaf-rec export`" in message, message
    assert "--overwrite" not in message, message
    assert _snapshot(path) == before


def test_a_run_of_an_earlier_version_resumes_but_is_never_overwritten(tmp_path: Path) -> None:
    """No marker, but the config.yaml and checkpoint index of a run: resumed (same config), never deleted."""
    path = tmp_path / "legacy"
    _write(path, {"config.yaml": yaml.safe_dump(CONFIG), "checkpoints/index.json": '{"last": "epoch_1"}',
                  "checkpoints/epoch_1/manifest.json": "{}", "metrics.jsonl": "{}\n"})
    run = RunDir(path)
    before = _snapshot(path)
    message = _refusal(run, overwrite=True)
    assert f"{path} holds a run of an earlier version (it has no {MARKER_FILE}), which is never overwritten" in message
    assert "--overwrite" not in message, message
    assert decide_start(run, CONFIG, resume=False, overwrite=False) is Start.RESUME
    assert run.is_legacy_run() and run.is_run() and not run.is_marked()
    other = {**CONFIG, "model": {"name": "mdaf_bst"}}
    with pytest.raises(RunDirError, match="holds a run of another config") as e:
        decide_start(run, other, resume=False, overwrite=False)
    assert "--overwrite" not in str(e.value)
    assert _snapshot(path) == before


@pytest.mark.parametrize("link", ["tensorboard", "checkpoints", "checkpoints/epoch_1"])
def test_overwrite_never_deletes_through_a_link(tmp_path: Path, link: str) -> None:
    run = _marked_run(tmp_path / "run")
    target = tmp_path / "elsewhere"
    (run.path / link).rename(target)
    (run.path / link).symlink_to(target, target_is_directory=True)
    before, kept = _snapshot(run.path), _snapshot(target)
    message = _refusal(run, overwrite=True)
    assert f"{run.path / link} is a symbolic link" in message and "nothing was deleted" in message, message
    assert _snapshot(run.path) == before and _snapshot(target) == kept
    # Should a link appear after the decision, starting afresh removes the link itself, not its target's files.
    run.start_fresh()
    assert not (run.path / link).exists() and _snapshot(target) == kept
