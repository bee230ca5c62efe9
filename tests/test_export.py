"""Export and predict: score parity with the DMP evaluation, import-free loading, bad input.

Tiny MDAF-Mamba and MDAF-BST runs (5 steps, trained by ``mdaf-rec train`` subprocesses) are exported
fp32 and int8 and scored with ``mdaf-rec predict`` (both entry points called in-process to keep the
suite fast); the reference is the test split's scores from ``mdaf_rec.train.predictions`` (what
``evaluate`` scores) under DMP in a subprocess, joined by ``row_index``. ``features.max_history=8`` is below the data's 10, so truncation
is exercised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mdaf_rec.artifact import write_manifest
from mdaf_rec.cli.export import main as export_main
from mdaf_rec.ops import scan_cpu
from mdaf_rec.cli.predict import main as predict_main
from mdaf_rec.metrics import auc_score
from mdaf_rec.predict import ExportedModel
from mdaf_rec.run_dir import MARKER_FILE
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
# dnn: the static branch with pooled histories (configs/dnn.yaml), served by StaticLookup's padded mean
MODELS = {"mdaf_mamba": "configs/mdaf_mamba.yaml", "mdaf_bst": "configs/mdaf_bst.yaml", "dnn": "configs/dnn.yaml"}

# Scores of the test split with each run's best checkpoint under DMP (1 process, gloo; no vocabularies under
# features.id_mapping: managed): RUN OUT [RUN OUT ...].
REFERENCE = """
import sys, torch
from pathlib import Path
from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import load_config
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.distributed import init_distributed
from mdaf_rec.run_dir import RunDir
from mdaf_rec.train import open_session, predictions
env = init_distributed()
for run, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run = RunDir(Path(run))
    cfg = load_config(run.config)
    vocabs = Vocabularies.load(run.vocab) if cfg.features.id_mapping == "vocab" else None
    session = open_session(cfg, run.path, env, vocabs=vocabs, training=False)
    ckpt.load_model_weights(ckpt.checkpoint_path(run.path, "best"), session.model)
    rows, scores = zip(*((batch.row_index, torch.sigmoid(out.logit)) for batch, out in predictions(session, "test")))
    torch.save({"row_index": torch.cat(rows), "scores": torch.cat(scores)}, out)
"""

# Loads MODEL_DIR with torch alone, as docs/serving.md's server does (manifest hash, every file, then the
# portable program from the checked bytes, and the AOTInductor CPU program with its operators' library):
# mdaf_rec (and torchrec) cannot be imported. MODEL_DIR HASH INPUTS OUT.
IMPORT_FREE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mdaf_rec", "torchrec"):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
import hashlib, io, json
from pathlib import Path
import torch
d = Path(sys.argv[1])
manifest = (d / "manifest.json").read_bytes()
assert hashlib.sha256(manifest).hexdigest() == sys.argv[2]
files = {}
for name, entry in json.loads(manifest)["files"].items():
    files[name] = (d / name).read_bytes()
    assert hashlib.sha256(files[name]).hexdigest() == entry["sha256"], name
programs = {"portable": torch.export.load(io.BytesIO(files["model.pt2"])).module()}
cpu = json.loads(files["feature_spec.json"]).get("cpu_program")
if cpu is not None:
    if cpu["ops_library"] is not None:
        torch.ops.load_library(str(d / cpu["ops_library"]))
    programs["compiled"] = torch._inductor.aoti_load_package(str(d / cpu["file"]))
inputs = torch.load(sys.argv[3])
outputs = {}
with torch.no_grad():
    for name, program in programs.items():
        probability, gate = program(*inputs)
        outputs[name] = {"probability": probability, "gate": gate}
torch.save(outputs, sys.argv[4])
assert not any(m.split(".")[0] in ("mdaf_rec", "torchrec") for m in sys.modules)
"""



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
    """``{model}_{none|int8}`` -> MODEL_DIR. Only ``mdaf_mamba_none`` also compiles the AOTInductor program for
    this CPU (15-40 s a model): the compile lowers whatever program the export holds, and MDAF-Mamba's is the one
    that also needs the scan operators' library; every other export is checked on its portable program."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, run in runs.items():
        for quantize in ("none", "int8"):
            out[f"{name}_{quantize}"] = root / f"{name}_{quantize}"
            args = ["--run", str(run), "--out", str(out[f"{name}_{quantize}"]), "--quantize", quantize]
            if (name, quantize) != ("mdaf_mamba", "none"):
                args.append("--no-compile")
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
    digest = hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()
    model = ExportedModel(model_dir, digest)
    table = pq.read_table(dataset / "test.parquet").slice(0, 37)
    probability, gate = model.score(table, "test.parquet", 0)
    inputs = model.inputs(table, "test.parquet", 0)  # the same rows as plain index tensors
    torch.save(tuple(inputs[n] for n in INPUT_NAMES), tmp_path / "inputs.pt")
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", IMPORT_FREE, str(model_dir), digest, str(tmp_path / "inputs.pt"), str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(out)
    expected = {"portable", "compiled"} if scan_cpu.available() else {"portable"}
    assert set(loaded) == expected
    for name, result in loaded.items():  # predict ran the compiled program: both forms agree with it
        assert np.abs(result["probability"].numpy() - probability).max() <= 1e-6, name
        assert np.abs(result["gate"].numpy() - gate).max() <= 1e-6, name


def test_bad_input_names_the_column(dataset: Path, exports, tmp_path: Path, capsys) -> None:
    table = pq.read_table(dataset / "test.parquet")
    model_dir = exports["mdaf_bst_none"]
    missing = tmp_path / "missing.parquet"
    pq.write_table(table.drop_columns(["item_history"]), missing)
    assert "item_history" in _predict_error(model_dir, missing, tmp_path, capsys)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(table.set_column(0, "user_id", pa.array([str(x) for x in table.column("user_id").to_pylist()])), wrong)
    assert "'user_id'" in _predict_error(model_dir, wrong, tmp_path, capsys)


def _one_line_error(main, args, capsys) -> str:
    """stderr of ``main(args)`` (``export_main`` / ``predict_main``), which must fail with status 2 and one line."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _tamper_timezone(path: Path) -> None:
    spec = json.loads(path.read_text())
    spec["timezone"] = "Asia/Tokyo" if spec["timezone"] != "Asia/Tokyo" else "UTC"
    path.write_text(json.dumps(spec, indent=2))


def _append_byte(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0")


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, tamper", [
    ("feature_spec.json", _tamper_timezone),
    ("vocab/item.npy", _append_byte),
    ("model.pt2", _flip_middle_byte),
])
def test_tampered_model_dir_names_the_file(name: str, tamper, dataset: Path, exports, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(exports["mdaf_bst_none"], model_dir)
    tamper(model_dir / name)
    out = tmp_path / "o.parquet"
    argv = ["--model", str(model_dir), "--data", str(dataset / "test.parquet"), "--out", str(out)]
    err = _one_line_error(predict_main, argv, capsys)
    assert f"{model_dir / name}: sha256 differs from manifest.json" in err, err
    assert not out.exists()


def test_missing_program_names_the_file(dataset: Path, exports, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(exports["mdaf_bst_none"], model_dir)
    (model_dir / "model.pt2").unlink()
    err = _predict_error(model_dir, dataset / "test.parquet", tmp_path, capsys)
    assert "model.pt2" in err and "missing" in err, err


def test_manifest_sha256_is_checked_first(dataset: Path, exports, tmp_path: Path, capsys) -> None:
    model_dir = exports["mdaf_mamba_none"]
    digest = hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()
    rows = tmp_path / "rows.parquet"
    pq.write_table(pq.read_table(dataset / "test.parquet").slice(0, 50), rows)
    base = ["--model", str(model_dir), "--data", str(rows), "--out", str(tmp_path / "o.parquet")]
    assert predict_main([*base, "--manifest-sha256", digest.upper()]) == 0
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 50
    other = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    err = _one_line_error(predict_main, [*base, "--manifest-sha256", other], capsys)
    assert f"{model_dir / 'manifest.json'}: sha256 {digest} is not the expected {other}" in err, err
    assert "64 hex digits" in _one_line_error(predict_main, [*base, "--manifest-sha256", "abc"], capsys)
    # an edited manifest (hashes rewritten to match a tampered file) passes only without the flag
    forged = tmp_path / "forged"
    shutil.copytree(model_dir, forged)
    _tamper_timezone(forged / "feature_spec.json")
    write_manifest(forged)
    assert predict_main([*base[:1], str(forged), *base[2:]]) == 0
    err = _one_line_error(predict_main, [*base[:1], str(forged), *base[2:], "--manifest-sha256", digest], capsys)
    assert "manifest.json: sha256" in err, err


def test_export_replaces_only_its_own_files(runs, exports, tmp_path: Path, capsys) -> None:
    """Onto an earlier export (of the other model) plus a user's notes.txt: the old artifact's files are
    replaced or deleted, notes.txt is kept; the printed hash is the new manifest's sha256. (The portable program
    only: the AOTInductor compile is exercised by the ``exports`` fixture.)"""
    model_dir = tmp_path / "model"
    shutil.copytree(exports["mdaf_bst_none"], model_dir)
    np.save(model_dir / "vocab" / "retired.npy", np.arange(3))  # a file only the old export had
    write_manifest(model_dir)
    (model_dir / "notes.txt").write_text("my notes\n")

    capsys.readouterr()
    assert export_main(["--run", str(runs["mdaf_mamba"]), "--out", str(model_dir), "--no-compile"]) == 0
    printed = capsys.readouterr().out
    digest = hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()
    assert f"manifest.json sha256: {digest}" in printed, printed
    assert (model_dir / "notes.txt").read_text() == "my notes\n"
    assert not (model_dir / "vocab" / "retired.npy").exists()
    assert json.loads((model_dir / "feature_spec.json").read_text())["model"] == "mdaf_mamba"
    manifest = json.loads((model_dir / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert on_disk == set(manifest) | {"manifest.json", "notes.txt"}
    assert {"feature_spec.json", "model.pt2", "config.yaml", "vocab/vocab.json", "vocab/item.npy"} <= set(manifest)
    for name, entry in manifest.items():
        data = (model_dir / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]  # no staging folder left


def test_export_refuses_a_folder_that_is_not_an_export(runs, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "feature_spec.json").write_text("{}")  # looks like a model folder, but holds no manifest
    (folder / "notes.txt").write_text("my notes\n")
    err = _one_line_error(export_main, ["--run", str(runs["mdaf_mamba"]), "--out", str(folder)], capsys)
    assert f"--out {folder}: folder is not empty and holds no earlier export" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert sorted(p.name for p in folder.iterdir()) == ["feature_spec.json", "notes.txt"]


def _tree(folder: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_writes_into_a_run_or_a_dataset(runs, dataset: Path, tmp_path: Path, capsys) -> None:
    """Issue 20: a checkpoint folder's manifest made ``--out RUN/checkpoints/epoch_1`` look like an earlier export,
    so the run's only checkpoint was deleted; a run (marked or of an earlier version) or a dataset folder, and
    every folder inside one, is refused before anything is done."""
    run, legacy, data = tmp_path / "run", tmp_path / "legacy", tmp_path / "data"
    shutil.copytree(runs["dnn"], run)
    shutil.copytree(runs["dnn"], legacy)
    (legacy / MARKER_FILE).unlink(missing_ok=True)  # a run written before runs were marked
    shutil.copytree(dataset, data)
    before = {folder: _tree(folder) for folder in (run, legacy, data)}
    for out, where in [(run / "checkpoints" / "epoch_1", f"the --run directory {run}"),
                       (run, f"the --run directory {run}"),
                       (run / "model", f"the --run directory {run}"),
                       (legacy / "checkpoints" / "epoch_1", f"the run directory {legacy}"),
                       (legacy / "model", f"the run directory {legacy}"),
                       (data / "model", f"the dataset folder {data}")]:
        err = _one_line_error(export_main, ["--run", str(run), "--out", str(out), "--no-compile"], capsys)
        assert f"--out {out}: is or lies inside {where}; export the model elsewhere" in err, err
    assert {folder: _tree(folder) for folder in (run, legacy, data)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "legacy", "run"]


def test_predict_replaces_only_a_regular_file_and_never_follows_a_link(
    dataset: Path, exports, tmp_path: Path, capsys
) -> None:
    """Issue 20: ``--out`` a device or pipe was replaced by a regular file, and the temporary file had a fixed
    name (``.NAME.partial``) through which a planted link was followed, overwriting the link's target."""
    rows = tmp_path / "rows.parquet"
    pq.write_table(pq.read_table(dataset / "test.parquet").slice(0, 20), rows)
    model = str(exports["mdaf_mamba_none"])
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    err = _one_line_error(predict_main, ["--model", model, "--data", str(rows), "--out", str(pipe)], capsys)
    assert f"--out {pipe}: is not a regular file (a device, pipe or socket); refusing to replace it" in err, err
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "link.parquet"
    link.symlink_to(victim)
    err = _one_line_error(predict_main, ["--model", model, "--data", str(rows), "--out", str(link)], capsys)
    assert f"--out {link}: is a symbolic link" in err, err
    planted = tmp_path / ".scores.parquet.partial"  # the earlier version's temporary name
    planted.symlink_to(victim)
    out = tmp_path / "scores.parquet"
    assert _predict(Path(model), rows, out).num_rows == 20
    assert victim.read_text() == "precious" and link.is_symlink() and planted.is_symlink()
    assert stat.S_ISREG(os.lstat(out).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".scores.parquet.partial", "link.parquet", "pipe", "rows.parquet", "scores.parquet", "victim.txt"])


def test_predict_refuses_to_overwrite_its_input(dataset: Path, exports, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = data / "rows.parquet"
    pq.write_table(pq.read_table(dataset / "test.parquet").slice(0, 20), rows)
    before = rows.read_bytes()
    model = str(exports["mdaf_mamba_none"])
    err = _one_line_error(predict_main, ["--model", model, "--data", str(rows), "--out", str(rows)], capsys)
    assert f"--out {rows}: is the --data input itself" in err, err
    inside = ["--model", model, "--data", str(data), "--out", str(data / "s.parquet")]
    err = _one_line_error(predict_main, inside, capsys)
    assert "lies inside the --data folder" in err, err
    out = Path(model) / "manifest.json"
    err = _one_line_error(predict_main, ["--model", model, "--data", str(rows), "--out", str(out)], capsys)
    assert "lies inside the --model folder" in err, err
    assert rows.read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["rows.parquet"]


def test_predict_prints_no_warnings(dataset: Path, exports, tmp_path: Path) -> None:
    """A normal ``mdaf-rec predict`` in a fresh process: no warning of torch, TorchRec or FBGEMM on stderr."""
    out = tmp_path / "scores.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "mdaf_rec.cli", "predict", "--model", str(exports["mdaf_mamba_none"]),
         "--data", str(dataset / "test.parquet"), "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if not re.search(r" INFO mdaf_rec[.\w]*: ", line)]
    assert noise == [], proc.stderr[-3000:]
    assert pq.read_table(out).num_rows == pq.read_metadata(dataset / "test.parquet").num_rows


# A server without mdaf_rec (docs/serving.md, "How a server maps the tables"): the table files memory-mapped with
# numpy as feature_spec.json describes them (fp32, fp16 or FBGEMM's fused int8 rows, dequantized by hand), the
# rows of the index inputs looked up by its "lookups", then the program. MODEL_DIR INPUTS OUT.
MAPPING_SERVER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mdaf_rec", "torchrec", "fbgemm_gpu"):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
import json
from pathlib import Path
import numpy as np, torch
d = Path(sys.argv[1])
spec = json.loads((d / "feature_spec.json").read_text())
def table(entry):
    raw = np.memmap(d / entry["file"], dtype=np.uint8, mode="r", shape=(entry["rows"], entry["row_bytes"]))
    dim = entry["dim"]
    def rows(index):
        r = np.asarray(raw[index.reshape(-1)])
        if entry["dtype"] == "int8":
            w = r[:, :dim].astype(np.float32) * r[:, dim:dim + 4].copy().view("<f4") + r[:, dim + 4:].copy().view("<f4")
        else:
            w = r.view("<f4" if entry["dtype"] == "fp32" else "<f2").astype(np.float32)
        return w.reshape(*index.shape, dim)
    return rows
tables = {name: table(entry) for name, entry in spec["tables"].items()}
maps = {t: (np.fromfile(d / m["ids"], dtype="<i8"), np.fromfile(d / m["rows"], dtype="<i8"), m)
        for t, m in spec.get("id_maps", {}).items()}  # managed ids: raw id -> row (docs/serving.md, "Managed ids")
def managed_rows(table, raw):
    ids, rows, m = maps[table]
    x = raw.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = (((x ^ (x >> np.uint64(31))) & np.uint64(2**63 - 1)) % np.uint64(2**63 - 1)).astype(np.int64)
    pos = np.minimum(np.searchsorted(ids, h), len(ids) - 1)
    miss = np.asarray(m["miss_rows"])[(h // m["bucket_size"]) // m["buckets_per_shard"]]
    return np.where(ids[pos] == h, rows[pos], miss)
def lookup_rows(t, index, column, dim):
    return tables[t](managed_rows(t, index) if t in maps else index)[..., column:column + dim]
ids = dict(zip(["static_ids", "dense", "target_ids", "history_ids", "list_ids"], torch.load(sys.argv[2])))
inputs = dict(ids)
for name, lookup in spec["lookups"].items():
    index = ids[lookup["index"]].numpy()
    columns = lookup.get("columns") or [0] * len(lookup["tables"])
    parts = [lookup_rows(t, index[:, j], columns[j], lookup["dim"]) for j, t in enumerate(lookup["tables"])]
    inputs[name] = torch.from_numpy(np.stack(parts, 1) if parts else
                                     np.zeros((index.shape[0], 0, *index.shape[2:], lookup["dim"]), np.float32))
program = torch.export.load(str(d / spec["program"])).module()
with torch.no_grad():
    probability, gate = program(*(inputs[i["name"]] for i in spec["inputs"]))
torch.save(probability, sys.argv[3])
"""


@pytest.mark.parametrize("name", ["mdaf_bst_none", "dnn_int8"])
def test_a_server_maps_the_tables_without_mdaf_rec(name: str, dataset: Path, exports, tmp_path: Path) -> None:
    """The documented table layout is enough to serve: a numpy memmap server's scores are predict's."""
    assert_numpy_server_scores_as_predict(exports[name], pq.read_table(dataset / "test.parquet").slice(0, 41), tmp_path)


def assert_numpy_server_scores_as_predict(model_dir: Path, table: pa.Table, tmp_path: Path) -> None:
    """:data:`MAPPING_SERVER` (numpy only: mdaf_rec, torchrec and fbgemm_gpu blocked) scores ``table``'s rows with
    the artifact in ``model_dir`` as :class:`ExportedModel` does, to 1e-6."""
    model = ExportedModel(model_dir)
    probability, _ = model.score(table, "test.parquet", 0)
    inputs = model.inputs(table, "test.parquet", 0)
    ids = ("static_ids", "dense", "target_ids", "history_ids", "list_ids")
    torch.save(tuple(inputs[n] for n in ids), tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-I", "-c", MAPPING_SERVER, str(model_dir), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.abs(torch.load(tmp_path / "out.pt").numpy() - probability).max() <= 1e-6


def test_table_files_hold_the_checkpoint_rows(runs, tmp_path: Path, monkeypatch) -> None:
    """Each table file, read a few rows at a time (blocks far smaller than a table), holds exactly the trained
    table in fp32, its float16 rounding in fp16, and FBGEMM's fused 8-bit rows in int8."""
    from mdaf_rec import checkpoint as ckpt
    from mdaf_rec import tables as tables_module
    from mdaf_rec.config import load_config
    from mdaf_rec.data.vocab import Vocabularies
    from mdaf_rec.export import load_serving_module, table_keys
    from mdaf_rec.trainable import build_train_module

    run = runs["mdaf_mamba"]
    cfg = load_config(run / "config.yaml")
    _, wrapper = build_train_module(cfg, Vocabularies.load(run / "vocab").sizes, table_device="cpu",
                                    dense_device="cpu", compute_device="cpu", with_sparse_optimizer=False)
    path = ckpt.checkpoint_path(run, "best")
    ckpt.load_model_weights(path, wrapper)
    state = wrapper.state_dict()
    module, keys, *_ = load_serving_module(run)
    assert keys == {name: f"model.{key}" for name, key in table_keys(wrapper).items()} and len(keys) == 7
    assert not any(p.is_meta for p in module.parameters())  # the tables are not in the serving module
    monkeypatch.setattr(tables_module, "BLOCK_BYTES", 200)
    source = tables_module.CheckpointTables(path)
    for name, key in keys.items():
        weight = state[key[len("model."):]]
        for dtype in ("fp32", "fp16", "int8"):
            entry = tables_module.write_table(source, key, tmp_path, name, dtype)
            raw = np.fromfile(tmp_path / entry.file, dtype=np.uint8).reshape(entry.rows, entry.row_bytes)
            expected = tables_module.quantize_rows(weight, dtype)
            assert (entry.rows, entry.dim) == tuple(weight.shape) and np.array_equal(raw, expected), (name, dtype)
        served = tables_module.ServingTables(tmp_path, {name: entry.doc()}, [entry.file])
        index = torch.tensor([[0, 3], [weight.shape[0] - 1, 2]])
        rows = served.lookup(name, index)
        assert rows.shape == (2, 2, weight.shape[1])
        assert torch.allclose(rows, weight[index], atol=float(weight.abs().max()) / 100)  # int8: within a step


def test_column_ranges_are_written_into_their_rows(tmp_path: Path) -> None:
    """Column-wise shards: each block lands in its columns of its rows."""
    from mdaf_rec.tables import _fill

    table = torch.arange(24, dtype=torch.float32).view(4, 6)
    blocks = [(0, 0, table[:3, :4]), (3, 0, table[3:, :4]), (0, 4, table[:, 4:])]
    _fill(tmp_path / "t.bin", 4, 24, iter(blocks), "fp32")
    assert np.array_equal(np.fromfile(tmp_path / "t.bin", dtype="<f4").reshape(4, 6), table.numpy())


def test_table_dtype_and_quantize_must_agree(runs, tmp_path: Path, capsys) -> None:
    args = ["--run", str(runs["dnn"]), "--out", str(tmp_path / "m"), "--quantize", "int8", "--table-dtype", "fp16"]
    err = _one_line_error(export_main, args, capsys)
    assert "--quantize int8 contradicts --table-dtype fp16" in err, err
    assert not (tmp_path / "m").exists()


def test_a_table_outside_the_manifest_is_never_mapped(dataset: Path, exports, tmp_path: Path, capsys) -> None:
    """A feature_spec.json edited to map an unlisted file (its manifest entry rehashed) is one line, exit 2."""
    model_dir = tmp_path / "model"
    shutil.copytree(exports["dnn_none"], model_dir)
    (model_dir / "notes.txt").write_bytes(bytes(64 * 1024))
    spec_path = model_dir / "feature_spec.json"
    spec = json.loads(spec_path.read_text())
    name = next(iter(spec["tables"]))
    spec["tables"][name]["file"] = "notes.txt"
    content = json.dumps(spec).encode()
    spec_path.write_bytes(content)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["files"]["feature_spec.json"] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--model", str(model_dir), "--data", str(dataset / "test.parquet"), "--out", str(tmp_path / "o.parquet")]
    err = _one_line_error(predict_main, argv, capsys)
    assert f"{spec_path}: malformed (ValueError: table {name!r}: notes.txt is not a file of the manifest)" in err, err
