"""Vocabularies: known ids, min_count, OOV, shared target/history space, hashing, reuse and fingerprints."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdaf_rec.config import FeaturesConfig, IdSpaceConfig
from mdaf_rec.data import schema
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.vocab import (
    VOCAB_DIR,
    VOCAB_FILE,
    Vocabularies,
    VocabFileError,
    VocabMismatchError,
    stable_hash,
)

MASK = (1 << 64) - 1


def _rows(users: List[int], items: List[int], item_histories: List[List[int]]) -> pa.Table:
    n = len(users)
    return pa.table(
        {
            schema.USER_ID: pa.array(users, pa.int64()),
            schema.ITEM_ID: pa.array(items, pa.int64()),
            schema.CATEGORY_ID: pa.array([i % 3 for i in items], pa.int64()),
            schema.TIMESTAMP: pa.array(range(1_511_631_000, 1_511_631_000 + n), pa.int64()),
            schema.LABEL: pa.array([i % 2 for i in range(n)], pa.int8()),
            schema.ITEM_HISTORY: pa.array(item_histories, pa.list_(pa.int64())),
            schema.CATEGORY_HISTORY: pa.array([[i % 3 for i in h] for h in item_histories], pa.list_(pa.int64())),
            "shop": pa.array([7] * n, pa.int32()),
        }
    )


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    # item counts in train (targets and histories together): 10 x3, 11 x2, 12 x1, 500 x1
    splits: Dict[str, pa.Table] = {
        "train": _rows([5, 5, 9], [10, 11, 10], [[11, 12], [10], [500]]),
        "val": _rows([5, 8], [10, 99], [[12, 98], [11, 10]]),
        "test": _rows([1], [11], [[]]),
    }
    for split, table in splits.items():
        pq.write_table(table, tmp_path / f"{split}.parquet")
    return Dataset.open(tmp_path)


def test_known_ids_min_count_and_oov(dataset: Dataset) -> None:
    vocabs = Vocabularies.build(dataset, FeaturesConfig(min_count=1, extra_sparse=["shop"]))
    assert vocabs.sizes == {"user": 4, "item": 6, "category": 5, "shop": 3}
    # known ids in ascending order from 2; unknown -> 1; target and history share one vocabulary
    assert vocabs.lookup("item", np.array([10, 11, 12, 500, 99, 0])).tolist() == [2, 3, 4, 5, 1, 1]
    assert vocabs.lookup("user", np.array([5, 9, 8])).tolist() == [2, 3, 1]
    frequent = Vocabularies.build(dataset, FeaturesConfig(min_count=2))
    assert frequent.sizes["item"] == 4  # 10 and 11 only
    assert frequent.lookup("item", np.array([10, 11, 12, 500])).tolist() == [2, 3, 1, 1]


def test_oov_rates(dataset: Dataset) -> None:
    rates = Vocabularies.build(dataset, FeaturesConfig()).oov_rates(dataset)
    assert rates["train"]["item"] == 0.0 and rates["train"]["item_history"] == 0.0
    assert rates["val"]["item"] == pytest.approx(1 / 2)  # 99 unknown
    assert rates["val"]["item_history"] == pytest.approx(1 / 4)  # 98 unknown
    assert rates["val"]["user"] == pytest.approx(1 / 2)
    assert rates["test"]["item_history"] == 0.0  # no history entries at all


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_hashing_is_stable_and_in_range(dataset: Dataset) -> None:
    ids = np.array([0, 1, 10, 12345678901, (1 << 62) + 7], dtype=np.int64)
    assert stable_hash(ids).tolist() == [_splitmix64(int(i)) for i in ids]
    cfg = FeaturesConfig()
    cfg.id_spaces["item"] = IdSpaceConfig(column="item_id", history_column="item_history", hash_buckets=7)
    vocabs = Vocabularies.build(dataset, cfg)
    assert vocabs.sizes["item"] == 9
    raw = np.arange(0, 10_000, 3, dtype=np.int64)
    index = vocabs.lookup("item", raw)
    assert index.min() >= 2 and index.max() <= 8 and len(np.unique(index)) == 7
    assert index.tolist() == [2 + _splitmix64(int(i)) % 7 for i in raw]


def test_reuse_and_rebuild_on_setting_change(dataset: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    first = Vocabularies.load_or_build(dataset, FeaturesConfig())
    saved = dataset.root / VOCAB_DIR / VOCAB_FILE
    assert saved.exists() and (dataset.root / VOCAB_DIR / "item.npy").exists()
    with caplog.at_level("INFO"):
        again = Vocabularies.load_or_build(dataset, FeaturesConfig())
    assert "reusing" in caplog.text
    assert again.fingerprint == first.fingerprint
    changed = Vocabularies.load_or_build(dataset, FeaturesConfig(min_count=2))
    assert changed.sizes["item"] == 4 and changed.fingerprint != first.fingerprint
    assert Vocabularies.load(dataset.root / VOCAB_DIR).fingerprint == changed.fingerprint


def test_a_same_size_rewrite_of_the_train_file_rebuilds_the_cache(dataset: Dataset,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The cache key is the files' content (Parquet footer hash), not only name and size: a rewrite of the same
    size and mtime holding other ids is noticed, and one line says why the vocabularies are rebuilt."""
    def write(items: List[int]) -> None:
        table = _rows([5, 5, 9], items, [[11, 12], [10], [500]])
        pq.write_table(table, path, compression="none", use_dictionary=False)

    path = dataset.root / "train.parquet"
    write([10, 11, 10])
    first = Vocabularies.load_or_build(dataset, FeaturesConfig())
    assert first.spaces["item"].ids.tolist() == [10, 11, 12, 500]
    before = path.stat()
    write([20, 21, 20])  # other ids, same widths: the same bytes count
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    with caplog.at_level("INFO"):
        again = Vocabularies.load_or_build(Dataset.open(dataset.root), FeaturesConfig())
    assert again.spaces["item"].ids.tolist() == [10, 11, 12, 20, 21, 500]
    (line,) = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert "were built from other training files (train.parquet added, removed or rewritten since" in line, line
    assert Vocabularies.load(dataset.root / VOCAB_DIR).fingerprint == again.fingerprint


def test_fingerprint_detects_mismatch(dataset: Dataset, tmp_path: Path) -> None:
    vocabs = Vocabularies.build(dataset, FeaturesConfig())
    other = Vocabularies.build(dataset, FeaturesConfig(min_count=2))
    vocabs.check_fingerprint(vocabs.fingerprint)
    with pytest.raises(VocabMismatchError, match="fingerprint"):
        other.check_fingerprint(vocabs.fingerprint)
    export = tmp_path / "export"
    vocabs.save(export)
    loaded = Vocabularies.load(export)
    assert loaded.fingerprint == vocabs.fingerprint and loaded.sizes == vocabs.sizes
    np.save(export / "item.npy", np.array([10, 11, 13], dtype=np.int64))  # tampered contents
    with pytest.raises(VocabMismatchError):
        Vocabularies.load(export)


def test_missing_or_unreadable_saved_vocabulary_names_the_file(dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(VocabFileError, match=rf"^no vocabularies in {tmp_path / 'none'} \(vocab.json is missing\)$"):
        Vocabularies.load(tmp_path / "none")
    folder = tmp_path / "saved"
    Vocabularies.build(dataset, FeaturesConfig()).save(folder)
    item = folder / "item.npy"
    item.write_bytes(item.read_bytes()[:-5])  # truncated
    with pytest.raises(VocabFileError, match=rf"^{item}: unreadable saved vocabulary \(ValueError: "):
        Vocabularies.load(folder)
    (folder / VOCAB_FILE).write_text('{"settings": ')
    with pytest.raises(VocabFileError, match=rf"^{folder / VOCAB_FILE}: unreadable saved vocabulary"):
        Vocabularies.load(folder)


def test_unreadable_vocabulary_cache_is_rebuilt(dataset: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    first = Vocabularies.load_or_build(dataset, FeaturesConfig())
    item = dataset.root / VOCAB_DIR / "item.npy"
    item.write_bytes(item.read_bytes()[:-5])
    with caplog.at_level("WARNING"):
        again = Vocabularies.load_or_build(dataset, FeaturesConfig())
    assert f"saved vocabularies unusable ({item}: unreadable saved vocabulary" in caplog.text
    assert again.fingerprint == first.fingerprint
    assert Vocabularies.load(dataset.root / VOCAB_DIR).fingerprint == first.fingerprint  # the cache was rewritten


def test_unwritable_dataset_falls_back_to_cache_dir(dataset: Dataset, tmp_path: Path) -> None:
    (dataset.root / VOCAB_DIR).write_text("not a folder")  # DATASET/vocab/ cannot be created
    cache = tmp_path / "cache"
    built = Vocabularies.load_or_build(dataset, FeaturesConfig(), cache_dir=cache)
    (folder,) = list(cache.iterdir())
    assert (folder / VOCAB_FILE).exists()
    assert Vocabularies.load_or_build(dataset, FeaturesConfig(), cache_dir=cache).fingerprint == built.fingerprint
    in_memory = Vocabularies.load_or_build(dataset, FeaturesConfig())  # no cache: kept in memory
    assert in_memory.fingerprint == built.fingerprint


def test_large_ids_use_binary_search(tmp_path: Path) -> None:
    big = 1 << 40
    for split in schema.SPLITS:
        pq.write_table(_rows([big, 3], [big + 5, 4], [[big + 5], [big]]), tmp_path / f"{split}.parquet")
    vocabs = Vocabularies.build(Dataset.open(tmp_path), FeaturesConfig())
    assert vocabs.lookup("item", np.array([4, big, big + 5, big + 6])).tolist() == [2, 3, 4, 1]


def test_vocabularies_are_immutable_and_the_fingerprint_is_computed_once(dataset: Dataset, tmp_path: Path,
                                                                           monkeypatch) -> None:
    vocabs = Vocabularies.build(dataset, FeaturesConfig(min_count=1))
    with pytest.raises(TypeError):
        vocabs.spaces["item"] = vocabs.spaces["user"]  # type: ignore[index]
    with pytest.raises(ValueError):
        vocabs.spaces["item"].ids[0] = 12345  # type: ignore[index]
    loaded_dir = tmp_path / "saved"
    vocabs.save(loaded_dir)
    loaded = Vocabularies.load(loaded_dir)
    with pytest.raises(ValueError):
        loaded.spaces["item"].ids[0] = 12345  # type: ignore[index]

    import mdaf_rec.data.vocab as vocab_module

    fresh = Vocabularies.build(dataset, FeaturesConfig(min_count=1))  # (hashes the training files' footers)
    calls = []
    real = vocab_module.hashlib.sha256
    monkeypatch.setattr(vocab_module.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert [fresh.fingerprint for _ in range(3)] == [vocabs.fingerprint] * 3 and len(calls) == 1
    assert loaded.fingerprint == vocabs.fingerprint and len(calls) == 1  # computed (and checked) at load
    copy = pickle.loads(pickle.dumps(loaded))  # DataLoader workers started with spawn get a pickled copy
    assert copy.fingerprint == vocabs.fingerprint and copy.sizes == vocabs.sizes


@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_out_of_core_counts_equal_the_in_memory_counts(tmp_path: Path, min_count: int) -> None:
    """The DuckDB GROUP BY gives the ids of a plain in-memory count (numpy unique over every file's target and
    history entries): a split of several files, narrow integer types in one, ids below and above 2^24 and 2^40."""
    rng = np.random.default_rng(min_count)
    pools = {"small": np.arange(1, 300), "mid": (1 << 24) + np.arange(300), "big": (1 << 40) + np.arange(300)}

    def ids(n: int) -> np.ndarray:
        return np.concatenate([rng.zipf(1.5, n // 3) % len(p) + p[0] for p in pools.values()])

    (tmp_path / "train").mkdir()
    for part in range(3):
        items, users = ids(600), ids(600)
        histories = [ids(9)[: rng.integers(0, 6)].tolist() for _ in items]
        table = _rows(users.tolist(), items.tolist(), histories)
        if part == 1:  # narrow user ids, as another writer might store them
            table = table.set_column(0, schema.USER_ID, pa.array(users % 30000, pa.int32()))
        pq.write_table(table, tmp_path / "train" / f"part-{part}.parquet", row_group_size=250)
    for split in ("val", "test"):
        pq.write_table(_rows([1], [2], [[3]]), tmp_path / f"{split}.parquet")
    dataset = Dataset.open(tmp_path)
    cfg = FeaturesConfig(min_count=min_count, extra_sparse=["shop"])
    cfg.id_spaces["category"] = IdSpaceConfig(column=schema.CATEGORY_ID, history_column=schema.CATEGORY_HISTORY,
                                              hash_buckets=50)
    built = Vocabularies.build(dataset, cfg)
    tables = [pq.read_table(f) for f in dataset.split_files("train")]
    for name, columns in {"user": [schema.USER_ID], "item": [schema.ITEM_ID, schema.ITEM_HISTORY], "shop": ["shop"]}.items():
        values = [t.column(c).combine_chunks() for t in tables for c in columns]
        flat = np.concatenate([(v.flatten() if pa.types.is_list(v.type) else v).to_numpy().astype(np.int64) for v in values])
        unique, counts = np.unique(flat, return_counts=True)
        expected = unique[counts >= min_count]
        assert built.spaces[name].ids.dtype == np.int64
        np.testing.assert_array_equal(built.spaces[name].ids, expected, err_msg=name)
        assert built.sizes[name] == len(expected) + 2
    assert built.spaces["item"].ids[-1] > 1 << 40 and len(built.spaces["item"].ids) > 100
    assert built.spaces["category"].ids is None and built.sizes["category"] == 52
