"""End-to-end training under DMP: a full short run, exact resume, multi-rank evaluation, bad input.

Every run is a process of its own (``mdaf-rec`` forked from a preloaded server, see ``cli_runner``, or ``torchrun``);
a refused config is checked in-process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from cli_runner import run_cli
from mdaf_rec import cli
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



def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def mdaf(*args: str, nproc: int = 1, check: bool = True, fresh: bool = False) -> subprocess.CompletedProcess:
    """``mdaf-rec ARGS`` in a new process: forked from the preloaded server (:mod:`cli_runner`), or, with
    ``fresh``, a new interpreter (``python -m mdaf_rec.cli``: what its imports print too), or torchrun with
    ``nproc`` processes."""
    if fresh:
        cmd: List[str] = [sys.executable, "-m", "mdaf_rec.cli", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    elif nproc == 1:
        cmd = ["mdaf-rec", *args]
        proc = run_cli(args, _env(), REPO, timeout=600)
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", "-m", "mdaf_rec.cli", *args,
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train(data: Path, out: Path, *extra: str, config: str = "configs/mdaf_mamba.yaml", nproc: int = 1, check: bool = True,
          fresh: bool = False):
    sets = [item for s in TINY for item in ("--set", s)]
    return mdaf("train", "--config", config, "--data", str(data), "--out", str(out), *sets, *extra, nproc=nproc,
                check=check, fresh=fresh)


def tensorboard_scalars(folder: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Tag -> ``[(step, value)]`` of every scalar in the TensorBoard event files of ``folder`` (TFRecord framing:
    length, its CRC, the ``Event`` protobuf, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: Dict[str, List[Tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory) -> Path:
    """A finished 1-epoch MDAF-Mamba run (TINY); tests that change it work on a copy."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(dataset, run, "--epochs", "1")
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_full_short_training_run(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Three full epochs (patience 3), with the research code's static fields: on these 2.2k training rows the
    # shipped pooled histories overfit at TINY's table learning rate (test NE 1.006, calibration 0.70 at the best
    # epoch); pooled histories are trained, checked and served in test_recipe.py and test_export.py.
    proc = train(dataset, run, "--epochs", "3", "--set", "train.patience=3", "--set", "features.pooled_history=false")
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("auc", "logloss", "gauc", "calibration"):
            assert key in metrics[split]
        assert 0.6 < metrics[split]["auc"] <= 1.0, metrics[split]  # learned something from 2.2k rows
        ctr = metrics[split]["ctr"]
        base = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))  # NE: log loss over the base rate's
        assert metrics[split]["ne"] == pytest.approx(metrics[split]["logloss"] / base, rel=1e-12)
        assert 0.5 < metrics[split]["ne"] < 1.0, metrics[split]
    assert metrics["best_epoch"] in (1, 2, 3) and metrics["params"]["tables"] > 0 and metrics["samples_per_sec"] > 0
    gate = metrics["gate"]
    assert 0.0 <= gate["mean"] <= 1.0 and sum(gate["histogram"]["counts"]) == metrics["test"]["count"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    epochs = [json.loads(line) for line in lines]
    # TensorBoard: the loss every log_every (5) steps and at each epoch's end, the epoch and validation metrics
    # at each epoch's last step, the test metrics at the end; the same numbers as metrics.jsonl / metrics.json.
    board = tensorboard_scalars(run / "tensorboard")
    ends = [e["step"] for e in epochs]
    loss_steps = [step for step, _ in board["train/loss"]]
    assert loss_steps == sorted(set(loss_steps)) and set(ends) <= set(loss_steps) and loss_steps[:2] == [5, 10]
    for e, start in zip(epochs, [0] + ends):
        window = [(step, v) for step, v in board["train/loss"] if start < step <= e["step"]]
        steps = [step - prev for (step, _), prev in zip(window, [start] + [s for s, _ in window])]
        mean = sum(v * n for (_, v), n in zip(window, steps)) / sum(steps)
        assert mean == pytest.approx(e["train_loss"], rel=1e-5)  # float32 event values
    for tag, key in (("val/auc", "auc"), ("val/logloss", "logloss"), ("val/ne", "ne"), ("val/gauc", "gauc")):
        assert board[tag] == [(e["step"], pytest.approx(e["val"][key], rel=1e-6)) for e in epochs], tag
    assert [s for s, _ in board["epoch/samples_per_sec"]] == ends and all(v > 0 for _, v in board["train/samples_per_sec"])
    assert [s for s, _ in board["val/gate_mean"]] == ends
    assert board["test/auc"] == [(ends[-1], pytest.approx(metrics["test"]["auc"], rel=1e-6))]
    assert board["test/ne"] == [(ends[-1], pytest.approx(metrics["test"]["ne"], rel=1e-6))]
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
    # The resumed run's TensorBoard curves continue the first attempt's: the same points as the straight run's.
    ta, tb = tensorboard_scalars(straight / "tensorboard"), tensorboard_scalars(split / "tensorboard")
    assert len(list((split / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for tag in ("train/loss", "val/auc"):
        assert [step for step, _ in tb[tag]] == [step for step, _ in ta[tag]], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in ta[tag]], abs=1e-5), tag
    assert tb["test/auc"][-1] == (ta["test/auc"][-1][0], pytest.approx(ta["test/auc"][-1][1], abs=1e-5))


def test_two_process_evaluation_equals_one_process(trained: Path) -> None:
    """A checkpoint written by 1 process loads under 2 (resharded) and scores the same within 1e-6."""
    run = trained
    one = json.loads(mdaf("eval", "--run", str(run), "--split", "val").stdout)
    two = mdaf("eval", "--run-dir", str(run), "--split", "val", nproc=2).stdout
    two = json.loads(two[two.index("{"):])
    for key in ("auc", "logloss", "gauc", "calibration", "count"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    # The reliability table and the gate profile are summed over the ranks: the same rows in each bin and group.
    for profile in (one, two):
        assert sum(r["rows"] for r in profile["reliability"]) == one["count"]
    assert [(r["bin"], r["rows"]) for r in two["reliability"]] == [(r["bin"], r["rows"]) for r in one["reliability"]]
    for axis in ("history_length", "user_activity"):
        pairs = zip(two["gate_profile"][axis], one["gate_profile"][axis], strict=True)
        for a, b in pairs:
            assert a["group"] == b["group"] and a["rows"] == b["rows"] and a["mean"] == pytest.approx(b["mean"], abs=1e-6)


def test_torchrun_two_processes_trains(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(dataset, run, "--epochs", "2", nproc=2)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["val"]["auc"] > 0.55, metrics["val"]
    # ...and the 2-rank checkpoint resumes with 1 process.
    train(dataset, run, "--epochs", "3", "--resume")
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3


def test_last_batch_smaller_than_the_world_trains_and_evaluates_every_row(dataset: Path, tmp_path: Path) -> None:
    """2 ranks, 2255 training rows in batches of 98 (23 full + 1 row) and 391 validation rows in batches of 130
    (3 full + 1 row): the 1-row batches join the batch before them, so no rank gets a 0-row batch (whose mean loss
    was NaN, stopping the run); every validation and test row is scored once."""
    run = tmp_path / "run"
    proc = train(dataset, run, "--epochs", "1", "--set", "train.batch_size=98", "--set", "train.eval_batch_size=130",
                 nproc=2)
    assert "Mamba blocks run the " in proc.stdout + proc.stderr  # the scan backend, named per run
    metrics = json.loads((run / "metrics.json").read_text())
    (epoch,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(epoch["train_loss"]) and epoch["step"] == metrics["steps"] == 23
    assert metrics["val"]["count"] == 391 and metrics["test"]["count"] == 354
    assert math.isfinite(metrics["val"]["logloss"]) and math.isfinite(metrics["test"]["logloss"])


def test_resume_with_other_vocabulary_is_refused(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    other = tmp_path / "other"
    generate(other, rows=2000, users=200, items=500, categories=20, max_history=10, seed=9)
    proc = train(other, run, "--epochs", "2", "--resume", check=False)
    assert proc.returncode != 0
    assert "other vocabularies than checkpoint" in proc.stderr


def test_config_error_names_the_key(dataset: Path, capsys) -> None:
    assert cli.main(["train", "--config", "configs/demo.yaml", "--data", str(dataset), "--set", "train.epoch=3"]) == 2
    assert "train.epoch" in capsys.readouterr().err


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(trained: Path, dataset: Path,
                                                                                tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    index_before = (run / "checkpoints" / "index.json").read_text()
    # An absurd learning rate blows the weights up during the resumed epoch 2.
    proc = train(dataset, run, "--epochs", "2", "--resume", "--set", "optimizer.lr=1.0e+30", check=False)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "epoch 2, batch" in proc.stderr
    assert (run / "checkpoints" / "index.json").read_text() == index_before
    assert (run / "checkpoints" / "epoch_1" / "state.json").exists()
