"""Bad input ends as ONE line on stderr (``mdaf-rec: error: ...``) naming the file, key or row, exit status 2.

Each case fails before any model is built, so these run in-process through ``mdaf_rec.cli.main`` (no
training); one subprocess checks the train command end to end on a truncated Parquet split.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import List

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from mdaf_rec import cli
from mdaf_rec.config import FeaturesConfig, load_config
from mdaf_rec.data.dataset import Dataset, DatasetError
from mdaf_rec.data.loader import BatchLoader
from mdaf_rec.data.synth import generate
from mdaf_rec.data.validate import ColumnRules, DataError, check_timestamp_ranges, validate
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.errors import UserError
from mdaf_rec.features import FeatureSpec
from mdaf_rec.output import ArchiveFile, refused_write
from mdaf_rec.plan_io import PlanFileError, load_plan

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
BAD_PARQUET = ("truncated", "empty file", "corrupt page")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth")
    generate(path, rows=3000, users=100, items=300, categories=20, max_history=10, seed=1)
    return path


def error_line(capsys, argv: List[str]) -> str:
    """The one stderr line of ``mdaf-rec ARGV``, which must exit with status 2."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def spoil(path: Path, how: str) -> Path:
    """Makes ``path`` a truncated, 0-byte or page-corrupted Parquet file (its footer intact)."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty file":
        path.write_bytes(b"")
    else:  # the first page header of the user_id column chunk overwritten: the footer still opens
        chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        data[start : start + 32] = b"\xff" * 32
        path.write_bytes(data)
    return path


def copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


# -- Parquet ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", BAD_PARQUET)
def test_bad_train_parquet_names_the_file(dataset: Path, tmp_path: Path, how: str) -> None:
    bad = spoil(copy_dataset(dataset, tmp_path / "d") / "train.parquet", how)
    with pytest.raises(DatasetError, match=rf"^{bad}: not a readable Parquet file \(.+\)$"):
        Vocabularies.load_or_build(Dataset.open(bad.parent), FeaturesConfig())


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_page_in_val_names_the_file_when_loaded(dataset: Path, tmp_path: Path, num_workers: int) -> None:
    """Also from a DataLoader worker: one line, without the worker's traceback."""
    root = copy_dataset(dataset, tmp_path / "d")
    data = Dataset.open(root)
    vocabs = Vocabularies.load_or_build(data, FeaturesConfig())
    spec = FeatureSpec.build(FeaturesConfig(), vocabs.sizes)
    bad = spoil(root / "val.parquet", "corrupt page")
    with pytest.raises(DatasetError, match=rf"^{bad}: not a readable Parquet file \([^\n]+\)$"):
        list(BatchLoader(data, "val", spec, vocabs, 256, num_workers=num_workers))


def test_train_on_truncated_parquet_fails_before_building_a_model(dataset: Path, tmp_path: Path) -> None:
    bad = spoil(copy_dataset(dataset, tmp_path / "d") / "train.parquet", "truncated")
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mdaf_rec.cli", "train", "--config", DEMO, "--data", str(bad.parent), "--out", str(run)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"mdaf-rec: error: {bad}: not a readable Parquet file (")
    assert not (run / "checkpoints").exists() and not (run / "plan.json").exists()


def test_predict_threads_0_is_one_line(tmp_path: Path, capsys) -> None:
    line = error_line(capsys, ["predict", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "in.parquet"),
                               "--out", str(tmp_path / "scores.parquet"), "--threads", "0"])
    assert line == "mdaf-rec predict: error: --threads must be >= 1"


@pytest.mark.parametrize("how", BAD_PARQUET)
def test_predict_on_bad_parquet_names_the_file(dataset: Path, tmp_path: Path, capsys, monkeypatch, how: str) -> None:
    predict = importlib.import_module("mdaf_rec.predict")
    monkeypatch.setattr(predict, "ExportedModel", lambda *args, **kwargs: None)  # the data fails before scoring
    source = tmp_path / "in.parquet"
    source.write_bytes((dataset / "test.parquet").read_bytes())
    bad = spoil(source, how)
    line = error_line(capsys, ["predict", "--model", str(tmp_path / "model"), "--data", str(bad),
                               "--out", str(tmp_path / "scores.parquet")])
    assert f"error: {bad}: not a readable Parquet file (" in line
    assert not (tmp_path / "scores.parquet").exists()


def test_empty_train_split_is_named(dataset: Path, tmp_path: Path) -> None:
    root = copy_dataset(dataset, tmp_path / "d")
    table = pq.read_table(root / "train.parquet")
    pq.write_table(table.slice(0, 0), root / "train.parquet")
    expected = rf"^dataset {root}: the train split \({root / 'train.parquet'}\) has no rows$"
    with pytest.raises(DatasetError, match=expected):
        Vocabularies.load_or_build(Dataset.open(root), FeaturesConfig())


def test_configured_column_missing_from_the_data_is_named_before_the_model(dataset: Path) -> None:
    with pytest.raises(DatasetError, match=rf"^{dataset / 'train.parquet'}: missing column\(s\) \['price'\] \(has \["):
        Vocabularies.load_or_build(Dataset.open(dataset), FeaturesConfig(dense=["price"]))


def test_a_split_in_milliseconds_is_refused_before_training(dataset: Path, tmp_path: Path, capsys) -> None:
    """Issue 20: millisecond timestamps were read as seconds (other hours and days of week, exit 0)."""
    root = copy_dataset(dataset, tmp_path / "d")
    table = pq.read_table(root / "test.parquet")
    ms = pc.multiply(table.column("timestamp"), 1000)
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp", ms), root / "test.parquet")
    first = ms[0].as_py()
    when = datetime.fromtimestamp(first // 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    line = error_line(capsys, train_argv(root, tmp_path))
    assert line == (f"mdaf-rec: error: {root / 'test.parquet'}: column 'timestamp', row 0: {first} is not unix seconds "
                    f"of 1990..2099; it looks like milliseconds ({when}): divide the column by 1000"), line
    assert not (tmp_path / "run").exists()


def test_an_implausible_timestamp_is_named_by_row_without_footer_statistics(dataset: Path, tmp_path: Path) -> None:
    """A row group without statistics is read; the row is counted through the file (row groups of 1000 rows)."""
    root = copy_dataset(dataset, tmp_path / "d")
    table = pq.read_table(root / "train.parquet")
    stamps = table.column("timestamp").to_pylist()
    stamps[1500] = 86_400  # 1970-01-02: in no unit a date of 1990..2099
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(stamps, pa.int64()))
    pq.write_table(table, root / "train.parquet", row_group_size=1000, write_statistics=False)
    with pytest.raises(DataError, match=rf"^{root / 'train.parquet'}: column 'timestamp', row 1500: 86400 is not unix "
                                        r"seconds of 1990\.\.2099$"):
        check_timestamp_ranges(Dataset.open(root))
    check_timestamp_ranges(Dataset.open(dataset))  # the synthetic data is in range


@pytest.mark.parametrize("zone", [123, "Mars/Olympus"])
def test_a_bad_meta_json_time_zone_is_refused_when_the_dataset_is_opened(dataset: Path, tmp_path: Path, zone) -> None:
    root = copy_dataset(dataset, tmp_path / "d")
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "timezone": zone}))
    with pytest.raises(DatasetError, match=rf"^{root / 'meta.json'}: field 'timezone': {re.escape(repr(zone))} is not "
                                           r"an IANA time zone name \(e\.g\. 'Asia/Shanghai', 'UTC'\)$"):
        Dataset.open(root)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_timestamp_of_2_62_is_refused_before_training(dataset: Path, tmp_path: Path, split: str) -> None:
    """It overflowed the local-time arithmetic mid-epoch (an index error in a table lookup)."""
    root = copy_dataset(dataset, tmp_path / "d")
    path = root / f"{split}.parquet"
    table = pq.read_table(path)
    ts = table.column("timestamp").to_pylist()
    ts[157] = 2**62  # in the second row group: the row number counts across row groups
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(ts, pa.int64())),
                   path, row_group_size=100)
    with pytest.raises(DataError, match=rf"^{path}: column 'timestamp', row 157: {2**62} is not unix seconds of "
                                        r"1990\.\.2099$"):
        check_timestamp_ranges(Dataset.open(root))


def test_millisecond_timestamps_are_refused_naming_the_row() -> None:
    table = pa.table({"timestamp": pa.array([1511539200, 1511539200123], pa.int64())})
    with pytest.raises(DataError, match=r"^f\.parquet: column 'timestamp', row 41: 1511539200123 is not unix seconds"):
        validate(table, ColumnRules.build(), "f.parquet", row_offset=40, columns=["timestamp"])


# -- Configs ---------------------------------------------------------------------------------------


def train_argv(dataset: Path, tmp_path: Path, *extra: str, config: str = DEMO) -> List[str]:
    return ["train", "--config", config, "--data", str(dataset), "--out", str(tmp_path / "run"), *extra]


def test_malformed_yaml_names_file_line_and_column(dataset: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 1\n  batch_size: [64\n")
    line = error_line(capsys, train_argv(dataset, tmp_path, config=str(bad)))
    assert line.startswith(f"mdaf-rec: error: {bad}: not valid YAML (line 4, column 1: ")


def test_missing_yaml_names_the_file(dataset: Path, tmp_path: Path, capsys) -> None:
    line = error_line(capsys, train_argv(dataset, tmp_path, config=str(tmp_path / "nope.yaml")))
    assert line == f"mdaf-rec: error: {tmp_path / 'nope.yaml'}: cannot read the config file (No such file or directory)"


@pytest.mark.parametrize("override, message", [
    ("train.threads=0", "config key 'train.threads': must be >= 1"),
    ("features.timezone=Mars/Olympus", "config key 'features.timezone': unknown IANA time zone 'Mars/Olympus'"),
    ("model.bst.num_heads=0", "config key 'model.bst.num_heads': must be >= 1 and divide features.sequence_dim=64"),
    ("model.dcnv3.num_heads=3", "config key 'model.dcnv3.num_heads': must be >= 1 and divide features.static_dim=16"),
    ("model.mamba.d_state=0", "config key 'model.mamba.d_state': must be >= 1"),
    ("train.seed=-1", "config key 'train.seed': must be >= 0"),
    ("optimizer.lr=1e-3x", "config key 'optimizer.lr': expected a number, got '1e-3x'"),
    ("train.epochs=1e3", "config key 'train.epochs': expected an integer, got '1e3'"),
])
def test_bad_config_value_is_refused_at_load(
    dataset: Path, tmp_path: Path, capsys, override: str, message: str
) -> None:
    line = error_line(capsys, train_argv(dataset, tmp_path, "--set", override))
    assert line.startswith(f"mdaf-rec: error: {message}"), line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="adam tables train on a GPU")
def test_adam_tables_are_refused_on_cpu_at_load(dataset: Path, tmp_path: Path, capsys) -> None:
    line = error_line(capsys, train_argv(dataset, tmp_path, "--set", "optimizer.sparse=adam"))
    assert line == (
        "mdaf-rec: error: config key 'optimizer.sparse': on CPU the tables support sgd, adagrad, rowwise_adagrad, "
        "dense; "
        "'adam' needs a GPU (CUDA is not available here)"
    )
    assert not (tmp_path / "run").exists()


def test_exponent_floats_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads ``1e-3`` as a string; float keys accept it, from the file and from ``--set``."""
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  sparse_lr: 2E-2\n")
    cfg = load_config(path, ["optimizer.weight_decay=1e-6", "train.checkpoint_every_minutes=5e-1"])
    assert (cfg.optimizer.lr, cfg.optimizer.sparse_lr, cfg.optimizer.weight_decay) == (0.001, 0.02, 1e-6)
    assert cfg.train.checkpoint_every_minutes == 0.5
    assert load_config(None, ["optimizer.lr=1e-3"]).optimizer.lr == 0.001  # --set optimizer.lr=1e-3


# -- Commands --------------------------------------------------------------------------------------


def test_eval_on_a_missing_run_names_it(tmp_path: Path, capsys) -> None:
    line = error_line(capsys, ["eval", "--run", str(tmp_path / "nope")])
    assert line == f"mdaf-rec: error: run directory {tmp_path / 'nope'} does not exist"
    line = error_line(capsys, ["eval", "--run", str(tmp_path)])
    assert line == (f"mdaf-rec: error: {tmp_path} is not a run directory of `mdaf-rec train` (it has no "
                    "mdaf_rec_run.json, nor the config.yaml and checkpoints/index.json of an earlier version's run)")


@pytest.mark.parametrize("flag, value, message", [
    ("--rows", "0", "--rows 0: must be >= 1"),
    ("--ctr", "1.5", "--ctr 1.5: must be in (0, 1)"),
    ("--start-date", "2017-02-30", "--start-date '2017-02-30': not a date YYYY-MM-DD (day is out of range for month)"),
])
def test_synth_parameters_are_checked(tmp_path: Path, capsys, flag: str, value: str, message: str) -> None:
    line = error_line(capsys, ["data", "synth", "--out", str(tmp_path / "s"), flag, value])
    assert line == f"mdaf-rec: error: {message}"
    assert not (tmp_path / "s").exists()


def test_converter_out_that_is_a_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.write_text("mine")
    line = error_line(capsys, ["data", "synth", "--out", str(out), "--rows", "100"])
    assert line == f"mdaf-rec: error: --out {out}: exists and is not a folder"
    assert out.read_text() == "mine"


def test_non_utf8_csv_byte_names_its_one_line(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "UserBehavior.csv"
    raw.write_bytes(b"1,100,10,pv,1511539200\n1,101,10,p\xe9v,1511539300\n2,100,10,pv,1511539400\n")
    line = error_line(capsys, ["data", "taobao-behavior", "--raw", str(raw), "--out", str(tmp_path / "o")])
    assert line == (
        f"mdaf-rec: error: {raw}: line 2: column 'behavior': not valid UTF-8 (value 'p\ufffdv') "
        "(use --on-bad-row drop to drop such rows)"
    )


@pytest.mark.parametrize(
    "text", ["[1, 2]", '{"format": "mdaf_rec.sharding_plan/1"}', '{"world_size": 1, "modules": []}']
)
def test_malformed_plan_file_names_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanFileError, match=rf"^{path}: not a sharding plan written by mdaf-rec"):
        load_plan(path, 1)


def test_a_multi_line_message_is_printed_on_one_line(tmp_path: Path, capsys) -> None:
    constraints = tmp_path / "c.yaml"
    constraints.write_text("a: [1\n")  # PyYAML's message spans lines
    line = error_line(capsys, ["plan", "--config", DEMO, "--constraints", str(constraints)])
    assert line.startswith(f"mdaf-rec: error: {constraints}: cannot read constraints: ")


# -- Refused writes --------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_a_full_disk_under_torchs_archive_writer_is_one_named_error() -> None:
    """torch's C++ writer would fail again in its destructor (an abort, exit 134); ArchiveFile keeps the first
    failure and raises it, naming the file, once the writer is done."""
    with pytest.raises(OSError) as caught:
        with ArchiveFile("/dev/full") as fh:
            torch.save({"w": torch.zeros(100_000)}, fh)
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, "/dev/full")
    assert str(refused_write(caught.value, Path("/dev/full/model"))) == (
        "/dev/full/model: cannot write /dev/full (No space left on device): the disk is full (or a size limit is reached)"
    )
    read_only = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run/config.yaml")
    assert str(refused_write(read_only, Path("/mnt/ro/run"))) == (
        "/mnt/ro/run: cannot write /mnt/ro/run/config.yaml (Read-only file system): the location is not writable"
    )
    assert refused_write(OSError(errno.EIO, "Input/output error"), Path("x")) is None  # not the user's: a traceback


# -- The contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [
    "mdaf_rec.config:ConfigError", "mdaf_rec.checkpoint:CheckpointError", "mdaf_rec.data.dataset:DatasetError",
    "mdaf_rec.data.validate:DataError", "mdaf_rec.data.vocab:VocabMismatchError",
    "mdaf_rec.models.embeddings:InputIdError", "mdaf_rec.plan_io:PlanFileError", "mdaf_rec.train:TrainingError",
    "mdaf_rec.artifact:ArtifactError", "mdaf_rec.data.converters.common:ConversionError",
    "mdaf_rec.planning:PlanningError", "mdaf_rec.data.synth:SynthParamsError", "mdaf_rec.data.vocab:VocabFileError",
    "mdaf_rec.output:OutputError",
])
def test_user_facing_errors_share_one_base(where: str) -> None:
    module, name = where.split(":")
    assert issubclass(getattr(importlib.import_module(module), name), UserError)

