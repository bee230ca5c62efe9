"""Validation once per file: recorded by content key, not repeated, repeated for a rewritten file; loaders of
validated files only cast."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdaf_rec.data import schema, validated
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.validate import ColumnRules, DataError
from mdaf_rec.data.validated import RECORD_FILE, validate_once

from test_loader import T0, _tiny


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    for split in schema.SPLITS:
        pq.write_table(_tiny([T0 + i for i in range(12)]), tmp_path / f"{split}.parquet", row_group_size=5)
    return Dataset.open(tmp_path)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The files validate() is called on, in order (the real validate still runs)."""
    seen: List[str] = []
    real = validated.validate

    def counting(data, rules, source, *args, **kwargs):
        seen.append(Path(source).name)
        return real(data, rules, source, *args, **kwargs)

    monkeypatch.setattr(validated, "validate", counting)
    return seen


def test_each_file_is_validated_once(dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = [tmp_path / "vocab"]
    seen = _count_reads(monkeypatch)
    validate_once(dataset, ColumnRules.build(), folders)
    assert sorted(set(seen)) == ["test.parquet", "train.parquet", "val.parquet"] and len(seen) == 3
    assert (tmp_path / "vocab" / RECORD_FILE).exists()
    seen.clear()
    validate_once(Dataset.open(dataset.root), ColumnRules.build(), folders)  # another rank, run or worker
    assert seen == []
    validate_once(dataset, ColumnRules.build(dense=[schema.ITEM_ID]), folders)  # other checks: validated again
    assert len(seen) == 3


def test_a_rewritten_file_is_validated_again(dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = [tmp_path / "vocab"]
    validate_once(dataset, ColumnRules.build(), folders)
    bad = _tiny([T0 + i for i in range(12)])
    bad = bad.set_column(0, schema.USER_ID, pa.array([-1 if i == 7 else i for i in range(12)], pa.int64()))
    pq.write_table(bad, dataset.root / "val.parquet", row_group_size=5)
    seen = _count_reads(monkeypatch)
    with pytest.raises(DataError, match=r"val.parquet: column 'user_id', row 7: negative id"):
        validate_once(Dataset.open(dataset.root), ColumnRules.build(), folders)
    assert set(seen) == {"val.parquet"}


def test_unwritable_record_folder_falls_back(dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "blocked").write_text("not a folder")
    folders = [tmp_path / "blocked", tmp_path / "cache"]
    validate_once(dataset, ColumnRules.build(), folders)
    assert (tmp_path / "cache" / RECORD_FILE).exists()
    seen = _count_reads(monkeypatch)
    validate_once(dataset, ColumnRules.build(), folders)
    assert seen == []
