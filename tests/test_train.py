"""End-to-end training under DMP: a full short run, exact resume, multi-rank evaluation, bad input.

Every run is a subprocess (``mdaf-rec`` or ``torchrun``), as a user would launch it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from mdaf_rec.data.synth import generate

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "features.sequence_dim=16",
    "features.static_dim=4",
    "features.max_history=10",
    "model.head_hidden=[16, 8]",
    "model.bst.num_heads=2",
    "train.batch_size=128",
    "optimizer.lr=0.003",
    "optimizer.sparse_lr=0.1",
    "train.eval_batch_size=1024",
    "train.threads=1",
    "train.log_every=5",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth")
    generate(path, rows=3000, users=300, items=800, categories=30, max_history=10, seed=3)
    return path


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def mdaf(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd: List[str] = [sys.executable, "-m", "mdaf_rec.cli", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", "-m", "mdaf_rec.cli", *args,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train(data: Path, out: Path, *extra: str, config: str = "configs/mdaf_mamba.yaml", nproc: int = 1, check: bool = True):
    sets = [item for s in TINY for item in ("--set", s)]
    return mdaf("train", "--config", config, "--data", str(data), "--out", str(out), *sets, *extra, nproc=nproc,
                check=check)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_full_short_training_run(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = train(dataset, run, "--epochs", "3")
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("auc", "logloss", "gauc", "calibration"):
            assert key in metrics[split]
        assert 0.6 < metrics[split]["auc"] <= 1.0, metrics[split]  # learned something from 2.2k rows
    assert metrics["best_epoch"] in (1, 2, 3) and metrics["params"]["tables"] > 0 and metrics["samples_per_sec"] > 0
    gate = metrics["gate"]
    assert 0.0 <= gate["mean"] <= 1.0 and sum(gate["histogram"]["counts"]) == metrics["test"]["count"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    for name in ("config.yaml", "training_curves.png", "gate_histogram.png", "train.log"):
        assert (run / name).stat().st_size > 0, name
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    assert set(index) == {"best", "last", "steps"} and index["last"] == "epoch_3" and index["steps"] == []
    assert "val: auc" in proc.stdout
    # eval re-scores the best checkpoint to the same numbers.
    rescored = json.loads(mdaf("eval", "--run", str(run), "--split", "test").stdout)
    assert rescored["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-9)
    assert rescored["logloss"] == pytest.approx(metrics["test"]["logloss"], abs=1e-9)


def test_resume_continues_exactly(dataset: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(dataset, straight, "--epochs", "2", config="configs/mdaf_bst.yaml")
    train(dataset, split, "--epochs", "1", config="configs/mdaf_bst.yaml")
    train(dataset, split, "--epochs", "2", "--resume", config="configs/mdaf_bst.yaml")
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((split / "metrics.json").read_text())
    for s in ("val", "test"):
        for key in ("auc", "logloss", "gauc", "calibration"):
            assert b[s][key] == pytest.approx(a[s][key], abs=1e-5), (s, key)
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert la[1]["train_loss"] == pytest.approx(lb[1]["train_loss"], abs=1e-5)


def test_two_process_evaluation_equals_one_process(dataset: Path, tmp_path: Path) -> None:
    """A checkpoint written by 1 process loads under 2 (resharded) and scores the same within 1e-6."""
    run = tmp_path / "run"
    train(dataset, run, "--epochs", "1")
    one = json.loads(mdaf("eval", "--run", str(run), "--split", "val").stdout)
    two = mdaf("eval", "--run-dir", str(run), "--split", "val", nproc=2).stdout
    two = json.loads(two[two.index("{"):])
    for key in ("auc", "logloss", "gauc", "calibration", "count"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_torchrun_two_processes_trains(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(dataset, run, "--epochs", "2", nproc=2)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["val"]["auc"] > 0.55, metrics["val"]
    # ...and the 2-rank checkpoint resumes with 1 process.
    train(dataset, run, "--epochs", "3", "--resume")
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3


def test_resume_with_other_vocabulary_is_refused(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(dataset, run, "--epochs", "1", config="configs/dcnv3.yaml")
    other = tmp_path / "other"
    generate(other, rows=2000, users=200, items=500, categories=20, max_history=10, seed=9)
    sets = [item for s in TINY for item in ("--set", s)]
    proc = mdaf(
        "train", "--config", "configs/dcnv3.yaml", "--data", str(other), "--out", str(run), "--epochs", "2",
        "--resume", *sets, check=False,
    )
    assert proc.returncode != 0
    assert "other vocabularies than checkpoint" in proc.stderr


def test_config_error_names_the_key(dataset: Path, tmp_path: Path) -> None:
    proc = mdaf(
        "train", "--config", "configs/demo.yaml", "--data", str(dataset), "--set", "train.epoch=3", check=False
    )
    assert proc.returncode == 2 and "train.epoch" in proc.stderr


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(dataset, run, "--epochs", "1", config="configs/dcnv3.yaml")
    index_before = (run / "checkpoints" / "index.json").read_text()
    # An absurd learning rate blows the weights up during the resumed epoch 2.
    proc = mdaf(
        "train", "--config", "configs/dcnv3.yaml", "--data", str(dataset), "--out", str(run), "--epochs", "2",
        "--resume", *[item for s in TINY + ["optimizer.lr=1.0e+30"] for item in ("--set", s)], check=False,
    )
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "epoch 2, batch" in proc.stderr
    assert (run / "checkpoints" / "index.json").read_text() == index_before
    assert (run / "checkpoints" / "epoch_1" / "state.json").exists()
