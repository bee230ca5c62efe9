"""The batch loader against a slow per-row reference; sharding, shuffling, resume, workers, bad input."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Tuple
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mdaf_rec.config import FeaturesConfig
from mdaf_rec.data import schema, synth
from mdaf_rec.data.batch import Batch
from mdaf_rec.data.dataset import Dataset, DatasetError
from mdaf_rec.data.loader import BatchLoader
from mdaf_rec.data.validate import ColumnRules, DataError, validate
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.errors import UserError
from mdaf_rec.features import FeatureSpec
from mdaf_rec.metrics import gauc_score

MAX_HISTORY = 8  # synth histories go up to 50: exercises truncation
Decoded = Dict[str, List[List[int]]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Dataset, FeatureSpec, Vocabularies]:
    root = tmp_path_factory.mktemp("loader")
    synth.generate(root, rows=5_000, users=300, items=2_000, categories=40, row_group_size=600, seed=1)
    dataset = Dataset.open(root)
    cfg = FeaturesConfig(max_history=MAX_HISTORY)
    vocabs = Vocabularies.load_or_build(dataset, cfg)
    return dataset, FeatureSpec.build(cfg, vocabs.sizes), vocabs


def _loader(world, split: str = "train", batch_size: int = 256, **kwargs) -> BatchLoader:
    dataset, spec, vocabs = world
    return BatchLoader(dataset, split, spec, vocabs, batch_size, **kwargs)


def _decode(kjt) -> Decoded:
    """KJT -> key -> per-row id lists (slow and obviously right)."""
    out: Decoded = {}
    lengths = kjt.lengths().numpy().reshape(len(kjt.keys()), -1)
    values = np.split(kjt.values().numpy(), np.cumsum(lengths.sum(axis=1))[:-1])
    for key, key_lengths, key_values in zip(kjt.keys(), lengths, values):
        out[key] = [v.tolist() for v in np.split(key_values, np.cumsum(key_lengths)[:-1])]
    return out


def _reference(dataset: Dataset, split: str, spec: FeatureSpec, vocabs: Vocabularies, tz: str) -> List[Decoded]:
    """Row by row with Python dicts and datetime: per row, key -> ids of both KJTs."""
    table = pa.concat_tables([pq.read_table(f) for f in dataset.split_files(split)])
    index = {name: {int(raw): i + 2 for i, raw in enumerate(v.ids)} for name, v in vocabs.spaces.items()}
    rows = []
    for row in table.to_pylist():
        local = datetime.fromtimestamp(row[schema.TIMESTAMP], ZoneInfo(tz))
        ids = {"hour": [local.hour], "dayofweek": [local.weekday()]}
        for field in spec.static_fields:
            if field.name not in ids:
                ids[field.name] = [index[field.name].get(row[field.column], 1)]
        for space in spec.sequence_spaces:
            history = row[space.history_key][-MAX_HISTORY:]
            ids[space.history_key] = [index[space.name].get(r, 1) for r in history]
        rows.append(ids)
    return rows


def _rows_of(batches: List[Batch]) -> List[int]:
    return [r for b in batches for r in b.row_index.tolist()]


def test_batches_match_per_row_reference(world) -> None:
    dataset, spec, vocabs = world
    reference = _reference(dataset, "train", spec, vocabs, "Asia/Shanghai")
    labels = pq.read_table(dataset.split_files("train")[0], columns=[schema.LABEL]).column(0).to_numpy()
    users = pq.read_table(dataset.split_files("train")[0], columns=[schema.USER_ID]).column(0).to_numpy()
    batches = list(_loader(world, shuffle=True, seed=5))
    assert sorted(_rows_of(batches)) == list(range(len(reference)))
    for batch in batches:
        static, sequence = _decode(batch.static_features), _decode(batch.sequence_features)
        assert list(static) == spec.static_keys and list(sequence) == spec.sequence_keys
        assert batch.labels.dtype == torch.float32
        assert batch.labels.tolist() == labels[batch.row_index.numpy()].tolist()
        assert batch.user_id.tolist() == users[batch.row_index.numpy()].tolist()
        assert batch.dense_features.shape == (batch.batch_size, 0)
        for i, row in enumerate(batch.row_index.tolist()):
            expected = reference[row]
            for key in spec.static_keys:
                assert static[key][i] == expected[key], (row, key)
            for space in spec.sequence_spaces:
                assert sequence[space.name][i] == expected[space.name]
                assert sequence[space.history_key][i] == expected[space.history_key], (row, space.history_key)
    assert max(len(h) for b in batches for h in _decode(b.sequence_features)["item_history"]) == MAX_HISTORY


def test_unshuffled_order_is_split_order(world) -> None:
    loader = _loader(world, "val", batch_size=100)
    assert _rows_of(list(loader)) == list(range(world[0].num_rows("val")))
    assert len(loader) == -(-world[0].num_rows("val") // 100)


def _write(root: Path, tables: Dict[str, pa.Table], row_group_size: int = 1000) -> Dataset:
    root.mkdir(parents=True, exist_ok=True)
    for split, table in tables.items():
        pq.write_table(table, root / f"{split}.parquet", row_group_size=row_group_size)
    return Dataset.open(root)


T0 = 1511631000  # 2017-11-25T17:30:00Z


def _tiny(timestamps: List[int]) -> pa.Table:
    n = len(timestamps)
    return pa.table(
        {
            schema.USER_ID: pa.array(range(n), pa.int64()),
            schema.ITEM_ID: pa.array(range(10, 10 + n), pa.int64()),
            schema.CATEGORY_ID: pa.array([1] * n, pa.int64()),
            schema.TIMESTAMP: pa.array(timestamps, pa.int64()),
            schema.LABEL: pa.array([i % 2 for i in range(n)], pa.int8()),
            schema.ITEM_HISTORY: pa.array([[10 + j for j in range(i)] for i in range(n)], pa.list_(pa.int64())),
            schema.CATEGORY_HISTORY: pa.array([[1] * i for i in range(n)], pa.list_(pa.int64())),
        }
    )


def test_gauc_groups_new_users_by_raw_id(tmp_path: Path) -> None:
    """Users unseen in training all share the OOV row; GAUC must still count each of them as a user."""
    train = _tiny([1511631000] * 8)
    val = _tiny([1511631000] * 8).set_column(
        0, schema.USER_ID, pa.array([900, 900, 901, 901, 902, 902, 903, 903], pa.int64())
    )
    dataset = _write(tmp_path, {"train": train, "val": val, "test": val})
    cfg = FeaturesConfig()
    vocabs = Vocabularies.build(dataset, cfg)
    spec = FeatureSpec.build(cfg, vocabs.sizes)
    (batch,) = list(BatchLoader(dataset, "val", spec, vocabs, 8))
    assert _decode(batch.static_features)["user"] == [[1]] * 8  # all new: the OOV index
    assert batch.user_id.tolist() == [900, 900, 901, 901, 902, 902, 903, 903]
    # labels alternate 0, 1 within each user; the scores rank users 900 and 902 right, 901 and 903 wrong
    probs = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.3, 0.4, 0.6, 0.5])
    assert gauc_score(probs, batch.labels, batch.user_id) == 0.5
    pooled = torch.ones(8, dtype=torch.int64)  # grouped by table index: one "user", 9 of 16 pairs ranked right
    assert gauc_score(probs, batch.labels, pooled) == 0.5625


def test_hour_and_day_of_week_in_time_zone(tmp_path: Path) -> None:
    # 2017-11-25T17:30:00Z is Saturday 17h UTC but Sunday 01h in Asia/Shanghai
    table = _tiny([T0, 1511622000])
    dataset = _write(tmp_path, {s: table for s in schema.SPLITS})
    cfg = FeaturesConfig()
    vocabs = Vocabularies.build(dataset, cfg)
    spec = FeatureSpec.build(cfg, vocabs.sizes)
    for tz, hours, days in [(None, [17, 15], [5, 5]), ("Asia/Shanghai", [1, 23], [6, 5])]:
        (batch,) = list(BatchLoader(dataset, "train", spec, vocabs, 4, timezone=tz))
        static = _decode(batch.static_features)
        assert [h for (h,) in static["hour"]] == hours and [d for (d,) in static["dayofweek"]] == days


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_slices_concatenate_to_global_batches(world, world_size: int) -> None:
    kwargs = dict(split="val", batch_size=48, shuffle=True, seed=2, epoch=1, sharding="every_rank_reads_all")
    single = [b.row_index.tolist() for b in _loader(world, **kwargs)]
    ranks = [[b.row_index.tolist() for b in _loader(world, rank=r, world_size=world_size, **kwargs)]
             for r in range(world_size)]
    assert all(len(r) == len(single) for r in ranks)
    for step, rows in enumerate(single):
        slices = [ranks[r][step] for r in range(world_size)]
        assert sum(slices, []) == rows
        assert max(map(len, slices)) - min(map(len, slices)) <= 1  # even split, also of the last batch
    all_rows = sum((sum(r, []) for r in ranks), [])
    assert sorted(all_rows) == list(range(world[0].num_rows("val")))
    assert len(single[-1]) < 48  # the split has a partial last batch


def test_batch_size_must_divide_by_world_size(world) -> None:
    with pytest.raises(ValueError, match="multiple of world_size"):
        _loader(world, batch_size=10, world_size=3)


def test_seeded_permutation_per_epoch(world) -> None:
    def order(**kwargs) -> List[int]:
        return _rows_of(list(_loader(world, shuffle=True, **kwargs)))

    base = order(seed=0, epoch=0)
    assert base == order(seed=0, epoch=0)
    assert base != order(seed=0, epoch=1) and base != order(seed=1, epoch=0)
    assert sorted(base) == sorted(order(seed=0, epoch=1))
    loader = _loader(world, shuffle=True, seed=0)
    loader.set_epoch(1)
    assert _rows_of(list(loader)) == order(seed=0, epoch=1)


def test_drop_last(world) -> None:
    n = world[0].num_rows("val")
    dropped = _loader(world, "val", batch_size=64, drop_last=True)
    kept = _loader(world, "val", batch_size=64)
    assert n % 64 and len(dropped) == n // 64 and len(kept) == n // 64 + 1
    assert all(b.batch_size == 64 for b in dropped)
    assert len(_rows_of(list(dropped))) == n // 64 * 64 and len(_rows_of(list(kept))) == n


@pytest.mark.parametrize("sharding", ["own_share", "every_rank_reads_all"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_resumes_exactly(world, sharding: str, num_workers: int) -> None:
    kwargs = dict(batch_size=200, shuffle=True, seed=3, world_size=2, rank=1, sharding=sharding, num_workers=num_workers)
    full = [b.row_index.tolist() for b in _loader(world, **kwargs)]
    resumed = [b.row_index.tolist() for b in _loader(world, start_batch=7, **kwargs)]
    assert len(full) == 19 and resumed == full[7:]


@pytest.mark.parametrize("sharding", ["own_share", "every_rank_reads_all"])
def test_workers_give_the_same_batches(world, sharding: str) -> None:
    """every_rank_reads_all: the order of num_workers = 0. own_share: the same batches, position p being batch
    p // K of lane p % K (each worker reads its lane only)."""
    kwargs = dict(batch_size=300, shuffle=True, seed=4, world_size=2, rank=1, sharding=sharding)
    by_batch = list(_loader(world, **kwargs))
    loader = _loader(world, num_workers=2, start_batch=1, **kwargs)
    parallel = list(loader)
    assert len(parallel) == len(by_batch) - 1 == 12
    order = [loader.plan.batch_at(p) for p in range(1, len(by_batch))]
    if sharding == "every_rank_reads_all":
        assert order == list(range(1, 13))
    else:  # lanes of batches 0-6 and 7-12, interleaved, from position 1 on
        assert order == [7, 1, 8, 2, 9, 3, 10, 4, 11, 5, 12, 6]
    for b, batch in zip(parallel, order):
        a = by_batch[batch]
        assert torch.equal(a.row_index, b.row_index)
        assert torch.equal(a.sequence_features.values(), b.sequence_features.values())
        assert torch.equal(a.static_features.values(), b.static_features.values())


def _own_share(world, world_size: int, **kwargs) -> List[List[List[int]]]:
    """Rank -> its batches' row numbers (own_share, shuffled)."""
    return [[b.row_index.tolist() for b in _loader(world, rank=r, world_size=world_size, shuffle=True, **kwargs)]
            for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_own_share_reads_every_row_once_per_epoch(world, world_size: int) -> None:
    n = world[0].num_rows("train")  # 3737 rows in row groups of 600
    ranks = _own_share(world, world_size, batch_size=96, seed=7, epoch=2)
    steps = -(-n // 96)
    assert [len(r) for r in ranks] == [steps] * world_size  # the same step count everywhere (collectives)
    rows = [row for r in ranks for batch in r for row in batch]
    assert len(rows) == n and sorted(rows) == list(range(n))  # no duplicates, no losses
    for r in ranks:
        assert all(len(b) == 96 // world_size for b in r[:-1])
    last = [len(r[-1]) for r in ranks]  # the last global batch's n % 96 rows, split evenly
    assert sum(last) == n % 96 and max(last) - min(last) <= 1


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_own_share_rank_reads_about_one_wth(world, world_size: int) -> None:
    n = world[0].num_rows("train")
    for r in range(world_size):
        plan = _loader(world, rank=r, world_size=world_size, batch_size=96, shuffle=True).plan
        pieces = [p for w in plan.windows for p in w]
        share = sum(p.rows for p in pieces)
        read = sum(p.block.rows for p in pieces)  # whole row groups are read, cut pieces too
        assert share in (n // world_size, n // world_size + 1)
        assert read <= share + 2 * 600  # at most the two row groups its share boundaries cut


def test_own_share_is_deterministic_per_seed_and_epoch(world) -> None:
    base = _own_share(world, 2, batch_size=96, seed=0, epoch=0)
    assert base == _own_share(world, 2, batch_size=96, seed=0, epoch=0)
    assert base != _own_share(world, 2, batch_size=96, seed=0, epoch=1)
    assert base != _own_share(world, 2, batch_size=96, seed=1, epoch=0)
    # W = 1: both modes give the same batches
    assert _own_share(world, 1, batch_size=96, seed=5) == [
        [b.row_index.tolist() for b in _loader(world, batch_size=96, shuffle=True, seed=5, sharding="every_rank_reads_all")]]


def test_own_share_unshuffled_shares_are_contiguous(world) -> None:
    n = world[0].num_rows("val")
    ranks = [[row for b in _loader(world, "val", batch_size=99, rank=r, world_size=3) for row in b.row_index.tolist()]
             for r in range(3)]
    assert sum(ranks, []) == list(range(n))
    assert [len(r) for r in ranks] == [n // 3 + (r < n % 3) for r in range(3)]


def test_sharding_mode_is_checked(world) -> None:
    with pytest.raises(ValueError, match=r"sharding 'rows' is not one of \['own_share', 'every_rank_reads_all'\]"):
        _loader(world, sharding="rows")


def test_folder_split_without_meta(world, tmp_path: Path) -> None:
    dataset, spec, vocabs = world
    train = pq.read_table(dataset.split_files("train")[0])
    (tmp_path / "train").mkdir()
    pq.write_table(train.slice(0, 1234), tmp_path / "train" / "part-0.parquet", row_group_size=500)
    pq.write_table(train.slice(1234), tmp_path / "train" / "part-1.parquet", row_group_size=500)
    for split in ("val", "test"):
        shutil.copy(dataset.split_files(split)[0], tmp_path / f"{split}.parquet")
    folder = Dataset.open(tmp_path)
    assert folder.meta == {} and folder.timezone() == "UTC" and folder.num_rows("train") == train.num_rows
    reference = _reference(folder, "train", spec, vocabs, "UTC")
    batches = list(BatchLoader(folder, "train", spec, vocabs, 500, shuffle=True, shuffle_rows=1000))
    assert sorted(_rows_of(batches)) == list(range(train.num_rows))
    for batch in batches:
        static = _decode(batch.static_features)
        history = _decode(batch.sequence_features)["item_history"]
        for i, row in enumerate(batch.row_index.tolist()):
            assert static["hour"][i] == reference[row]["hour"] and history[i] == reference[row]["item_history"]


def test_dataset_errors_name_folder_and_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset.open(tmp_path / "nope")
    pq.write_table(_tiny([1]), tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match=r"split 'val' is missing"):
        Dataset.open(tmp_path)


def _set(column: str, value: pa.Array) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.set_column(t.schema.get_field_index(column), column, value)


N_BAD = 12
BAD_ROW = 7  # in the second row group (row groups of 5): the message counts rows within the file
IDS = list(range(N_BAD))


@pytest.mark.parametrize(
    "corrupt,column,message",
    [
        (lambda t: t.drop_columns([schema.ITEM_HISTORY]), schema.ITEM_HISTORY, "missing column"),
        (_set(schema.ITEM_ID, pa.array([float(i) for i in IDS])), schema.ITEM_ID, "expected an integer"),
        (_set(schema.USER_ID, pa.array([-1 if i == BAD_ROW else i for i in IDS], pa.int64())), schema.USER_ID,
         "row 7: negative"),
        (_set(schema.USER_ID, pa.array([None if i == BAD_ROW else i for i in IDS], pa.int64())), schema.USER_ID,
         "row 7: null"),
        (_set(schema.LABEL, pa.array([2 if i == BAD_ROW else 0 for i in IDS], pa.int8())), schema.LABEL,
         "row 7: label"),
        (_set(schema.ITEM_HISTORY, pa.array([None if i == BAD_ROW else [1] * i for i in IDS], pa.list_(pa.int64()))),
         schema.ITEM_HISTORY, "row 7: null history"),
        (_set(schema.ITEM_HISTORY, pa.array([[1, -3] if i == BAD_ROW else [1] * i for i in IDS],
                                            pa.list_(pa.int64()))), schema.ITEM_HISTORY, "row 7: null or negative"),
        (_set(schema.CATEGORY_HISTORY, pa.array([[1] * (i + (i == BAD_ROW)) for i in IDS], pa.list_(pa.int64()))),
         schema.CATEGORY_HISTORY, "row 7: history length differs"),
        (_set(schema.ITEM_ID, pa.array([2**63 if i == BAD_ROW else i for i in IDS], pa.uint64())), schema.ITEM_ID,
         "row 7: value does not fit"),
        (_set(schema.TIMESTAMP, pa.array([(T0 + i) * (1000 if i == BAD_ROW else 1) for i in IDS], pa.int64())),
         schema.TIMESTAMP, f"row 7: {(T0 + BAD_ROW) * 1000} is not unix seconds of 1990..2099; it looks like "
         "milliseconds (2017-11-25 17:30:07 UTC): divide the column by 1000"),
    ],
)
def test_bad_input_names_file_column_and_row(tmp_path: Path, corrupt, column: str, message: str) -> None:
    good = _tiny([T0 + i for i in range(N_BAD)])
    dataset = _write(tmp_path, {s: good for s in schema.SPLITS}, row_group_size=5)
    cfg = FeaturesConfig()
    vocabs = Vocabularies.build(dataset, cfg)
    spec = FeatureSpec.build(cfg, vocabs.sizes)
    pq.write_table(corrupt(good), tmp_path / "val.parquet", row_group_size=5)
    with pytest.raises(DataError) as err:
        list(BatchLoader(dataset, "val", spec, vocabs, 4))
    text = str(err.value)
    assert "val.parquet" in text and repr(column) in text and message in text, text


@pytest.mark.parametrize("validated", [False, True])
def test_narrow_integer_columns_are_cast(tmp_path: Path, validated: bool) -> None:
    good = _tiny([T0 + i for i in range(6)])
    narrow = good.cast(pa.schema([
        pa.field(f.name, pa.int32() if f.type == pa.int64() else pa.list_(pa.int16()) if pa.types.is_list(f.type)
                 else pa.uint8()) for f in good.schema
    ]))
    dataset = _write(tmp_path, {"train": good, "val": narrow, "test": good})
    cfg = FeaturesConfig()
    vocabs = Vocabularies.build(dataset, cfg)
    spec = FeatureSpec.build(cfg, vocabs.sizes)
    (a,) = list(BatchLoader(dataset, "train", spec, vocabs, 8))
    (b,) = list(BatchLoader(dataset, "val", spec, vocabs, 8, validated=validated))  # validated: only cast
    assert torch.equal(a.sequence_features.values(), b.sequence_features.values())
    assert torch.equal(a.static_features.values(), b.static_features.values()) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize(
    "rows, batch_size, world_size, drop_last, sizes",
    [
        (13, 12, 3, False, [[5, 4, 4]]),  # last batch of 1 row < 3 ranks: joins the batch before it
        (14, 12, 3, False, [[5, 5, 4]]),
        (15, 12, 3, False, [[4, 4, 4], [1, 1, 1]]),  # 3 rows for 3 ranks: a batch of its own
        (25, 8, 2, False, [[4, 4], [4, 4], [5, 4]]),
        (13, 12, 3, True, [[4, 4, 4]]),  # drop_last drops it
        (2, 12, 2, False, [[1, 1]]),
    ],
)
def test_no_rank_gets_an_empty_batch_and_every_row_is_read_once(
    tmp_path: Path, rows: int, batch_size: int, world_size: int, drop_last: bool, sizes: List[List[int]]
) -> None:
    dataset = _write(tmp_path, {s: _tiny([T0 + i for i in range(rows)]) for s in schema.SPLITS}, row_group_size=5)
    cfg = FeaturesConfig()
    vocabs = Vocabularies.build(dataset, cfg)
    spec = FeatureSpec.build(cfg, vocabs.sizes)
    for shuffle in (False, True):
        ranks = [
            list(BatchLoader(dataset, "train", spec, vocabs, batch_size, rank=r, world_size=world_size,
                             drop_last=drop_last, shuffle=shuffle, shuffle_rows=5))
            for r in range(world_size)
        ]
        assert [[b.batch_size for b in step] for step in zip(*ranks)] == sizes
        seen = sorted(int(i) for batches in ranks for b in batches for i in b.row_index)
        assert len(set(seen)) == len(seen) == sum(map(sum, sizes))  # no row twice
        assert drop_last or seen == list(range(rows))  # every row once


def test_split_with_fewer_rows_than_ranks_is_refused(tmp_path: Path) -> None:
    dataset = _write(tmp_path, {s: _tiny([T0, T0 + 1]) for s in schema.SPLITS})
    cfg = FeaturesConfig()
    vocabs = Vocabularies.build(dataset, cfg)
    spec = FeatureSpec.build(cfg, vocabs.sizes)
    with pytest.raises(UserError, match=r"the val split has 2 rows, fewer than the 3 ranks.*at most 2 processes"):
        BatchLoader(dataset, "val", spec, vocabs, 3, rank=0, world_size=3)


def test_validate_counts_rows_across_chunks() -> None:
    first, second = _tiny([T0 + i for i in range(5)]), _tiny([T0 + i for i in range(4)])
    bad_history = pa.array([[1], [2, -1], [], [3, 4, 5]], pa.list_(pa.int64()))
    second = _set(schema.ITEM_HISTORY, bad_history)(second)
    second = _set(schema.CATEGORY_HISTORY, bad_history)(second)
    table = pa.concat_tables([first, second])
    assert table.column(schema.ITEM_HISTORY).num_chunks == 2
    with pytest.raises(DataError, match=r"x.parquet: column 'item_history', row 106: null or negative"):
        validate(table, ColumnRules.build(), "x.parquet", row_offset=100)
    checked = validate(first, ColumnRules.build(), "x.parquet")
    assert checked.schema.field(schema.LABEL).type == pa.int8()


def test_a_cuda_session_loads_batches_into_pinned_memory(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """``non_blocking`` host-to-device copies overlap compute only from page-locked memory: a session on CUDA pins
    every batch it loads (checked by recording :meth:`Batch.pin_memory`, which needs CUDA itself), one on CPU none."""
    import types

    from mdaf_rec.config import Config
    from mdaf_rec.distributed import DistEnv
    from mdaf_rec.train import Session

    pinned: List[Batch] = []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: pinned.append(self) or self)
    dataset, spec, vocabs = world
    cfg = Config()
    cfg.train.batch_size = cfg.train.eval_batch_size = 1024
    for device, workers, expected in (("cuda", 0, True), ("cuda", 1, True), ("cpu", 0, False)):
        cfg.data.num_workers = workers
        env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device(device), backend="gloo")
        session = types.SimpleNamespace(cfg=cfg, env=env, dataset=dataset, spec=spec, vocabs=vocabs)
        pinned.clear()
        batches = list(Session.loader(session, "val"))
        assert len(batches) == 1 and (pinned == batches) is expected, (device, workers)


def _dropped_items(world, **kwargs) -> Dict[int, Tuple[int, int, int]]:
    """Row number -> (static ``item`` id, sequence target ``item`` id, static ``category`` id) over one epoch."""
    out = {}
    for batch in _loader(world, shuffle=True, **kwargs):
        static, sequence = _decode(batch.static_features), _decode(batch.sequence_features)
        for row, (item,), (target,), (category,) in zip(batch.row_index.tolist(), static["item"], sequence["item"],
                                                         static["category"]):
            out[row] = (item, target, category)
    return out


def test_oov_dropout_sends_a_share_of_static_ids_to_the_oov_row(world) -> None:
    """``train.oov_dropout``: about the rate's share of the rows get the OOV index in the static ``item`` field, the
    sequence target and the other fields keep their ids, and which rows does not depend on the batch size, the
    workers or the ranks; a new epoch or seed draws anew."""
    plain = _dropped_items(world, seed=5)
    dropped = _dropped_items(world, seed=5, oov_dropout={"item": 0.4})
    assert dropped.keys() == plain.keys()
    known = [r for r, (item, _, _) in plain.items() if item != 1]  # ids already OOV cannot tell
    to_oov = {r for r in known if dropped[r][0] == 1}
    assert 0.37 < len(to_oov) / len(known) < 0.43, len(to_oov) / len(known)
    for r, (item, target, category) in plain.items():
        assert dropped[r] == ((1 if r in to_oov else item), target, category)
    assert any(dropped[r][1] != 1 for r in to_oov)  # the sequence target of a dropped row keeps its id
    same = _dropped_items(world, seed=5, batch_size=1000, oov_dropout={"item": 0.4}, num_workers=2)
    assert same == dropped
    ranks = [_dropped_items(world, seed=5, world_size=2, rank=r, oov_dropout={"item": 0.4}) for r in (0, 1)]
    assert {**ranks[0], **ranks[1]} == dropped
    for other in (dict(seed=5, epoch=1), dict(seed=6)):
        again = _dropped_items(world, oov_dropout={"item": 0.4}, **other)
        overlap = len(to_oov & {r for r in known if again[r][0] == 1}) / len(known)
        assert 0.12 < overlap < 0.20, overlap  # independent draws: 0.4 * 0.4
    assert _dropped_items(world, seed=5, oov_dropout={"item": 0.0}) == plain
