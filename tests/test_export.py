"""Export and predict: score parity with the DMP evaluation, import-free loading, bad input.

Tiny MDAF-Mamba and MDAF-BST runs (5 steps, trained by ``mdaf-rec train`` subprocesses) are exported
fp32 and int8 and scored with ``mdaf-rec predict`` (both entry points called in-process to keep the
suite fast); the reference is ``evaluate(session, "test", collect_scores=True)`` under DMP in a
subprocess, joined by ``row_index``. ``features.max_history=8`` is below the data's 10, so truncation
is exercised.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mdaf_rec.data.synth import generate
from mdaf_rec.metrics import auc_score
from mdaf_rec.export import main as export_main
from mdaf_rec.predict import ExportedModel
from mdaf_rec.predict import main as predict_main
from mdaf_rec.serving import INPUT_NAMES
from test_train import REPO, _env, mdaf

TINY = [
    "features.sequence_dim=16",
    "features.static_dim=4",
    "features.max_history=8",
    "model.head_hidden=[16, 8]",
    "model.bst.num_heads=2",
    "train.batch_size=128",
    "train.eval_batch_size=1024",
    "train.max_steps_per_epoch=5",
    "train.threads=1",
]
MODELS = {"mdaf_mamba": "configs/mdaf_mamba.yaml", "mdaf_bst": "configs/mdaf_bst.yaml"}

# Scores of the test split with each run's best checkpoint under DMP (1 process, gloo): RUN OUT [RUN OUT ...].
REFERENCE = """
import sys, torch
from pathlib import Path
from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import load_config
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.distributed import init_distributed
from mdaf_rec.train import evaluate, open_session
env = init_distributed()
for run, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run = Path(run)
    session = open_session(load_config(run / "config.yaml"), run, env, vocabs=Vocabularies.load(run / "vocab"))
    state = {"model": session.model.state_dict()}
    ckpt.load_checkpoint(ckpt.checkpoint_path(run, "best"), state)
    session.model.load_state_dict(state["model"])
    result = evaluate(session, "test", collect_scores=True)
    torch.save({"row_index": result["row_index"], "scores": result["scores"]}, out)
"""

# Loads MODEL_DIR with torch alone: mdaf_rec (and torchrec) cannot be imported.
IMPORT_FREE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mdaf_rec", "torchrec"):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
import torch
model = torch.export.load(sys.argv[1] + "/model.pt2").module()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    probability, gate = model(*inputs)
torch.save({"probability": probability, "gate": gate}, sys.argv[3])
assert not any(m.split(".")[0] in ("mdaf_rec", "torchrec") for m in sys.modules)
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth")
    generate(path, rows=3000, users=300, items=800, categories=30, max_history=10, seed=3)
    return path


@pytest.fixture(scope="module")
def runs(dataset: Path, tmp_path_factory) -> Dict[str, Path]:
    """One trained run per model."""
    root = tmp_path_factory.mktemp("runs")
    sets = [item for s in TINY for item in ("--set", s)]
    for name, config in MODELS.items():
        mdaf("train", "--config", config, "--data", str(dataset), "--out", str(root / name), "--epochs", "1", *sets)
    return {name: root / name for name in MODELS}


@pytest.fixture(scope="module")
def references(runs: Dict[str, Path], tmp_path_factory) -> Dict[str, np.ndarray]:
    """Model -> DMP test-split scores ``[N]`` in row order."""
    root = tmp_path_factory.mktemp("reference")
    args = [a for name, run in runs.items() for a in (str(run), str(root / f"{name}.pt"))]
    subprocess.run([sys.executable, "-c", REFERENCE, *args], cwd=REPO, env=_env(), check=True, capture_output=True,
                   timeout=300)
    out = {}
    for name in runs:
        ref = torch.load(root / f"{name}.pt")
        out[name] = ref["scores"].numpy()[np.argsort(ref["row_index"].numpy())]
    return out


@pytest.fixture(scope="module")
def exports(runs: Dict[str, Path], tmp_path_factory) -> Dict[str, Path]:
    """``{model}_{none|int8}`` -> MODEL_DIR."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, run in runs.items():
        for quantize in ("none", "int8"):
            out[f"{name}_{quantize}"] = root / f"{name}_{quantize}"
            args = ["--run", str(run), "--out", str(out[f"{name}_{quantize}"]), "--quantize", quantize]
            assert export_main(args) == 0
    return out


def _predict(model_dir: Path, data: Path, out: Path, *extra: str) -> pa.Table:
    assert predict_main(["--model", str(model_dir), "--data", str(data), "--out", str(out), *extra]) == 0
    return pq.read_table(out)


def _predict_error(model_dir: Path, data: Path, tmp_path: Path, capsys) -> str:
    """stderr of a ``mdaf-rec predict`` that must fail with exit status 2."""
    capsys.readouterr()
    assert predict_main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o.parquet")]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name", list(MODELS))
def test_export_scores_match_dmp_evaluation(name: str, dataset: Path, references, exports, tmp_path: Path) -> None:
    reference = references[name]
    test = dataset / "test.parquet"
    labels = pq.read_table(test).column("label").to_numpy()
    assert len(reference) == len(labels)

    fp32 = _predict(exports[f"{name}_none"], test, tmp_path / "fp32.parquet", "--with-gate", "--key", "user_id")
    assert fp32.column_names == ["row_index", "user_id", "probability", "gate"]
    assert fp32.column("row_index").to_pylist() == list(range(len(labels)))
    assert fp32.column("user_id").equals(pq.read_table(test).column("user_id"))
    gate = fp32.column("gate").to_numpy()
    assert ((gate >= 0) & (gate <= 1)).all()
    fp32_diff = np.abs(fp32.column("probability").to_numpy() - reference).max()
    assert fp32_diff <= 1e-5, fp32_diff

    int8 = _predict(exports[f"{name}_int8"], test, tmp_path / "int8.parquet", "--batch-size", "100")
    scores = int8.column("probability").to_numpy()
    assert np.abs(scores - reference).max() <= 1e-2
    assert abs(auc_score(scores, labels) - auc_score(reference, labels)) <= 0.002
    spec = json.loads((exports[f"{name}_int8"] / "feature_spec.json").read_text())
    assert spec["quantization"] == "int8_rowwise" and spec["model"] == name and spec["max_history"] == 8


def test_loads_without_mdaf_rec(dataset: Path, exports, tmp_path: Path) -> None:
    model_dir = exports["mdaf_mamba_none"]
    model = ExportedModel(model_dir)
    table = pq.read_table(dataset / "test.parquet").slice(0, 37)
    probability, gate = model.score(table, "test.parquet", 0)
    inputs = model.inputs(table, "test.parquet", 0)  # the same rows as plain index tensors
    torch.save(tuple(inputs[n] for n in INPUT_NAMES), tmp_path / "inputs.pt")
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", IMPORT_FREE, str(model_dir), str(tmp_path / "inputs.pt"), str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(out)
    assert np.abs(loaded["probability"].numpy() - probability).max() <= 1e-6
    assert np.abs(loaded["gate"].numpy() - gate).max() <= 1e-6


def test_bad_input_names_the_column(dataset: Path, exports, tmp_path: Path, capsys) -> None:
    table = pq.read_table(dataset / "test.parquet")
    model_dir = exports["mdaf_bst_none"]
    missing = tmp_path / "missing.parquet"
    pq.write_table(table.drop_columns(["item_history"]), missing)
    assert "item_history" in _predict_error(model_dir, missing, tmp_path, capsys)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(table.set_column(0, "user_id", pa.array([str(x) for x in table.column("user_id").to_pylist()])), wrong)
    assert "'user_id'" in _predict_error(model_dir, wrong, tmp_path, capsys)


def test_tampered_model_dir_names_the_file(dataset: Path, exports, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(exports["mdaf_bst_none"], model_dir)
    with open(model_dir / "vocab" / "item.npy", "ab") as fh:
        fh.write(b"\0")
    err = _predict_error(model_dir, dataset / "test.parquet", tmp_path, capsys)
    assert "item.npy" in err and "sha256" in err, err
    (model_dir / "model.pt2").unlink()
    err = _predict_error(model_dir, dataset / "test.parquet", tmp_path, capsys)
    assert "model.pt2" in err and "missing" in err, err
