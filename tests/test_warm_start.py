"""Day-by-day training: vocabulary growth, day slices of the training split, ``train --init-from`` (warm start)."""

from __future__ import annotations

import collections
import datetime
import json
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow.parquet as pq
import pytest

from mdaf_rec.config import ConfigError, load_config
from mdaf_rec.data.dataset import Dataset, DatasetError
from mdaf_rec.data.days import day_bounds, day_slice
from mdaf_rec.data.synth import generate
from mdaf_rec.data.vocab import SpaceSettings, VocabMismatchError, Vocabularies, Vocabulary
from mdaf_rec.features import OOV_INDEX
from test_train import REPO, _env, _free_port, train

ITEM = SpaceSettings("item", "item_id", "item_history", None)
USER = SpaceSettings("user", "user_id", None, None)


def _vocabs(items, users, hashed_user: int = 0) -> Vocabularies:
    user = SpaceSettings("user", "user_id", None, hashed_user) if hashed_user else USER
    return Vocabularies({"item": Vocabulary(ITEM, np.array(items)), "user": Vocabulary(user, None if hashed_user else
                                                                                        np.array(users))}, 1, [])


@pytest.mark.parametrize("direct_max_id", [1 << 24, 0])  # direct-index table / binary search
def test_grown_vocabulary_keeps_known_indices_and_appends_new_ids_in_raw_id_order(direct_max_id: int) -> None:
    old = _vocabs([10, 20, 30], [7])
    new = _vocabs([5, 20, 35, 40], [7, 8])  # built from the next day: 10 and 30 absent, 5 / 35 / 40 new
    grown = old.grown(new, "the source run")
    assert grown.spaces["item"].ids.tolist() == [10, 20, 30, 5, 35, 40]
    assert grown.sizes == {"item": 8, "user": 4}
    item = Vocabulary(ITEM, grown.spaces["item"].ids, direct_max_id=direct_max_id)
    raw = np.array([10, 20, 30, 5, 35, 40, 99, 0, 25])
    assert item.lookup(raw).tolist() == [2, 3, 4, 5, 6, 7, OOV_INDEX, OOV_INDEX, OOV_INDEX]
    assert old.lookup("item", raw[:3]).tolist() == grown.lookup("item", raw[:3]).tolist()
    # growing by data that brings nothing new changes nothing (same fingerprint as the source's)
    assert old.grown(_vocabs([20], [7]), "the source run").fingerprint == old.fingerprint


def test_grown_vocabulary_saves_and_loads_in_index_order(tmp_path: Path) -> None:
    grown = _vocabs([10, 20, 30], [7]).grown(_vocabs([5, 40], [1]), "the source run")
    grown.save(tmp_path)
    loaded = Vocabularies.load(tmp_path)
    assert loaded.fingerprint == grown.fingerprint
    assert loaded.spaces["item"].ids.tolist() == [10, 20, 30, 5, 40]
    assert loaded.lookup("user", np.array([1, 7])).tolist() == [3, 2]


def test_growth_refuses_other_hashing_naming_the_key() -> None:
    with pytest.raises(VocabMismatchError, match=r"'features.id_spaces.user.hash_buckets': 50 here, None in src"):
        _vocabs([1], [7]).grown(_vocabs([1], [], hashed_user=50), "src")


def _local_day_counts(path: Path, zone: str) -> collections.Counter:
    ts = pq.read_table(path, columns=["timestamp"]).column("timestamp").to_pylist()
    return collections.Counter(datetime.datetime.fromtimestamp(t, ZoneInfo(zone)).date().isoformat() for t in ts)


def test_day_slice_keeps_the_training_rows_of_the_local_days(dataset: Path, tmp_path: Path) -> None:
    source = Dataset.open(dataset)
    zone = source.timezone()
    days = _local_day_counts(dataset / "train.parquet", zone)
    first, *middle, last = sorted(days)
    sliced = day_slice(source, middle[0], middle[1], zone, cache_dir=tmp_path)
    assert sliced.num_rows("train") == days[middle[0]] + days[middle[1]] > 0
    assert set(_local_day_counts(sliced.split_files("train")[0], zone)) == {middle[0], middle[1]}
    lo, hi = day_bounds(middle[0], middle[1], zone)
    whole = pq.read_table(dataset / "train.parquet")
    ts = whole.column("timestamp").to_numpy()
    assert pq.read_table(sliced.split_files("train")[0]).equals(whole.filter((ts >= lo) & (ts < hi)))  # in split order
    for split in ("val", "test"):  # whole, the dataset's own files
        assert [p.resolve() for p in sliced.split_files(split)] == [p.resolve() for p in source.split_files(split)]
    # open ends; a second call reuses the slice
    assert day_slice(source, None, first, zone, cache_dir=tmp_path).num_rows("train") == days[first]
    mtime = sliced.split_files("train")[0].stat().st_mtime_ns
    assert day_slice(source, middle[0], middle[1], zone, cache_dir=tmp_path).split_files("train")[0].stat().st_mtime_ns == mtime
    lo, hi = day_bounds(middle[0], middle[0], zone)
    assert hi - lo == 86400 and datetime.datetime.fromtimestamp(lo, ZoneInfo(zone)).hour == 0
    with pytest.raises(DatasetError, match=rf"no training row has a local date \({zone}\) in \[2030-01-01, last\].*"
                                           rf"span local dates .*{last}"):
        day_slice(source, "2030-01-01", None, zone, cache_dir=tmp_path)


@pytest.mark.parametrize("sets, key", [
    (["data.from_date=2017-13-01"], "data.from_date"),
    (["data.from_date=2017-12-02", "data.to_date=2017-12-01"], "data.to_date"),
    (["train.init_optimizer=true"], "train.init_optimizer"),
])
def test_day_and_warm_start_keys_are_validated(sets, key) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config("demo", sets)


def test_dates_from_yaml_are_read_as_strings() -> None:
    cfg = load_config("demo", ["data.from_date=2017-12-01", 'data.to_date="2017-12-02"'])
    assert (cfg.data.from_date, cfg.data.to_date) == ("2017-12-01", "2017-12-02")


# --------------------------------------------------------------------------------------------------
# Warm start end to end
# --------------------------------------------------------------------------------------------------

# Under torchrun (2 ranks): SOURCE_RUN SAME_DATA NEW_DATA OUT. Scores SAME_DATA's validation split with the source
# checkpoint, then with a warm-started training session on the same data (no growth: the same scores), then
# warm-starts a session on NEW_DATA (new ids: tables grow) with the optimizer state, and checks every table row this
# rank holds: the source's rows bit-exact, the new rows as the fresh model initialised them. Writes OUT/rank{R}.json.
CHECK = """
import json, sys
from pathlib import Path
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import load_config
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.distributed import init_distributed
from mdaf_rec.train import evaluate, open_session, warm_start_session
from mdaf_rec.warm_start import resolve_source, source_vocabularies, table_key_rule

src, same, new, out = sys.argv[1:5]
env = init_distributed()
source = resolve_source(src)
HEAD = ("auc", "logloss", "count")

def warm_session(data, name, sets=()):
    cfg = load_config(source.run.config, [f"data.path={data}", "data.to_date=null", f"train.init_from={src}", *sets])
    vocabs = source_vocabularies(source).grown(Vocabularies.load_or_build(Dataset.open(data), cfg.features), "src")
    return open_session(cfg, Path(out) / name, env, vocabs=vocabs)

def pieces(value):
    if isinstance(value, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    return [((0,) * value.dim(), value)]

ref = open_session(load_config(source.run.config), source.run.path, env, vocabs=Vocabularies.load(source.run.vocab),
                   training=False)
ckpt.load_model_weights(source.checkpoint, ref.model)
result = {"ref": {k: evaluate(ref, "val")[k] for k in HEAD}}
session = warm_session(same, "same")
result["same_record"] = warm_start_session(session, source)
result["same"] = {k: evaluate(session, "val")[k] for k in HEAD}

session = warm_session(new, "grown", ["train.init_optimizer=true"])
is_table = table_key_rule(session.spec)
fresh = {k: [(o, t.clone()) for o, t in pieces(v)] for k, v in session.model.state_dict().items() if is_table(k)}
result["grown_record"] = warm_start_session(session, source)
stored = ckpt.stored_tensors(source.checkpoint)
before = {k: torch.empty(stored["model." + k][0]) for k in fresh}
ckpt.load_checkpoint(source.checkpoint, {"model": before}, restore_rng=False)
rows = {"known": 0, "new": 0, "bad": []}
state = session.model.state_dict()
for key, parts in fresh.items():
    for (offsets, now), (_, init) in zip(pieces(state[key]), parts):
        r0, c0 = offsets
        for i in range(now.shape[0]):
            row = r0 + i
            if row < before[key].shape[0]:
                ok = torch.equal(now[i], before[key][row, c0:c0 + now.shape[1]])
                rows["known"] += 1
            else:
                ok = torch.equal(now[i], init[i]) and not torch.equal(now[i], torch.zeros_like(now[i]))
                rows["new"] += 1
            if not ok:
                rows["bad"].append([key, row])
result["rows"] = rows
(Path(out) / f"rank{env.rank}.json").write_text(json.dumps(result))
"""


@pytest.fixture(scope="module")
def source_run(dataset: Path, tmp_path_factory) -> Path:
    """MDAF-BST trained on the training rows of every local day of ``dataset`` but its last (a day slice)."""
    days = sorted(_local_day_counts(dataset / "train.parquet", Dataset.open(dataset).timezone()))
    run = tmp_path_factory.mktemp("warm") / "source"
    train(dataset, run, "--epochs", "1", "--set", "train.max_steps_per_epoch=6", "--to-date", days[-2],
          config="configs/mdaf_bst.yaml")
    return run


@pytest.fixture(scope="module")
def next_data(tmp_path_factory) -> Path:
    """Another dataset of the same shape with more items: its training split brings ids the source never saw."""
    path = tmp_path_factory.mktemp("next")
    generate(path, rows=1500, users=300, items=1000, categories=30, max_history=10, seed=11)
    return path


def test_warm_start_on_two_ranks_reproduces_scores_and_grows_tables(
    source_run: Path, dataset: Path, next_data: Path, tmp_path: Path
) -> None:
    cfg = load_config(source_run / "config.yaml")
    # the source's own training rows (its day slice, reused), and new data
    same = day_slice(Dataset.open(dataset), cfg.data.from_date, cfg.data.to_date, cfg.features.timezone).root
    for data in (same, next_data):  # vocabularies and validation records made once, before the ranks read them
        Vocabularies.load_or_build(Dataset.open(data), cfg.features)
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), str(source_run), str(same), str(next_data), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["same"] == pytest.approx(result["ref"], abs=1e-7)  # the source's scores, before any step
        assert result["same_record"]["grown_tables"] == {}
        grown = result["grown_record"]["grown_tables"]
        assert any("sequence_item.weight" in k for k in grown) and any("static_item.weight" in k for k in grown)
        assert all(old < new for old, new in grown.values())
        assert result["grown_record"]["optimizer"]["taken"] > 0
        assert result["rows"]["bad"] == []
    assert sum(r["rows"]["new"] for r in ranks) > 0 and sum(r["rows"]["known"] for r in ranks) > 0


def test_warm_start_cli_grows_records_and_resumes(source_run: Path, next_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "next"
    args = ["--set", "train.max_steps_per_epoch=2", "--init-from", f"{source_run}:last"]
    train(next_data, run, "--epochs", "1", *args, config="configs/mdaf_bst.yaml")
    first = json.loads((run / "metrics.json").read_text())
    # the same command, one epoch more: resumes from the run's own checkpoint and grown vocabularies
    proc = train(next_data, run, "--epochs", "2", *args, config="configs/mdaf_bst.yaml")
    assert "resuming" in proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["steps"] == 4 and metrics["init_from"] == first["init_from"]
    assert metrics["init_from"]["checkpoint"] == str((source_run / "checkpoints" / "epoch_1").resolve())
    assert metrics["init_from"]["grown_tables"] and metrics["init_from"]["optimizer"] is None
    assert load_config(run / "config.yaml").train.init_from == f"{source_run}:last"
    old, new = Vocabularies.load(source_run / "vocab"), Vocabularies.load(run / "vocab")
    for space in ("item", "category", "user"):
        known = old.spaces[space].ids
        assert new.spaces[space].ids[: len(known)].tolist() == known.tolist()
        added = new.spaces[space].ids[len(known):]
        assert (np.diff(added) > 0).all() and not np.isin(added, known).any()
    assert len(new.spaces["item"].ids) > len(old.spaces["item"].ids)


def test_warm_start_refuses_another_model_shape_naming_the_key(source_run: Path, dataset: Path) -> None:
    from mdaf_rec.trainable import build_train_module
    from mdaf_rec.warm_start import WarmStartError, load_model_state, resolve_source, table_key_rule

    source = resolve_source(str(source_run))
    vocabs = Vocabularies.load(source_run / "vocab")
    for sets, key in ((["features.static_dim=8"], r"'model\.static_branch\.\S+' is \[[\d, ]+\] there and \[[\d, ]+\] here"),
                      (["model.name=mdaf_mamba"], r"holds 'model\.sequence_branch\.encoder\.\S+', which this model lacks")):
        cfg = load_config(source_run / "config.yaml", sets)
        spec, module = build_train_module(cfg, vocabs.sizes, table_device="cpu", dense_device="cpu",
                                          compute_device="cpu", with_sparse_optimizer=False)
        with pytest.raises(WarmStartError, match=key):
            load_model_state(source, module, table_key_rule(spec))
    with pytest.raises(WarmStartError, match="not a run directory"):
        resolve_source(str(dataset))


def test_warm_start_refuses_a_vocabulary_source_for_managed_ids(source_run: Path) -> None:
    from mdaf_rec.warm_start import WarmStartError, check_id_mapping, resolve_source

    managed = ["features.id_mapping=managed", "features.id_spaces.user.rows=300", "features.id_spaces.item.rows=800",
               "features.id_spaces.category.rows=32"]
    check_id_mapping(resolve_source(str(source_run)), load_config(source_run / "config.yaml"), 2)
    with pytest.raises(WarmStartError, match=r"trained with features.id_mapping: vocab, this run has managed"):
        check_id_mapping(resolve_source(str(source_run)), load_config(source_run / "config.yaml", managed), 1)
