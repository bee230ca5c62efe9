#!/usr/bin/env bash
# GPU set-up: a CUDA build of torch, the matching CUDA fbgemm-gpu, torchrec, and mamba-ssm's kernels.
#
#   bash tools/setup_gpu.sh [VENV_DIR]            (default .venv-gpu)
#   CUDA_VARIANT=cu126 bash tools/setup_gpu.sh    (default cu128; must match the machine's driver)
#
# Versions move together: torch 2.13.0 <-> fbgemm-gpu 1.8.0 <-> torchrec 1.8.0 (fbgemm-gpu of another
# release fails to load with undefined symbols). mamba-ssm and causal-conv1d compile CUDA extensions
# against the installed torch, so they need nvcc (CUDA toolkit) and take several minutes.
# Without mamba-ssm everything still runs on GPU: the Mamba block falls back to the pure PyTorch
# selective scan (same parameters, same state_dict).
set -euo pipefail
VENV="${1:-.venv-gpu}"
CUDA_VARIANT="${CUDA_VARIANT:-cu128}"
INDEX="https://download.pytorch.org/whl/${CUDA_VARIANT}"
cd "$(dirname "$0")/.."

python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --upgrade pip wheel setuptools packaging ninja
"$PY" -m pip install --index-url "$INDEX" -r requirements/gpu.txt
# Everything else of the CPU stack except the CPU-only torch / fbgemm-gpu-cpu pins.
grep -v -E '^(torch|fbgemm-gpu-cpu)==' requirements/cpu.txt > "$VENV/requirements-rest.txt"
"$PY" -m pip install -r "$VENV/requirements-rest.txt" -r requirements/dev.txt
"$PY" -m pip install --no-deps -r requirements/torchrec.txt
"$PY" -m pip install --no-build-isolation causal-conv1d mamba-ssm
"$PY" -m pip install --no-deps --no-build-isolation -e .
"$PY" - <<'PY'
import torch, fbgemm_gpu, torchrec  # noqa: F401
from mdaf_rec.models import mamba
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "mamba-ssm kernels:", mamba._mamba_inner_fn is not None)
PY
