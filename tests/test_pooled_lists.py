"""``features.pooled_lists``: extra list columns (e.g. the behaviour-log histories of ``mdaf-rec data taobao-ad
--behavior-log``) read by the static branch as mean-pooled fields through an id space's static table.

The data is the shared synthetic set with two hand-made columns added: ``pv_cate_history`` (category ids, 10% of
them never seen in training, lengths 0..12 drawn apart from ``item_history``'s) and ``fav_brand_history`` (ids of
the extra sparse space ``brand``, a ``brand`` column added too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mdaf_rec.config import ConfigError, FeaturesConfig, ModelConfig, load_config
from mdaf_rec.data.dataset import Dataset, DatasetError
from mdaf_rec.data.loader import BatchLoader, WindowColumns
from mdaf_rec.data.validate import DataError, validate
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.features import OOV_INDEX, FeatureSpec
from mdaf_rec.models.embeddings import StaticEmbeddingArch, check_static_features
from mdaf_rec.models.factory import build_model
from test_equivalence import ONE_RANK, TWO_RANKS, WEIGHT_TOL, step, weights
from test_export import REFERENCE, TINY, _predict, assert_numpy_server_scores_as_predict
from test_train import REPO, _env, mdaf

LISTS = {"pv_cate_history": "category", "fav_brand_history": "brand"}
LISTS_SET = "features.pooled_lists={pv_cate_history: category, fav_brand_history: brand}"
UNSEEN = 10**9 + 7  # a category id of no training row: the OOV row


def _list_column(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def add_lists(src: Path, dst: Path, seed: int = 0) -> Path:
    """``src``'s splits with ``brand``, ``pv_cate_history`` and ``fav_brand_history`` added (lengths 0..12, drawn
    independently of ``item_history``)."""
    dst.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        table = pq.read_table(src / f"{split}.parquet")
        n = table.num_rows
        categories = np.unique(table.column("category_id").to_numpy())
        cate_lengths, brand_lengths = rng.integers(0, 13, n), rng.integers(0, 13, n)
        cates = rng.choice(categories, cate_lengths.sum())
        cates[rng.random(len(cates)) < 0.1] = UNSEEN
        table = table.append_column("brand", pa.array(table.column("item_id").to_numpy() % 17, pa.int64()))
        table = table.append_column("pv_cate_history", _list_column(cate_lengths, cates))
        brands = rng.integers(0, 17, brand_lengths.sum())
        table = table.append_column("fav_brand_history", _list_column(brand_lengths, brands))
        pq.write_table(table, dst / f"{split}.parquet", row_group_size=1000)
    shutil.copyfile(src / "meta.json", dst / "meta.json")
    return dst


@pytest.fixture(scope="module")
def lists_data(dataset: Path, tmp_path_factory) -> Path:
    return add_lists(dataset, tmp_path_factory.mktemp("lists") / "data")


def _features(**overrides) -> FeaturesConfig:
    return FeaturesConfig(max_history=6, static_dim=4, extra_sparse=["brand"], pooled_lists=dict(LISTS), **overrides)


def _world(data: Path, **overrides):
    cfg = _features(**overrides)
    opened = Dataset.open(data)
    vocabs = Vocabularies.load_or_build(opened, cfg)
    return FeatureSpec.build(cfg, vocabs.sizes), opened, vocabs


def test_a_pooled_list_is_the_mean_of_its_own_rows(lists_data: Path) -> None:
    spec, opened, vocabs = _world(lists_data)
    assert spec.static_input_keys == ["user", "item", "category", "hour", "dayofweek", "brand",
                                      "pv_cate_history", "fav_brand_history"]
    assert spec.num_static_fields == 8
    tables = {c.name: (c.feature_names, c.pooling.value) for c in spec.embedding_bag_configs()}
    assert tables["static_category"] == (["category", "pv_cate_history"], "MEAN")
    assert tables["static_brand"] == (["brand", "fav_brand_history"], "MEAN")
    batch = next(iter(BatchLoader(opened, "train", spec, vocabs, 256)))
    check_static_features(batch.static_features, spec)
    static = batch.static_features.to_dict()
    # each list keeps its own length (truncated to its most recent max_history ids), not item_history's
    raw = pq.read_table(lists_data / "train.parquet").column("pv_cate_history").to_pylist()
    rows = batch.row_index.tolist()
    expected = [r[-6:] for r in (raw[i] for i in rows)]
    assert static["pv_cate_history"].lengths().tolist() == [len(e) for e in expected]
    assert not torch.equal(static["pv_cate_history"].lengths(), batch.sequence_features["item_history"].lengths())
    ids = vocabs.lookup("category", np.array([x for e in expected for x in e], dtype=np.int64))
    assert torch.equal(static["pv_cate_history"].values(), torch.from_numpy(ids))
    assert (ids == OOV_INDEX).sum() > 0  # unseen ids go to the space's OOV row
    arch = StaticEmbeddingArch(spec, device=torch.device("cpu"))
    fields = arch(batch.static_features, batch.dense_features)  # [B, 8, 4]
    table = arch.embedding_bag_collection.embedding_bags["static_category"].weight
    position = spec.static_input_keys.index("pv_cate_history")
    lengths = static["pv_cate_history"].lengths()
    assert int(lengths.min()) == 0 and int(lengths.max()) == 6
    for row, ids_of_row in enumerate(static["pv_cate_history"].to_dense()):
        mean = table[ids_of_row].mean(0) if len(ids_of_row) else torch.zeros(spec.static_dim)  # empty: zeros
        torch.testing.assert_close(fields[row, position], mean)
    torch.testing.assert_close(fields[:, spec.static_input_keys.index("category")], table[static["category"].values()])


@pytest.mark.parametrize("model", ["dnn", "dcnv3", "mdaf_bst"])
def test_scores_change_with_the_list_and_only_with_it(lists_data: Path, model: str) -> None:
    """Replacing one row's list changes that row's score only; replacing a column no key reads changes nothing."""
    spec, opened, vocabs = _world(lists_data)
    loader = BatchLoader(opened, "train", spec, vocabs, 64)
    torch.manual_seed(0)
    net = build_model(spec, ModelConfig(name=model), table_device=torch.device("cpu")).eval()
    table = pq.read_table(lists_data / "train.parquet").slice(0, 64)

    def scores(t: pa.Table) -> torch.Tensor:  # the loader's own row path, on edited copies of the rows
        checked = validate(t, loader.rules, "edited").select(list(loader.rules.columns))
        rows = WindowColumns(checked, np.arange(64), loader.rules.all_lists).select(np.arange(64), spec.max_history)
        with torch.no_grad():
            return net.score(loader.converter(rows)).logit

    base = scores(table)
    lists = table.column("pv_cate_history").to_pylist()
    lists[5] = [int(table.column("category_id")[7].as_py())] * 3
    changed = scores(table.set_column(table.schema.get_field_index("pv_cate_history"), "pv_cate_history",
                                      pa.array(lists, pa.list_(pa.int64()))))
    differs = (changed - base).abs() > 1e-7
    assert differs.tolist() == [r == 5 for r in range(64)], (changed - base)
    unread = table.set_column(table.schema.get_field_index("click_prob"), "click_prob",
                              pa.array(np.zeros(64), table.schema.field("click_prob").type))
    assert torch.equal(scores(unread), base)


@pytest.mark.parametrize("overrides, message", [
    (["features.pooled_lists={pv_cate_history: catgory}"],
     r"'features.pooled_lists.pv_cate_history': 'catgory' is not an id space with a vocabulary"),
    (["features.pooled_lists={pv_cate_history: hour}"],
     r"'features.pooled_lists.pv_cate_history': 'hour' is not an id space with a vocabulary"),
    (["features.pooled_lists={item_history: item}"],
     r"'features.pooled_lists.item_history': is a column other features keys read"),
    (["features.pooled_lists={pv_cate_history: category}", "features.id_mapping=managed",
      "features.id_spaces.user.rows=64", "features.id_spaces.item.rows=64", "features.id_spaces.category.rows=64"],
     r"'features.pooled_lists': is for features.id_mapping=vocab"),
])
def test_bad_config_is_one_line(overrides, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_missing_list_column_names_the_column_and_the_file(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    cfg = FeaturesConfig(pooled_lists={"pv_cate_history": "category"})
    with pytest.raises(DatasetError, match=r"train.parquet: missing column\(s\) \['pv_cate_history'\]"):
        Vocabularies.load_or_build(Dataset.open(copy), cfg)


@pytest.mark.parametrize("bad, problem", [(-3, "null or negative id in history"), (None, "null or negative id")])
def test_bad_list_data_names_file_row_and_column(lists_data: Path, tmp_path: Path, bad, problem: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(lists_data, data)
    table = pq.read_table(data / "val.parquet")
    lists = table.column("pv_cate_history").to_pylist()
    lists[123] = [4, bad]
    table = table.set_column(table.schema.get_field_index("pv_cate_history"), "pv_cate_history",
                             pa.array(lists, pa.list_(pa.int64())))
    pq.write_table(table, data / "val.parquet")
    spec, opened, vocabs = _world(data)
    with pytest.raises(DataError, match=rf"val.parquet: column 'pv_cate_history', row 123: {problem}"):
        list(BatchLoader(opened, "val", spec, vocabs, 64))


# -- training, checkpoints, 2 ranks, export ---------------------------------------------------------------


def _train(data: Path, out: Path, config: str, *extra: str) -> None:
    sets = [item for s in TINY + ["features.extra_sparse=[brand]", LISTS_SET] for item in ("--set", s)]
    mdaf("train", "--config", config, "--data", str(data), "--out", str(out), *extra, *sets)


def test_a_model_with_pooled_lists_exports_and_serves_with_parity(lists_data: Path, tmp_path: Path) -> None:
    run, reference_file, model_dir = tmp_path / "dnn", tmp_path / "dnn.pt", tmp_path / "export"
    _train(lists_data, run, "configs/dnn.yaml", "--epochs", "1")
    subprocess.run([sys.executable, "-c", REFERENCE, str(run), str(reference_file)],
                   cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    test = lists_data / "test.parquet"
    assert mdaf("export", "--run", str(run), "--out", str(model_dir), "--no-compile").returncode == 0
    spec = json.loads((model_dir / "feature_spec.json").read_text())
    assert [(e["column"], e["space"]) for e in spec["pooled_lists"]] == list(LISTS.items())
    assert spec["lookups"]["list_rows"] == {"index": "list_ids", "tables": ["static_category", "static_brand"],
                                            "dim": 4, "columns": []}
    ref = torch.load(reference_file)
    reference = ref["scores"].numpy()[np.argsort(ref["row_index"].numpy())]
    scored = _predict(model_dir, test, tmp_path / "scored.parquet").column("probability").to_numpy()
    assert np.abs(scored - reference).max() <= 1e-5
    assert_numpy_server_scores_as_predict(model_dir, pq.read_table(test).slice(0, 41), tmp_path)


def test_two_ranks_equal_one_with_pooled_lists(lists_data: Path, tmp_path: Path) -> None:
    """The 1-vs-2-rank harness of test_equivalence.py on DCNv3 (MDAF's static branch) with both lists: the tables
    they read (category table-column-wise, brand column-wise over 2 ranks) and every other weight end the step
    equal."""
    sets = ["--set", "features.extra_sparse=[brand]", "--set", LISTS_SET]
    one_plan = {**{k: v for k, v in ONE_RANK.items() if k.startswith("static_")}, "static_brand": "table_wise"}
    two_plan = {**{k: v for k, v in TWO_RANKS.items() if k.startswith("static_")}, "static_brand": "column_wise"}
    step(lists_data, tmp_path / "one", one_plan, *sets, config="configs/dcnv3.yaml")
    step(lists_data, tmp_path / "two", two_plan, "--init", str(tmp_path / "one" / "checkpoints" / "step_0"), *sets,
         nproc=2, config="configs/dcnv3.yaml")
    init = weights(tmp_path / "one" / "checkpoints" / "step_0")
    one = weights(tmp_path / "one" / "checkpoints" / "after")
    two = weights(tmp_path / "two" / "checkpoints" / "after")
    assert set(one) == set(two)
    brand = [k for k in one if "static_brand" in k]
    assert brand and all(float((one[k] - init[k]).abs().max()) > 1e-4 for k in brand)
    bad = {k: float((one[k] - two[k]).abs().max()) for k in one if float((one[k] - two[k]).abs().max()) > WEIGHT_TOL}
    assert not bad, bad
