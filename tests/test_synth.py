"""The synthetic generator: determinism, meta statistics, schema invariants, and that both parts matter."""

from __future__ import annotations

import argparse
from itertools import product
from pathlib import Path
from typing import Any, Dict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdaf_rec.data import schema, synth
from mdaf_rec.metrics import auc_score, logloss_score

SMALL: Dict[str, Any] = dict(rows=12_000, users=400, items=3_000, categories=60, row_group_size=4_000)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    meta = synth.generate(out, seed=3, write_parts=True, **SMALL)
    table = pa.concat_tables([pq.read_table(out / f"{s}.parquet") for s in schema.SPLITS])
    return out, meta, table


def test_same_seed_same_output(tmp_path: Path, generated) -> None:
    out, meta, _ = generated
    again = synth.generate(tmp_path / "again", seed=3, write_parts=True, **SMALL)
    assert again == meta
    for split in schema.SPLITS:
        assert pq.read_table(tmp_path / "again" / f"{split}.parquet").equals(pq.read_table(out / f"{split}.parquet"))
    other = synth.generate(tmp_path / "other", seed=4, **SMALL)
    assert other["splits"]["train"] != meta["splits"]["train"]


def test_meta_statistics_match_recomputation(generated) -> None:
    out, meta, _ = generated
    assert meta["format"] == "synth" and meta["timezone"] == "Asia/Shanghai" and "by local date" in meta["split"]
    assert meta["options"]["seed"] == 3 and meta["rows"] == SMALL["rows"]
    for split in schema.SPLITS:
        t = pq.read_table(out / f"{split}.parquet")
        labels = t.column(schema.LABEL).to_numpy()
        prob = t.column(schema.CLICK_PROB).to_numpy()
        stats = meta["splits"][split]
        assert stats["rows"] == t.num_rows > 0
        assert stats["ctr"] == pytest.approx(labels.mean())
        assert stats["bayes_auc"] == pytest.approx(auc_score(prob, labels), abs=1e-6)
        assert stats["bayes_logloss"] == pytest.approx(logloss_score(prob, labels), abs=1e-6)
        assert stats["static_only_auc"] == pytest.approx(auc_score(t.column(synth.STATIC_LOGIT).to_numpy(), labels), abs=1e-3)
    assert 0.2 < meta["splits"]["train"]["ctr"] < 0.4


def test_static_and_sequential_parts_both_matter(generated) -> None:
    _, _, table = generated
    labels = table.column(schema.LABEL).to_numpy()
    full = auc_score(table.column(schema.CLICK_PROB).to_numpy(), labels)
    static = auc_score(table.column(synth.STATIC_LOGIT).to_numpy(), labels)
    sequence = auc_score(table.column(synth.SEQUENCE_LOGIT).to_numpy(), labels)
    assert 0.72 < full < 0.9
    assert full > static + 0.03 and full > sequence + 0.03
    assert static > 0.6 and sequence > 0.6


def test_histories_are_consistent_event_streams(generated) -> None:
    _, _, table = generated
    t = table.sort_by([(schema.USER_ID, "ascending"), (schema.TIMESTAMP, "ascending")])
    users = t.column(schema.USER_ID).to_numpy()
    ts = t.column(schema.TIMESTAMP).to_numpy()
    items = t.column(schema.ITEM_ID).to_numpy()
    item_hist = t.column(schema.ITEM_HISTORY).to_pylist()
    cat_hist = t.column(schema.CATEGORY_HISTORY).to_pylist()
    category_of = dict(zip(items, t.column(schema.CATEGORY_ID).to_numpy()))
    same_user = users[1:] == users[:-1]
    assert (ts[1:][same_user] > ts[:-1][same_user]).all()  # strictly increasing within a user
    for i, (ih, ch) in enumerate(zip(item_hist, cat_hist)):
        assert len(ih) == len(ch) <= 50
        assert all(category_of.get(item, c) == c for item, c in zip(ih, ch))
        if i and same_user[i - 1]:
            # the previous event of this user is the most recent (last) history entry
            prev = item_hist[i - 1]
            kept = len(ih) - 1
            assert ih[-1] == items[i - 1]
            assert kept == min(len(prev), 49) and ih[:-1] == prev[len(prev) - kept :]


def test_splits_are_ordered_in_time(generated) -> None:
    out, _, _ = generated
    bounds = [pq.read_table(out / f"{s}.parquet").column(schema.TIMESTAMP).to_numpy() for s in schema.SPLITS]
    for earlier, later in product(range(3), range(3)):
        if earlier < later:
            assert bounds[earlier].max() < bounds[later].min()


def test_cli_arguments(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--rows", "3000", "--users", "100", "--items", "500",
                              "--categories", "20", "--seed", "1"])
    meta = synth.run(args)
    assert sum(s["rows"] for s in meta["splits"].values()) == 3000
    assert (tmp_path / "meta.json").exists()
    assert synth.STATIC_LOGIT not in pq.read_schema(tmp_path / "train.parquet").names
