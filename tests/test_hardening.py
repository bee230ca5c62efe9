"""Issue 9: checkpoints never run code and are verified before use; a run directory never loses or mixes
data; in-epoch checkpoints and launcher restarts continue exactly; a normal run is quiet. Issue 20: only a
folder the project marked as a run is ever overwritten.

Every command is a process of its own (``mdaf-rec`` forked from a preloaded server, see ``cli_runner``; a new
interpreter where its imports matter; ``torchrun``), as a user would launch it; where one case of a refusal shows the
command's one-line error, its other cases call the check itself in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml

from mdaf_rec import checkpoint as ckpt
from mdaf_rec import cli
from mdaf_rec.config import load_config
from mdaf_rec.data.synth import generate
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.plan_io import PlanFileError, check_plan, load_plan
from mdaf_rec.run_dir import MARKER_FILE
from mdaf_rec.trainable import build_train_module
from test_train import REPO, TINY, _env, _free_port, mdaf, train

DCN = "configs/dcnv3.yaml"
BST = "configs/mdaf_bst.yaml"



@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory) -> Path:
    """A finished 1-epoch DCNv3 run (copied by the tests that change it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(dataset, run, "--epochs", "1", config=DCN)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _snapshot(folder: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI's single error line; asserts exit status 2 and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if re.match(r"mdaf-rec( [a-z]+)?: error: ", line)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Checkpoints never run code
# --------------------------------------------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    """Protocol-4 opcodes pushing ``module.name`` (STACK_GLOBAL: the name may hold dots)."""
    return _text(module) + _text(name) + pickle.STACK_GLOBAL


def _text(s: str) -> bytes:
    return pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()


def _call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)``: each argument is the opcodes that push it."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _payloads(marker: Path) -> Dict[str, bytes]:
    """Pickles that run ``touch marker`` when unpickled by a permissive unpickler."""
    cmd = f"touch {marker}"
    head, stop = pickle.PROTO + b"\x04", pickle.STOP
    getattr_ = _global("builtins", "getattr")
    # PosixPath.exists.__globals__.get("os").system(cmd), spelled as nested getattr calls
    init_globals = _call(getattr_, _call(getattr_, _global("pathlib", "PosixPath"), _text("exists")), _text("__globals__"))
    system = _call(getattr_, _call(_call(getattr_, init_globals, _text("get")), _text("os")), _text("system"))
    return {
        # an allowed module with a dotted name: torch.distributed.checkpoint.filesystem.os.system
        "dotted_name": head + _call(_global("torch.distributed.checkpoint.filesystem", "os.system"), _text(cmd)) + stop,
        # a plain reduce to os.system
        "os_system": pickle.dumps(_Reduce(cmd), protocol=4),
        "getattr_chain": head + _call(system, _text(cmd)) + stop,
    }


class _Reduce:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _replace_and_rehash(path: Path, content: bytes) -> None:
    """Writes ``content`` to a checkpoint file and fixes the manifest, as an attacker would."""
    path.write_bytes(content)
    manifest_path = path.parent / ckpt.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("payload", ["dotted_name", "os_system", "getattr_chain"])
def test_crafted_metadata_is_refused_without_running_it(trained: Path, tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "epoch_1"
    shutil.copytree(trained / "checkpoints" / "epoch_1", folder)
    _replace_and_rehash(folder / ".metadata", _payloads(marker)[payload])
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refers to .*which a checkpoint may not"):
        ckpt.load_checkpoint(folder, {"model": {}})
    assert not marker.exists()


@pytest.mark.parametrize(
    "command,payload",
    [("eval", "dotted_name"), ("export", "os_system"), ("resume", "getattr_chain"), ("eval", "rng")],
)
def test_commands_refuse_a_malicious_checkpoint_with_one_line(
    dataset: Path, trained: Path, tmp_path: Path, command: str, payload: str
) -> None:
    run = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    folder = run / "checkpoints" / "epoch_1"
    if payload == "rng":  # a torch.save file whose unpickling would run a command
        buf = tmp_path / "evil.pt"
        torch.save(_Reduce(f"touch {marker}"), buf)
        _replace_and_rehash(folder / "rng_rank0.pt", buf.read_bytes())
    else:
        _replace_and_rehash(folder / ".metadata", _payloads(marker)[payload])
    if command == "eval":
        proc = mdaf("eval", "--run", str(run), check=False)
    elif command == "export":
        proc = mdaf("export", "--run", str(run), "--out", str(tmp_path / "model"), check=False)
    else:
        proc = train(dataset, run, "--epochs", "2", "--resume", config=DCN, check=False)
    line = _one_line_error(proc)
    assert str(folder) in line, line
    assert "weights_only=False" not in proc.stderr + proc.stdout
    assert not marker.exists()


def test_a_flipped_bit_in_the_weights_is_refused_naming_the_file(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    weights = run / "checkpoints" / "epoch_1" / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    line = _one_line_error(mdaf("eval", "--run", str(run), check=False))
    assert str(weights) in line and "does not match the checkpoint's manifest" in line, line


@pytest.mark.parametrize("damage", ["truncated_metadata", "no_manifest", "bad_index"])
def test_corrupt_checkpoints_end_with_one_line(trained: Path, tmp_path: Path, damage: str) -> None:
    run = _copy(trained, tmp_path)
    folder = run / "checkpoints" / "epoch_1"
    if damage == "truncated_metadata":
        content = (folder / ".metadata").read_bytes()[:100]
        _replace_and_rehash(folder / ".metadata", content)
        named = folder / ".metadata"
    elif damage == "no_manifest":
        (folder / ckpt.MANIFEST_FILE).unlink()
        named = folder / ckpt.MANIFEST_FILE
    else:
        (run / "checkpoints" / "index.json").write_text("{not json")
        named = run / "checkpoints" / "index.json"
    line = _one_line_error(mdaf("eval", "--run", str(run), check=False))
    assert str(named) in line, line


def test_an_index_entry_pointing_outside_the_run_is_refused(trained: Path, tmp_path: Path) -> None:
    """Issue 20: ``best`` naming another run's checkpoint evaluated that run's weights."""
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    run = _copy(trained, tmp_path)
    index_path = run / "checkpoints" / "index.json"
    index = json.loads(index_path.read_text())
    index["best"] = "../../other/checkpoints/epoch_1"
    index_path.write_text(json.dumps(index))
    line = _one_line_error(mdaf("eval", "--run", str(run), check=False))
    expected = f"{index_path}: its 'best' entry '../../other/checkpoints/epoch_1' is not a checkpoint of this run"
    assert expected in line, line
    index.update(best="epoch_7", last="/abs/epoch_1")
    index_path.write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match=r"its 'last' entry '/abs/epoch_1' is not a checkpoint of this run"):
        ckpt.checkpoint_path(run, "best")
    index["last"] = "epoch_1"
    index_path.write_text(json.dumps(index))
    (run / "checkpoints" / "epoch_7").symlink_to(other / "checkpoints" / "epoch_1")
    with pytest.raises(ckpt.CheckpointError, match=r"epoch_7: a link to .*other/checkpoints/epoch_1, not a checkpoint"):
        ckpt.checkpoint_path(run, "best")


def test_a_metadata_reading_a_file_outside_its_manifest_is_refused(trained: Path, tmp_path: Path) -> None:
    """Issue 20: a ``.metadata`` (rehashed into the manifest) could read its tensors from another run's files."""
    shutil.copytree(trained, tmp_path / "other")
    run = _copy(trained, tmp_path)
    folder = run / "checkpoints" / "epoch_1"
    with open(folder / ".metadata", "rb") as fh:
        metadata = pickle.load(fh)  # our own test file: a plain unpickler is fine here
    for info in metadata.storage_data.values():
        info.relative_path = f"../../../other/checkpoints/epoch_1/{info.relative_path}"
    _replace_and_rehash(folder / ".metadata", pickle.dumps(metadata, protocol=4))
    line = _one_line_error(mdaf("eval", "--run", str(run), check=False))
    assert f"{folder / '.metadata'}: reads its tensors from '../../../other/checkpoints/epoch_1/" in line, line
    assert "a file not in the checkpoint's manifest" in line, line


# --------------------------------------------------------------------------------------------------
# No lost or mixed data
# --------------------------------------------------------------------------------------------------


def test_out_on_a_folder_that_is_not_a_run_is_refused_untouched(dataset: Path, tmp_path: Path) -> None:
    """With or without --overwrite (issue 20: it wrote the run beside the user's files, and a folder that holds
    a config.yaml lost its run-like names: tests/test_run_dir.py)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "keep.txt").write_text("mine too")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):  # --overwrite is no way around it, and the refusal does not suggest it
        line = _one_line_error(train(dataset, out, "--epochs", "1", *extra, config=DCN, check=False))
        assert f"exists and is not a run directory (no {MARKER_FILE})" in line and "--overwrite" not in line, line
        assert _snapshot(out) == before and not (out / ".lock").exists()


def test_overwrite_deletes_only_the_runs_own_files(dataset: Path, trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / "my_folder").mkdir()
    (run / "checkpoints" / "my_folder" / "w.pt").write_text("x")
    (run / "README.txt").write_text("about this run")
    train(dataset, run, "--epochs", "2", "--overwrite", config=DCN)
    assert (run / "checkpoints" / "my_folder" / "w.pt").exists() and (run / "README.txt").exists()
    lines = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2]  # the old run's epoch 1 line went with the old run


def test_a_run_of_an_earlier_version_resumes_but_is_never_overwritten(
    dataset: Path, trained: Path, tmp_path: Path
) -> None:
    """A run written before run directories were marked (no marker file) is resumed by the same command and
    refused by --overwrite (one line that does not suggest it), byte for byte."""
    run = _copy(trained, tmp_path)
    (run / MARKER_FILE).unlink(missing_ok=True)
    before = _snapshot(run)
    line = _one_line_error(train(dataset, run, "--epochs", "2", "--overwrite", config=DCN, check=False))
    assert f"holds a run of an earlier version (it has no {MARKER_FILE})" in line and "--overwrite" not in line, line
    assert _snapshot(run) == before
    proc = train(dataset, run, "--epochs", "2", config=DCN)
    assert "holds a checkpoint of this run: resuming it (a run of an earlier version)" in proc.stderr
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / MARKER_FILE).exists()
    assert json.loads((trained / MARKER_FILE).read_text())["project"] == "mdaf_rec"  # what this version writes


def test_overwrite_with_a_linked_folder_is_refused_before_deleting_anything(
    dataset: Path, trained: Path, tmp_path: Path
) -> None:
    """Issue 20: a symlinked tensorboard/ and --overwrite left the run half-deleted with a traceback."""
    run = _copy(trained, tmp_path)
    elsewhere = tmp_path / "shared_tensorboard"
    (run / "tensorboard").rename(elsewhere)
    (run / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    before, kept = _snapshot(run), _snapshot(elsewhere)
    line = _one_line_error(train(dataset, run, "--epochs", "1", "--overwrite", config=DCN, check=False))
    assert f"{run / 'tensorboard'} is a symbolic link" in line and "nothing was deleted" in line, line
    assert _snapshot(run) == before and _snapshot(elsewhere) == kept


@pytest.mark.parametrize(
    "change,resume", [(["--model", "mdaf_bst"], True), (["--set", "features.sequence_dim=32"], False)]
)
def test_a_run_of_another_config_is_refused_byte_for_byte(
    dataset: Path, trained: Path, tmp_path: Path, change: List[str], resume: bool
) -> None:
    run = _copy(trained, tmp_path)
    before = _snapshot(run)
    extra = ["--resume"] if resume else []
    line = _one_line_error(train(dataset, run, "--epochs", "2", *change, *extra, config=DCN, check=False))
    assert "another config" in line and ("model.name" in line or "features.sequence_dim" in line), line
    assert _snapshot(run) == before


def test_rerunning_the_same_command_resumes_without_duplicate_lines(dataset: Path, trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    proc = train(dataset, run, "--epochs", "2", config=DCN)
    assert "holds a checkpoint of this run: resuming it" in proc.stderr
    again = train(dataset, run, "--epochs", "2", config=DCN)  # finished: re-scores, trains nothing
    assert "resuming" in again.stderr
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_second_training_on_the_same_run_fails_at_once_naming_the_holder(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [item for s in TINY for item in ("--set", s)]
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", DCN, "--data", str(dataset), "--out", str(run),
           "--epochs", "50", *sets, "--set", "train.patience=50"]
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "index.json").exists():  # holds the lock and has trained an epoch
            assert first.poll() is None and time.time() < deadline, "first training did not start"
            time.sleep(0.2)
        line = _one_line_error(train(dataset, run, "--epochs", "50", config=DCN, check=False))
        assert f"in use by pid {first.pid}" in line, line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The dead holder's lock is reclaimed with a message; the run resumes.
    proc = train(dataset, run, "--epochs", "2", "--set", "train.patience=1", config=DCN, check=False)
    assert f"reclaiming the lock of {run} left by pid {first.pid}" in proc.stderr, proc.stderr[-2000:]


def test_a_one_class_validation_split_is_refused_at_start(tmp_path: Path) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    generate(data, rows=1500, users=100, items=300, categories=20, max_history=10, seed=1)
    val = pq.read_table(data / "val.parquet")
    pq.write_table(val.set_column(val.schema.get_field_index("label"), "label",
                                  pc.multiply(val.column("label"), 0)), data / "val.parquet")
    line = _one_line_error(train(data, tmp_path / "run", "--epochs", "1", config=DCN, check=False))
    assert f"the val split has {val.num_rows} rows, 0 of them with label 1" in line, line
    assert not (tmp_path / "run").exists()


def test_eval_and_export_use_the_time_zone_recorded_at_training(dataset: Path, trained: Path, tmp_path: Path) -> None:
    """Issue 20: with ``features.timezone: null`` the run kept no zone, and eval / export re-read ``meta.json``: an
    edit after training changed eval AUC and the exported model. The zone is resolved at training and recorded."""
    config = yaml.safe_load((trained / "config.yaml").read_text())
    meta_zone = json.loads((dataset / "meta.json").read_text())["timezone"]
    assert config["features"]["timezone"] == meta_zone == "Asia/Shanghai"  # resolved when training started
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "timezone": "America/New_York"}))
    run = _copy(trained, tmp_path)
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "data": {**config["data"], "path": str(data)}},
                                                    sort_keys=False))
    warning = (f"{data / 'meta.json'} says time zone 'America/New_York', but the run was trained with 'Asia/Shanghai' "
               "(its config.yaml): using 'Asia/Shanghai'")
    proc = mdaf("eval", "--run", str(run))
    trained_auc = json.loads((trained / "metrics.json").read_text())["test"]["auc"]
    assert json.loads(proc.stdout)["auc"] == pytest.approx(trained_auc, abs=1e-9)
    assert warning in proc.stderr, proc.stderr[-2000:]
    proc = mdaf("export", "--run", str(run), "--out", str(tmp_path / "model"), "--no-compile")
    assert json.loads((tmp_path / "model" / "feature_spec.json").read_text())["timezone"] == "Asia/Shanghai"
    assert warning in proc.stderr, proc.stderr[-2000:]


def test_a_one_class_test_split_is_recorded_as_not_computable(tmp_path: Path) -> None:
    """Issue 20: ``auc: NaN`` in metrics.json and ``auc nan`` printed, exit 0. The test split is not refused (training
    does not read it): a line says so at the start, and its undefined metrics are null with the reason."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    generate(data, rows=1500, users=100, items=300, categories=20, max_history=10, seed=1)
    test = pq.read_table(data / "test.parquet")
    pq.write_table(test.set_column(test.schema.get_field_index("label"), "label",
                                   pc.multiply(test.column("label"), 0)), data / "test.parquet")
    proc = train(data, tmp_path / "run", "--epochs", "1", config=DCN)
    counts = f"the test split has {test.num_rows} rows, 0 of them with label 1"
    assert f"{counts}: its AUC, GAUC and NE will be recorded as not computable" in proc.stderr, proc.stderr[-2000:]
    reason = f"one class only: 0 of {test.num_rows} rows have label 1"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]  # strict JSON: no NaN
    assert metrics["auc"] is None and metrics["gauc"] is None and metrics["ne"] is None
    assert metrics["not_computable"] == {"auc": reason, "gauc": reason, "ne": reason, "calibration": reason}
    assert metrics["logloss"] > 0 and metrics["count"] == test.num_rows
    assert f"test: auc n/a ({reason})" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------------
# In-epoch checkpoints, crashes and launcher restarts
# --------------------------------------------------------------------------------------------------

STEP_CKPT = ["--set", "train.checkpoint_every_steps=7", "--set", "train.keep_step_checkpoints=1"]


def _final(run: Path) -> Dict[str, float]:
    m = json.loads((run / "metrics.json").read_text())
    losses = [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {**{f"{s}_{k}": m[s][k] for s in ("val", "test") for k in ("auc", "logloss", "gauc")},
            **{f"loss_{i}": v for i, v in enumerate(losses)}}


def test_kill_mid_epoch_then_rerun_equals_the_uninterrupted_run(dataset: Path, tmp_path: Path) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(dataset, straight, "--epochs", "2", *STEP_CKPT, config=BST)
    env = {"MDAF_FAULT_KILL_AT_STEP": "14"}  # epoch 1 has 18 steps: killed after its step_14 checkpoint
    proc = _train_with_env(dataset, crashed, env, "--epochs", "2", *STEP_CKPT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    index = json.loads((crashed / "checkpoints" / "index.json").read_text())
    assert index["last"] == "step_14" and index["steps"] == ["step_14"]
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir() if p.is_dir()) == ["step_14"]
    rerun = train(dataset, crashed, "--epochs", "2", *STEP_CKPT, config=BST)  # the same command again
    assert "resuming" in rerun.stderr and "step_14 (epoch 1, step 14)" in rerun.stderr
    a, b = _final(straight), _final(crashed)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


def _train_with_env(data: Path, out: Path, extra_env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    sets = [item for s in TINY for item in ("--set", s)]
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", BST, "--data", str(data), "--out", str(out),
           *sets, *args]
    return subprocess.run(cmd, cwd=REPO, env={**_env(), **extra_env}, capture_output=True, text=True, timeout=600)


def test_torchrun_restart_after_a_killed_rank_equals_the_uninterrupted_job(dataset: Path, tmp_path: Path) -> None:
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    train(dataset, straight, "--epochs", "1", *STEP_CKPT, config=BST, nproc=2)
    sets = [item for s in TINY + ["train.checkpoint_every_steps=7", "train.keep_step_checkpoints=1"]
            for item in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           f"--master_port={_free_port()}", "-m", "mdaf_rec.cli", "train", "--config", BST, "--data", str(dataset),
           "--out", str(restarted), "--epochs", "1", *sets]
    env = {**_env(), "MDAF_FAULT_KILL_AT_STEP": "7", "MDAF_FAULT_KILL_RANK": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "killing this process (rank 1) after step 7" in proc.stderr
    assert "resuming" in proc.stderr and "step_7 (epoch 1, step 7)" in proc.stderr
    a, b = _final(straight), _final(restarted)
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


# --------------------------------------------------------------------------------------------------
# A quiet run
# --------------------------------------------------------------------------------------------------

NOISE = ("Warning", "[TBE=", " root:", "torchrec.", "is_fx_tracing", "fbgemm")


def test_a_training_run_shows_only_its_own_lines_unless_verbose(dataset: Path, tmp_path: Path) -> None:
    # fresh interpreters: the lines their imports print count too
    quiet = train(dataset, tmp_path / "quiet", "--epochs", "1", config="configs/mdaf_mamba.yaml", fresh=True)
    noisy = [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISE)]
    assert noisy == [], noisy
    loud = train(dataset, tmp_path / "loud", "--epochs", "1", "-v", config="configs/mdaf_mamba.yaml", fresh=True)
    assert any("[TBE=" in line for line in loud.stderr.splitlines())  # FBGEMM's INFO dumps, shown with -v


# --------------------------------------------------------------------------------------------------
# Refused writes end with one line (issue 20)
# --------------------------------------------------------------------------------------------------


def _with_file_size_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    """``mdaf-rec ARGS`` with every file it writes limited to ``limit`` bytes (RLIMIT_FSIZE): a write past it
    fails at the OS layer (EFBIG; Python ignores SIGXFSZ) as on a full disk, portably and without root."""
    import resource

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "mdaf_rec.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600, preexec_fn=limit_files)


def test_train_onto_a_full_disk_ends_with_one_line_and_no_complete_looking_checkpoint(dataset: Path, trained: Path,
                                                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [item for s in TINY for item in ("--set", s)]
    # the checkpoint's weights (~250 kB) do not fit; config, plan, vocabularies and logs do
    proc = _with_file_size_limit(100_000, "train", "--config", DCN, "--data", str(dataset), "--out", str(run),
                                 "--epochs", "1", *sets)
    line = _one_line_error(proc)
    assert line.startswith(f"mdaf-rec: error: {run}: cannot write (") and "disk is full" in line, line
    assert not (run / "checkpoints" / "index.json").exists()
    assert not list(run.glob("checkpoints/*/manifest.json"))  # no checkpoint looks complete


@pytest.mark.parametrize("limit", [100_000, 1])
def test_export_onto_a_full_disk_ends_with_one_line_not_an_abort(trained: Path, tmp_path: Path, limit: int) -> None:
    """model.pt2 (~300 kB) does not fit: torch's C++ archive writer used to abort (exit 134)."""
    out = tmp_path / "model"
    proc = _with_file_size_limit(limit, "export", "--run", str(trained), "--out", str(out), "--no-compile")
    line = _one_line_error(proc)
    assert line.startswith(f"mdaf-rec export: error: {out}: cannot write ") and "model.pt2" in line, line
    assert list(tmp_path.iterdir()) == []  # neither MODEL_DIR nor its staging folder


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory) -> Path:
    """``trained`` exported (portable program only)."""
    model = tmp_path_factory.mktemp("exported") / "model"
    mdaf("export", "--run", str(trained), "--out", str(model), "--no-compile")
    return model


def test_predict_onto_a_full_disk_ends_with_one_line_and_no_output(dataset: Path, exported: Path, tmp_path: Path) -> None:
    model = exported
    out = tmp_path / "scores" / "s.parquet"
    proc = _with_file_size_limit(2_000, "predict", "--model", str(model), "--data", str(dataset / "train.parquet"),
                                 "--out", str(out))
    line = _one_line_error(proc)
    assert line.startswith(f"mdaf-rec predict: error: {out}: cannot write (") and "disk is full" in line, line
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Bad input found before the work, one line each (issue 20)
# --------------------------------------------------------------------------------------------------


def test_an_rng_file_of_the_wrong_size_is_one_line(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    rng = run / "checkpoints" / "epoch_1" / "rng_rank0.pt"
    buf = tmp_path / "short.pt"
    torch.save({"cpu": torch.zeros(10, dtype=torch.uint8)}, buf)
    _replace_and_rehash(rng, buf.read_bytes())
    line = _one_line_error(mdaf("eval", "--run", str(run), check=False))
    assert line.startswith(f"mdaf-rec: error: {rng}: not an RNG state of this torch's generators (Expected a "), line


def _edit_plan(plan: Path, out: Path, edit) -> Path:
    data = json.loads(plan.read_text())
    edit(data["modules"]["model.static_branch.embeddings.embedding_bag_collection"]["static_item"])
    out.write_text(json.dumps(data))
    return out


PLAN_EDITS = [
    (lambda t: t["shards"][0].update(placement="rank:3/cpu"),
     "table 'static_item': shard placement 'rank:3/cpu' is not a cpu device of ranks 0..0"),
    (lambda t: t["shards"][0]["sizes"].__setitem__(1, 3),
     "table 'static_item': the shards' sizes do not tile the table's [544, 4]"),
    (lambda t: t["shards"][0]["sizes"].__setitem__(0, 554),
     "table 'static_item': the plan's shards cover 554 rows, this model's table has 544: the plan was made for other "
     "vocabulary sizes"),
]


def test_a_plan_that_does_not_fit_the_model_is_one_line(dataset: Path, trained: Path, tmp_path: Path) -> None:
    """``train --plan`` checks the plan before sharding: one line naming the plan file and the table."""
    edit, message = PLAN_EDITS[0]
    plan = _edit_plan(trained / "plan.json", tmp_path / "plan.json", edit)
    line = _one_line_error(train(dataset, tmp_path / "run", "--epochs", "1", "--plan", str(plan), config=DCN, check=False))
    assert line.startswith(f"mdaf-rec: error: {plan}: {message}"), line


def _trained_module(run: Path) -> torch.nn.Module:
    """The train module of ``run`` (its config and vocabulary sizes) with its tables on ``meta``: what
    ``train --plan`` checks a plan against."""
    cfg = load_config(run / "config.yaml")
    sizes = Vocabularies.load(run / "vocab").sizes
    return build_train_module(cfg, sizes, table_device="meta", dense_device="cpu", compute_device="cpu",
                              with_sparse_optimizer=False).module


@pytest.mark.parametrize("edit,message", PLAN_EDITS)
def test_check_plan_names_what_does_not_fit(trained: Path, tmp_path: Path, edit, message: str) -> None:
    plan = _edit_plan(trained / "plan.json", tmp_path / "plan.json", edit)
    with pytest.raises(PlanFileError) as e:
        check_plan(load_plan(plan, 1), _trained_module(trained), 1, "cpu", str(plan))
    assert str(e.value).startswith(f"{plan}: {message}"), str(e.value)


def test_a_plan_made_for_other_vocabulary_sizes_is_refused(trained: Path, tmp_path: Path) -> None:
    """``mdaf-rec plan`` sizes the tables by planning.vocab_sizes, not by this data's vocabularies."""
    plan = tmp_path / "plan.json"
    sets = [item for s in TINY for item in ("--set", s)]
    assert cli.main(["plan", "--config", DCN, *sets, "--world-size", "1", "--device", "cpu", "--json", str(plan)]) == 0
    with pytest.raises(PlanFileError) as e:
        check_plan(load_plan(plan, 1), _trained_module(trained), 1, "cpu", str(plan))
    assert str(e.value).startswith(f"{plan}: table 'static_") and "made for other vocabulary sizes" in str(e.value)


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(dataset: Path, trained: Path, tmp_path: Path) -> None:
    """What a crash while appending epoch 2's line leaves: the run resumes and rewrites it."""
    run = _copy(trained, tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "step": 36, "train_lo')
    proc = train(dataset, run, "--epochs", "2", config=DCN)
    assert f"{run / 'metrics.jsonl'}: dropping its torn last line 2 " in proc.stderr, proc.stderr[-2000:]
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_sigint_prints_one_line_with_the_resume_hint_and_exits_130(dataset: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal: SIGINT to the whole process group (DataLoader workers included)."""
    run = tmp_path / "run"
    sets = [item for s in TINY for item in ("--set", s)]
    cmd = [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", DCN, "--data", str(dataset), "--out", str(run),
           "--epochs", "50", *sets, "--set", "train.patience=50", "--set", "data.num_workers=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "index.json").exists():
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, [l for l in err.splitlines() if "step/s" not in l][-60:]
    lines = [line for line in err.splitlines() if line.startswith("mdaf-rec: ")]
    assert lines == [f"mdaf-rec: interrupted: re-run the same command to continue: it resumes {run} from its last "
                     "checkpoint (or starts afresh if it has none yet)"], err[-3000:]


@pytest.mark.parametrize("damage,message", [
    (lambda text: text[: len(text) // 2], "not valid JSON ("),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "static_dim"}), "missing key 'static_dim'"),
    (lambda text: json.dumps({**json.loads(text), "timezone": "Mars/Olympus"}),
     "key 'timezone': unknown IANA time zone 'Mars/Olympus'"),
    (lambda text: json.dumps({**json.loads(text), "timezone": 123}), "key 'timezone': unknown IANA time zone 123"),
])
def test_a_bad_feature_spec_is_one_line(dataset: Path, exported: Path, tmp_path: Path, capsys, damage,
                                        message: str) -> None:
    """A feature_spec.json edited by hand and its manifest entry rehashed (a bad zone used to fail per batch).
    In this process: the error comes before any program is loaded."""
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    spec = model / "feature_spec.json"
    content = damage(spec.read_text()).encode()
    spec.write_bytes(content)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"]["feature_spec.json"] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (model / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(model), "--data", str(dataset / "test.parquet"),
                     "--out", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"mdaf-rec predict: error: {spec}: {message}"), err


@pytest.mark.parametrize("command", ["train", "export", "predict"])
def test_an_out_under_a_file_is_one_line(dataset: Path, trained: Path, exported: Path, tmp_path: Path,
                                         command: str) -> None:
    """An --out that cannot be created (as root, permissions do not stop a write; a file in its path does)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    out = blocker / "out"
    if command == "train":
        proc = train(dataset, out, "--epochs", "1", config=DCN, check=False)
    elif command == "export":
        proc = mdaf("export", "--run", str(trained), "--out", str(out), "--no-compile", check=False)
    else:
        proc = mdaf("predict", "--model", str(exported), "--data", str(dataset / "test.parquet"), "--out", str(out),
                    check=False)
    line = _one_line_error(proc)
    assert re.match(rf"mdaf-rec( {command})?: error: {out}: cannot write ", line), line
    assert "a file stands where a folder is needed" in line and blocker.read_text() == "mine", line
