"""``mdaf-rec export``: a trained run → a self-contained serving folder; the work is :mod:`mdaf_rec.export`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from mdaf_rec import export
from mdaf_rec.artifact import MANIFEST_FILE
from mdaf_rec.errors import UserError
from mdaf_rec.logs import setup_logging
from mdaf_rec.output import writing_to
from mdaf_rec.tables import TABLE_DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdaf-rec export", description=export.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory written by `mdaf-rec train`")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    p.add_argument("--out", type=Path, required=True,
                   help="MODEL_DIR to write (an earlier export's files there are replaced; other files are kept)")
    p.add_argument("--table-dtype", choices=TABLE_DTYPES, default=None,
                   help="the table files: fp32 (default), fp16, or int8 (row-wise 8-bit, FBGEMM's fused layout)")
    p.add_argument("--quantize", choices=export.QUANTIZATIONS, default=None,
                   help="the earlier spelling of --table-dtype: none = fp32, int8 = int8")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the AOTInductor CPU program (model.cpu.pt2): the portable program only, ~10-20 s faster")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``mdaf-rec export``."""
    args = _parser().parse_args(argv)
    implied = {"none": "fp32", "int8": "int8"}.get(args.quantize)
    if implied is not None and args.table_dtype not in (None, implied):
        print(f"mdaf-rec export: error: --quantize {args.quantize} contradicts --table-dtype {args.table_dtype}; "
              "give one of them", file=sys.stderr)
        return 2
    table_dtype = args.table_dtype or implied or "fp32"
    setup_logging()
    try:
        with writing_to(args.out):
            digest = export.export_run(args.run, args.out, args.checkpoint, table_dtype, compile=args.compile)
    except (UserError, FileNotFoundError) as e:
        print(f"mdaf-rec export: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out / MANIFEST_FILE} sha256: {digest}")
    print(f"check before loading: mdaf-rec predict --model {args.out} --manifest-sha256 {digest} ...")
    return 0
