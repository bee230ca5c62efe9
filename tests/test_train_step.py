"""The real training step (the recipe's own pipeline, session and loss bookkeeping) under DMP in one process:
no host sync inside a step, and data-parallel tables do train.

Each case runs in a subprocess (a process group per process, as in training).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]

STEP = """
import itertools, json, sys, warnings
from pathlib import Path
import torch
sys.path.insert(0, str(Path(sys.argv[1]) / "tests"))
from device_guards import no_host_sync
from mdaf_rec.config import load_config
from mdaf_rec.distributed import init_distributed
from mdaf_rec.train import RunningSums, open_session, train_steps

config, data, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
cfg = load_config(config, [f"data.path={data}", "features.sequence_dim=16", "features.static_dim=4",
                           "features.max_history=10", "model.head_hidden=[16, 8]", "model.bst.num_heads=2",
                           "train.batch_size=128", "train.threads=1"])
env = init_distributed()
warnings.simplefilter("always")  # every warning is recorded, except those the session's code silences
session = open_session(cfg, out, env)
data_parallel = sorted(name for module_plan in session.plan.plan.values() for name, p in module_plan.items()
                       if p.sharding_type == "data_parallel")
weights = {k: v.detach().clone() for k, v in session.model.state_dict().items()
           if any(f".{name}.weight" in k for name in data_parallel)}
batches = list(itertools.islice(iter(session.loader("train", epoch=0, train=True)), 6))
steps = train_steps(session, iter(batches))
sums = RunningSums(env.device)
with warnings.catch_warnings(record=True) as caught:
    out_ = next(steps)  # fills the pipeline (the first batches' input distribution)
    sums.add(out_.loss, out_.labels.shape[0])
    with no_host_sync() as syncs:
        for _ in range(3):
            out_ = next(steps)
            sums.add(out_.loss, out_.labels.shape[0])
loss, samples, _ = sums.read(False)
changed = {k: float((session.model.state_dict()[k] - v).abs().max()) for k, v in weights.items()}
print(json.dumps({"syncs": syncs, "data_parallel": data_parallel, "changed": changed, "loss": loss,
                  "samples": samples, "warnings": [str(w.message)[:120] for w in caught]}))
"""



def _step(config: str, data: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", STEP, str(REPO), config, str(data), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config", ["configs/mdaf_bst.yaml", "configs/dcnv3.yaml", "configs/mdaf_mamba.yaml"])
def test_a_training_step_makes_no_host_sync_and_data_parallel_tables_train(
    config: str, dataset: Path, tmp_path: Path
) -> None:
    result = _step(config, dataset, tmp_path / "run")
    assert result["syncs"] == [], result["syncs"]
    assert result["samples"] == 4 * 128 and 0.3 < result["loss"] / 4 < 1.5, result
    # The small time tables are data_parallel under the planner (trained by the dense optimizer through
    # FBGEMM's dense kernel): every one of them moved.
    assert {"static_hour", "static_dayofweek"} <= set(result["data_parallel"]), result["data_parallel"]
    assert result["changed"] and all(delta > 1e-6 for delta in result["changed"].values()), result["changed"]
    # ... and FBGEMM's "may lead to silently incorrect behavior" warning for that kernel is silenced at its source.
    assert not [w for w in result["warnings"] if "autograd kernel was not registered" in w], result["warnings"]
