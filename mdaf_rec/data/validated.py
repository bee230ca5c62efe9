"""Validation once per file: a split file passes :func:`~mdaf_rec.data.validate.validate` in one streamed
pass, recorded by its content key, so later runs, the other ranks and the DataLoader workers only cast.

The record is ``validated.json`` in the dataset's derived-data folder (``DATASET/vocab/``, else the
cache folder, see :func:`~mdaf_rec.data.vocab.derived_folders`): a list of keys, one per file and set
of checks, each the sha256 of the file's name, size, mtime, Parquet footer sha256 and the column rules.
A rewritten file gets a new key and is validated again; a record that cannot be read is ignored (the
files are validated again) and one that cannot be written costs only the next run a pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import List, Sequence, Set

from mdaf_rec.data.dataset import READ_BATCH_ROWS, Dataset, atomic_write, file_identity, open_parquet
from mdaf_rec.data.schema import SPLITS
from mdaf_rec.data.validate import ColumnRules, validate

logger = logging.getLogger(__name__)

RECORD_FILE = "validated.json"


def file_key(dataset: Dataset, path: Path, rules: ColumnRules) -> str:
    """Content key of split file ``path`` checked by ``rules`` (no data read: the footer only)."""
    doc = [*file_identity(dataset, path), dataclasses.asdict(rules)]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def validate_once(
    dataset: Dataset, rules: ColumnRules, folders: Sequence[Path], splits: Sequence[str] = SPLITS
) -> None:
    """Validates every file of ``splits`` against ``rules`` unless a record in ``folders`` lists it.

    Files are streamed in record batches (bounded memory); the first problem is a
    :class:`~mdaf_rec.data.validate.DataError` naming file, column and row, as the loader would raise.
    The keys of the files that passed are added to the record in the first writable folder.
    """
    recorded: Set[str] = set()
    for folder in folders:
        recorded |= _read_record(folder / RECORD_FILE)
    keys = {path: file_key(dataset, path, rules) for split in splits for path in dataset.split_files(split)}
    todo = [path for path, key in keys.items() if key not in recorded]
    if not todo:
        logger.info("%s: all %d split files validated before (%s)", dataset.root, len(keys), RECORD_FILE)
        return
    logger.info("validating %d of %d split files of %s", len(todo), len(keys), dataset.root)
    for path in todo:
        offset = 0
        for batch in open_parquet(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=list(rules.columns)):
            validate(batch, rules, str(path), offset)
            offset += batch.num_rows
    record = sorted(recorded | set(keys.values()))
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / RECORD_FILE, lambda fh: fh.write(json.dumps(record, indent=1).encode()))
            return
        except OSError as e:
            logger.info("cannot record the validation in %s (%s)", folder, e)
    logger.warning("validation of %s not recorded (no writable folder): the next run validates again", dataset.root)


def _read_record(path: Path) -> Set[str]:
    try:
        keys: List[str] = json.loads(path.read_text())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as e:
        logger.warning("%s unreadable (%s): validating again", path, e)
        return set()
    return set(keys) if isinstance(keys, list) else set()
