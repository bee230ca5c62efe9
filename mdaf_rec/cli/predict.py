"""``mdaf-rec predict``: batch scoring with an exported MODEL_DIR; the work is :mod:`mdaf_rec.predict`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from mdaf_rec import predict
from mdaf_rec.errors import UserError
from mdaf_rec.logs import setup_logging
from mdaf_rec.output import writing_to


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdaf-rec predict", description=predict.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="MODEL_DIR written by `mdaf-rec export`")
    p.add_argument("--manifest-sha256", metavar="HEX",
                   help="refuse MODEL_DIR unless its manifest.json has this sha256 (printed by `mdaf-rec export`); "
                   "give it for a folder from anywhere you do not control: loading runs pickle")
    p.add_argument("--data", type=Path, required=True, help="a Parquet file or a folder of Parquet files")
    p.add_argument("--out", type=Path, required=True, help="output Parquet file")
    p.add_argument("--key", dest="keys", action="append", default=[], metavar="COLUMN",
                   help="input column copied to the output to join scores back (repeatable)")
    p.add_argument("--with-gate", action="store_true", help="also write the MDAF fusion gate")
    p.add_argument("--batch-size", type=int, default=8192, help="rows per program call (default 8192)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``mdaf-rec predict``."""
    args = _parser().parse_args(argv)
    setup_logging()
    if args.batch_size < 1:
        print("mdaf-rec predict: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("mdaf-rec predict: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        with writing_to(args.out):
            predict.predict(args.model, args.data, args.out, args.keys, args.with_gate, args.batch_size,
                            args.manifest_sha256)
    except (UserError, FileNotFoundError) as e:
        print(f"mdaf-rec predict: error: {e}", file=sys.stderr)
        return 2
    return 0
