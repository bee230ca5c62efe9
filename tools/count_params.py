"""Parameter counts of every model at the research code's Taobao vocabulary sizes.

Builds each model on the ``meta`` device (no memory is allocated) and prints a markdown table of table
(embedding) and dense parameters. Usage: ``python tools/count_params.py [--config configs/mdaf_mamba.yaml]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional

from mdaf_rec.config import MODEL_NAMES, load_config
from mdaf_rec.features import FeatureSpec
from mdaf_rec.models.factory import build_model
from mdaf_rec.sharding import table_parameters

# Vocabulary sizes of the research code's Taobao set-up.
TAOBAO_VOCAB = {"item": 335_164, "category": 5_480, "user": 577_482}


def count(name: str, config: Optional[Path]) -> Dict[str, int]:
    cfg = load_config(config, overrides=[f"model.name={name}"])
    spec = FeatureSpec.build(cfg.features, TAOBAO_VOCAB)
    model = build_model(spec, cfg.model, table_device="meta", dense_device="meta")
    tables = {id(p) for p in table_parameters(model)}
    static = sum(p.numel() for n, p in model.named_parameters() if id(p) in tables and ".static_" in n)
    sequence = sum(p.numel() for n, p in model.named_parameters() if id(p) in tables and ".sequence_" in n)
    dense = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    return {"static tables": static, "sequence tables": sequence, "dense": dense, "total": static + sequence + dense}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="config whose features/model settings to use")
    args = parser.parse_args()
    print(f"vocabularies: {TAOBAO_VOCAB}\n")
    print("| model | static tables (EBC) | sequence tables (EC) | dense | total |")
    print("|---|---:|---:|---:|---:|")
    for name in MODEL_NAMES:
        c = count(name, args.config)
        print(f"| {name} | {c['static tables']:,} | {c['sequence tables']:,} | {c['dense']:,} | {c['total']:,} |")


if __name__ == "__main__":
    main()
