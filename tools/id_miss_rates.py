"""Share of val/test ids without a row of their own: out-of-vocabulary (``vocab``) or on a miss row (``managed``:
never admitted, or evicted by the end of training), per run, split and feature.

Usage::

    python tools/id_miss_rates.py RUN_DIR [RUN_DIR ...] [--data DATA] [--which best]

A vocab run reads its ``vocab/`` (unknown raw id -> the OOV index); a managed run loads its checkpoint into the
unsharded model and maps the ids through :func:`~mdaf_rec.managed_ids.frozen_id_maps` (what serving does). Prints
one JSON object per run: ``{"run", "id_mapping", "rates": {split: {feature: share}}}``; features are the id spaces'
target columns and their histories (every history entry).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mdaf_rec import checkpoint as ckpt
from mdaf_rec.config import load_config
from mdaf_rec.data.dataset import Dataset
from mdaf_rec.data.vocab import Vocabularies
from mdaf_rec.features import OOV_INDEX, TIME_FIELDS
from mdaf_rec.managed_ids import frozen_id_maps
from mdaf_rec.run_dir import RunDir
from mdaf_rec.trainable import build_train_module


def miss_rates(run_dir: Path, data: Optional[str], which: str) -> Dict[str, Dict[str, float]]:
    """``{split: {feature: share of ids without an own row}}`` for the val and test splits."""
    run = RunDir(run_dir).require()
    cfg = load_config(run.config)
    dataset = Dataset.open(data or cfg.data.path)
    spaces = {n: s for n, s in cfg.features.id_spaces.items() if s.column not in TIME_FIELDS}
    if cfg.features.id_mapping == "managed":
        module = build_train_module(cfg, {}, table_device="cpu", dense_device="cpu", compute_device="cpu",
                                    with_sparse_optimizer=False).module
        path = ckpt.checkpoint_path(run_dir, which)
        maps = frozen_id_maps(module, ckpt.load_model_weights(path, module).get("world_size", 1))

        def missed(space: str, ids: np.ndarray) -> np.ndarray:
            id_map = maps[f"managed_{space}"]
            rows = id_map(torch.tensor(ids))
            return torch.isin(rows, id_map.miss_rows).numpy()
    else:
        vocabs = Vocabularies.load(run.vocab)

        def missed(space: str, ids: np.ndarray) -> np.ndarray:
            return vocabs.lookup(space, ids) == OOV_INDEX
    rates: Dict[str, Dict[str, float]] = {}
    for split in ("val", "test"):
        table = pa.concat_tables(pq.read_table(f) for f in dataset.split_files(split))
        rates[split] = {}
        for name, space in spaces.items():
            columns: List[str] = [space.column] + ([space.history_column] if space.history_column else [])
            for column in columns:
                values = table.column(column)
                ids = (pc.list_flatten(values) if column == space.history_column else values).to_numpy()
                rates[split][column] = float(missed(name, np.asarray(ids, dtype=np.int64)).mean()) if len(ids) else 0.0
    return rates


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", help="dataset (default: each run's)")
    p.add_argument("--which", default="best", choices=("best", "last"))
    args = p.parse_args()
    for run in args.runs:
        cfg = load_config(RunDir(run).config)
        print(json.dumps({"run": str(run), "id_mapping": cfg.features.id_mapping,
                          "rates": miss_rates(run, args.data, args.which)}))


if __name__ == "__main__":
    main()
