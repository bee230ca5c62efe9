"""Times one forward + backward of each dense branch of MDAF (DCNv3, Mamba4Rec encoder, BST encoder).

Run by ``tools/gpu_check.sh`` on a CUDA machine with only torch installed: it imports torch and the
dense modules, nothing else (no TorchRec, no numpy, no yaml). Shapes are MDAF's defaults: batch 2048,
history 50 (51 tokens with the target), width 128, 5 static fields of width 16 for DCNv3 (output 128).
Each branch runs in float32 (TF32 off) and under ``torch.autocast(bfloat16)``; the figure is the median
over ``--repeats`` timed steps after ``--warmup`` untimed ones, with ``torch.cuda.synchronize()``
around each step. Writes a markdown table (and the same rows as JSON next to it).

Usage::

    python tools/bench_gpu_branches.py --out gpu_check/timings.md
    python tools/bench_gpu_branches.py --tiny --out /tmp/t.md     # toy sizes, any device (script check)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mdaf_rec.models.bst import BSTEncoder  # noqa: E402
from mdaf_rec.models.dcnv3 import DCNv3  # noqa: E402
from mdaf_rec.models.mamba import Mamba4RecEncoder  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def _branches(
    batch: int, history: int, dim: int, fields: int, field_dim: int, device: torch.device
) -> Dict[str, Tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]]:
    """name -> (module, step computing a scalar from fresh inputs)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = (0.5 * torch.randn(batch, history + 1, dim, generator=g)).to(device).requires_grad_()
    lengths = torch.randint(1, history + 2, (batch,), generator=g).to(device)
    field_embeddings = (0.1 * torch.randn(batch, fields, field_dim, generator=g)).to(device).requires_grad_()
    with torch.device(device):
        dcnv3 = DCNv3(num_fields=fields, field_dim=field_dim, output_dim=dim)
        mamba = Mamba4RecEncoder(d_model=dim, num_layers=2, dropout=0.2)
        bst = BSTEncoder(d_model=dim, num_layers=2, num_heads=4, dropout=0.1, max_len=history + 1)

    def dcnv3_step(m: nn.Module) -> torch.Tensor:
        out = m(field_embeddings, return_embedding=True)
        return out.logit.float().sum() + out.embedding.float().sum()

    return {
        "DCNv3 (LCN+ECN, embedding)": (dcnv3, dcnv3_step),
        "Mamba4Rec encoder (2 layers)": (mamba, lambda m: m(tokens, lengths).float().sum()),
        "BST encoder (2 layers, 4 heads)": (bst, lambda m: m(tokens, lengths).float().sum()),
    }


def _time(module: nn.Module, step: Callable[[nn.Module], torch.Tensor], precision: str, device: torch.device,
          warmup: int, repeats: int) -> float:
    """Median milliseconds of one forward + backward."""
    module.train()
    times: List[float] = []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = step(module)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write (JSON next to it)")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--fields", type=int, default=5, help="static fields of DCNv3")
    parser.add_argument("--field-dim", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes to check the script (batch 8, history 5, dim 16)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.history, args.dim, args.warmup, args.repeats = 8, 5, 16, 1, 2
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    rows = []
    for branch, (module, step) in _branches(args.batch, args.history, args.dim, args.fields, args.field_dim,
                                            device).items():
        for precision in PRECISIONS:
            ms = _time(module, step, precision, device, args.warmup, args.repeats)
            rows.append({"branch": branch, "precision": precision, "ms": round(ms, 3),
                         "samples_per_s": round(args.batch / (ms / 1000.0))})
            print(f"{branch:34s} {precision}  {ms:9.3f} ms  {args.batch / (ms / 1000.0):12,.0f} samples/s", flush=True)
    header = (f"One forward + backward per branch on {name}, torch {torch.__version__} (CUDA {torch.version.cuda}); "
              f"batch {args.batch}, history {args.history} (+ target), width {args.dim}, DCNv3 {args.fields} fields x "
              f"{args.field_dim}; median of {args.repeats} steps after {args.warmup} warm-up; fp32 without TF32, "
              "bf16 = torch.autocast(bfloat16).")
    lines = [header, "", "| branch | precision | ms / step | samples/s |", "|---|---|---:|---:|"]
    lines += [f"| {r['branch']} | {r['precision']} | {r['ms']:.3f} | {r['samples_per_s']:,} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"device": name, "args": vars(args) | {"out": str(args.out)},
                                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
