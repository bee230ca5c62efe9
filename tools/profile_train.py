"""Where a training step's time goes: ``mdaf-rec train`` with ``torch.profiler`` around its steps.

Runs ``mdaf-rec train ARGS...`` in this process; the steps after the first ``--skip`` (warm-up: planning, the
first batches, TorchRec's lazy buffers) are profiled until the epoch loop ends, then the top operators by self
CPU time and by total CPU time are printed, with the profiled steps and the CPU time per step. Cap the run with
``--epochs 1 --set train.max_steps_per_epoch=N``.

``python tools/profile_train.py --skip 10 -- --config configs/dnn.yaml --data data/ub --out /tmp/prof --epochs 1
--set train.max_steps_per_epoch=40 --set train.threads=1``
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator

import torch

import mdaf_rec.train as train_module
from mdaf_rec.cli import main as cli_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", type=int, default=10, help="steps run before profiling starts")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of mdaf-rec train")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    steps = train_module.train_steps
    profiled = []

    def profiled_steps(session: train_module.Session, batches: Iterator) -> Iterator:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        done = 0  # steps whose output was yielded
        if args.skip == 0:
            prof.__enter__()
        for out in steps(session, batches):
            yield out
            done += 1
            if done == args.skip:
                prof.__enter__()  # from the next step on
        if done >= args.skip:
            prof.__exit__(None, None, None)
        if done > args.skip:
            profiled.append((done - args.skip, prof))

    train_module.train_steps = profiled_steps
    code = cli_main(["train", *train_args])
    for count, prof in profiled:
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"\n{count} profiled steps, {total / count:.1f} ms of CPU time per step")
        for key in ("self_cpu_time_total", "cpu_time_total"):
            print(events.table(sort_by=key, row_limit=args.rows))
    sys.exit(code)


if __name__ == "__main__":
    main()
