"""The canonical dataset schema: one Parquet row per impression.

Documented for users in ``docs/data.md``. A dataset is a folder with ``train``, ``val`` and ``test``
splits (each a ``.parquet`` file or a folder of them) and an optional ``meta.json``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pyarrow as pa

USER_ID = "user_id"
ITEM_ID = "item_id"
CATEGORY_ID = "category_id"
TIMESTAMP = "timestamp"
LABEL = "label"
ITEM_HISTORY = "item_history"
CATEGORY_HISTORY = "category_history"
# Written by the synthetic generator only: the true click probability of the row.
CLICK_PROB = "click_prob"

SPLITS: Tuple[str, ...] = ("train", "val", "test")
META_FILE = "meta.json"

# Required columns and their Arrow types. ``label`` accepts any integer type holding 0/1.
REQUIRED_COLUMNS: Dict[str, pa.DataType] = {
    USER_ID: pa.int64(),
    ITEM_ID: pa.int64(),
    CATEGORY_ID: pa.int64(),
    TIMESTAMP: pa.int64(),
    LABEL: pa.int8(),
    ITEM_HISTORY: pa.list_(pa.int64()),
    CATEGORY_HISTORY: pa.list_(pa.int64()),
}
