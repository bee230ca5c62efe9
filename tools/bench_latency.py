"""Serving latency on CPU: eager (unsharded model) vs exported (``torch.export``) vs compiled (AOTInductor).

For MDAF-Mamba and MDAF-BST at the dims of ``configs/demo.yaml`` (vocabularies of the synthetic
generator's default size, random weights: latency does not depend on their values), one torch
thread, batch sizes 1, 64 and 512, times one forward pass of

* **eager**: the unsharded model on a TorchRec ``Batch`` (KJTs built beforehand, not timed);
* **exported**: ``mdaf-rec export``'s portable program (``model.pt2``: ``ServingModule`` through
  ``torch.export``) on plain tensors;
* **compiled**: ``mdaf-rec export``'s CPU program (``model.cpu.pt2``, what ``mdaf-rec predict`` runs on the
  CPU it was exported on): exported with the compiled operators of ``mdaf_rec.ops`` kept as nodes and
  compiled by AOTInductor (:func:`mdaf_rec.serving.export_cpu_program`; loads with torch alone after
  ``torch.ops.load_library`` of the operators' library);

The exported programs take the table rows as inputs (``mdaf_rec.serving``); here they are looked up in the eager
model's tables before the clock starts, like the KJTs of eager. Looking rows up in an export's memory-mapped
table files (fp32, fp16, int8) is timed by ``tools/bench_export.py``.

Reports p50 / p99 over ``--seconds`` of repetitions per cell (at least ``--min-iters``), checks the
exported scores against eager, and (unless ``--no-write``) rewrites the
``## Serving latency (tools/bench_latency.py)`` section of ``docs/benchmarks.md``.

Usage::

    python tools/bench_latency.py                  # both models, batch 1 / 64 / 512
    python tools/bench_latency.py --no-write --seconds 1
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from benchdoc import machine, write_section  # noqa: E402
from mdaf_rec.config import load_config  # noqa: E402
from mdaf_rec.data.batch import Batch, build_batch  # noqa: E402
from mdaf_rec.data.synth import SynthParams  # noqa: E402
from mdaf_rec.features import NUM_RESERVED_INDICES, FeatureSpec  # noqa: E402
from mdaf_rec.models.ctr import CTRModel  # noqa: E402
from mdaf_rec.models.factory import build_model  # noqa: E402
from mdaf_rec.serving import INPUT_NAMES, ServingModule, export_cpu_program, export_program  # noqa: E402

SECTION = "## Serving latency (tools/bench_latency.py)"
MODELS = ("mdaf_mamba", "mdaf_bst")
Inputs = Tuple[torch.Tensor, ...]


def random_inputs(spec: FeatureSpec, batch_size: int, seed: int) -> Tuple[Inputs, Batch]:
    """Serving inputs of ``batch_size`` random rows and the same rows as a loader ``Batch``.

    History lengths are uniform in ``0..max_history``; ids uniform over each table's known rows.
    """
    g = torch.Generator().manual_seed(seed)
    n_hist = spec.max_history

    def ids(rows: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.randint(NUM_RESERVED_INDICES, rows, tuple(shape), generator=g)

    static = torch.stack([ids(f.num_embeddings, [batch_size]) for f in spec.static_fields], dim=1)
    targets = torch.stack([ids(s.num_embeddings, [batch_size]) for s in spec.sequence_spaces], dim=1)
    lengths = torch.randint(0, n_hist + 1, (batch_size,), generator=g)
    valid = torch.arange(n_hist)[None, :] < lengths[:, None]  # [B, L]
    history = torch.stack([ids(s.num_embeddings, [batch_size, n_hist]) * valid for s in spec.sequence_spaces], dim=1)
    dense = torch.rand(batch_size, len(spec.dense_features), generator=g)
    batch = build_batch(
        spec,
        static_ids=list(static.t()),
        target_ids=list(targets.t()),
        history_ids=[history[:, s][valid] for s in range(len(spec.sequence_spaces))],
        history_lengths=lengths,
        dense_features=dense,
        labels=torch.zeros(batch_size),
        row_index=torch.arange(batch_size),
        user_ids=torch.zeros(batch_size, dtype=torch.int64),
    )
    lists = torch.zeros(batch_size, len(spec.pooled_lists), n_hist, dtype=torch.int64)  # the benched models have none
    return (static, dense, targets, history, lists), batch


def program_inputs(ids: Inputs, module: ServingModule, tables: Dict[str, torch.Tensor]) -> Inputs:
    """The serving program's inputs: the index inputs and the rows of ``tables`` they select (``module.lookups``)."""
    named = dict(zip(INPUT_NAMES, ids))
    for name, lookup in module.lookups.items():
        index = named[lookup.index]
        named[name] = (torch.stack([tables[t][index[:, j]] for j, t in enumerate(lookup.tables)], dim=1)
                       if lookup.tables else torch.zeros(index.shape[0], 0, *index.shape[2:], lookup.dim))
    return tuple(named[name] for name in INPUT_NAMES)


def percentiles(fn: Callable[[], object], seconds: float, min_iters: int) -> Tuple[float, float, int]:
    """(p50 ms, p99 ms, repetitions) of ``fn()`` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times: List[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), len(times)


def bench_model(name: str, config: Path, batches: Sequence[int], seconds: float, min_iters: int) -> List[Dict]:
    """Latency rows of one model: one per (batch size, variant)."""
    cfg = load_config(config, [f"model.name={name}"])
    synth = SynthParams()
    sizes = {"user": synth.users, "item": synth.items, "category": synth.categories}
    spec = FeatureSpec.build(cfg.features, {k: v + NUM_RESERVED_INDICES for k, v in sizes.items()})
    torch.manual_seed(0)
    eager: CTRModel = build_model(spec, cfg.model).eval()
    module = ServingModule(copy.deepcopy(eager), spec)
    fp32 = export_program(module).module()
    tables = {name: t.weight.detach() for m in eager.modules() for attr in ("embedding_bags", "embeddings")
              if isinstance(getattr(m, attr, None), torch.nn.ModuleDict) for name, t in getattr(m, attr).items()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the loader extracts the package to its own folder
        export_cpu_program(ServingModule(copy.deepcopy(eager), spec), Path(tmp) / "model.cpu.pt2")
        aoti = torch._inductor.aoti_load_package(str(Path(tmp) / "model.cpu.pt2"))
    print(f"{name}: export + AOTInductor compile {time.perf_counter() - start:.0f} s", flush=True)
    rows: List[Dict] = []
    with torch.no_grad():
        for b in batches:
            ids, batch = random_inputs(spec, b, seed=b)
            inputs = program_inputs(ids, module, tables)
            reference = eager(batch)
            for variant, fn in (("eager", lambda: eager(batch)), ("exported", lambda: fp32(*inputs)),
                                ("aoti", lambda: aoti(*inputs))):
                diff = float((fn() if variant == "eager" else fn()[0]).sub(reference).abs().max())
                p50, p99, n = percentiles(fn, seconds, min_iters)
                rows.append({"model": name, "batch": b, "variant": variant, "p50": p50, "p99": p99, "n": n, "diff": diff})
                print(f"{name:11s} batch {b:4d} {variant:8s} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  "
                      f"({n} runs, max |Δp| vs eager {diff:.1e})", flush=True)
    return rows


def markdown(rows: List[Dict], config: Path, seconds: float) -> str:
    """The benchmarks.md section body."""
    lines = [
        f"`python tools/bench_latency.py` — {machine()}; load average {os.getloadavg()[0]:.1f} at the end "
        f"(the machine is shared). Dims of `{config.relative_to(REPO)}` (synthetic-default vocabularies, random "
        f"weights), one forward pass, p50 / p99 in ms over ≥ {seconds:g} s of repetitions per cell.",
        "",
        "| model | batch | eager p50 | eager p99 | exported p50 | exported p99 | compiled p50 | compiled p99 "
        "| max abs Δp compiled vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = {(r["model"], r["batch"], r["variant"]): r for r in rows}
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        e, x, a = (cells[(model, batch, v)] for v in ("eager", "exported", "aoti"))
        lines.append(
            f"| {model} | {batch} | {e['p50']:.2f} | {e['p99']:.2f} | {x['p50']:.2f} | {x['p99']:.2f} | "
            f"{a['p50']:.2f} | {a['p99']:.2f} | {a['diff']:.1e} |"
        )
    lines += [
        "",
        'eager = the unsharded training model on KJTs (its Mamba branch runs the compiled CPU kernels of '
        '`mdaf_rec.ops`: scan, causal conv + SiLU); exported = `model.pt2` of `mdaf-rec export`, the portable '
        'program (`torch.export`, run through `ExportedProgram.module()`, i.e. op by op in Python; its Mamba '
        'scan is the traced form `mdaf_rec.ops.scan_export`, five aten ops per time step, and the conv is '
        '`F.conv1d`, so it runs on any CPU or GPU); compiled = `model.cpu.pt2` of `mdaf-rec export`, what '
        '`mdaf-rec predict` runs on the CPU it was exported on: the program exported with the compiled '
        'operators kept as nodes (`mdaf_rec::selective_scan_fwd`, `mdaf_rec::causal_conv1d_silu_fwd`) and '
        'compiled by AOTInductor (`mdaf_rec.serving.export_cpu_program`; export + compile time printed by the '
        'tool), which fuses the rest of the graph into C++ loops with no Python per op; it loads with torch '
        'alone (`torch.ops.load_library` of the export\'s `ops/mdaf_rec_ops.so`, then '
        '`torch._inductor.aoti_load_package`). Input preparation (vocabulary lookups, KJTs, the table rows the '
        'programs take as inputs) is not timed; table look-ups in fp32 / fp16 / int8 files: '
        '`tools/bench_export.py`.',
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        batch_sizes = [b for (m, b, v) in cells if m == model and v == "eager"]
        ratio = {v: " / ".join(f"{cells[(model, b, v)]['p50'] / cells[(model, b, 'eager')]['p50']:.2f}"
                              for b in batch_sizes) for v in ("exported", "aoti")}
        lines += ["", f"{model} p50 / eager p50 at batch {' / '.join(map(str, batch_sizes))}: exported "
                      f"{ratio['exported']}, compiled {ratio['aoti']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 512])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per cell (default 2)")
    parser.add_argument("--min-iters", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = args.config.resolve()
    rows = [r for m in args.models for r in bench_model(m, config, args.batches, args.seconds, args.min_iters)]
    body = markdown(rows, config, args.seconds)
    print(body)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", SECTION, body)


if __name__ == "__main__":
    main()
