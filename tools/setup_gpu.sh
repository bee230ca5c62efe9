#!/usr/bin/env bash
# GPU set-up: a CUDA build of torch, the matching CUDA fbgemm-gpu, torchrec, and mamba-ssm's kernels.
#
#   bash tools/setup_gpu.sh [VENV_DIR]            (default .venv-gpu; `make gpu-setup` runs this)
#   CUDA_VARIANT=cu126 bash tools/setup_gpu.sh    (default cu128; must match the machine's driver)
#   SKIP_MAMBA_KERNELS=1 bash tools/setup_gpu.sh  (no nvcc: the Mamba block uses its PyTorch scan)
#   MAX_JOBS=8 bash tools/setup_gpu.sh            (parallel nvcc jobs of the kernel build; default 4)
#
# The GPU stack gets its own virtualenv: the CPU venv (.venv, `make test` / `make demo`) has fbgemm-gpu-cpu,
# which ships the same `fbgemm_gpu` package as the CUDA fbgemm-gpu, so installing one over the other clobbers
# it. Given an existing venv with the CPU build, the script uninstalls fbgemm-gpu-cpu and the CPU torch first.
# Versions move together: torch 2.13.0 <-> fbgemm-gpu 1.8.0 <-> torchrec 1.8.0 (fbgemm-gpu of another release
# fails to load with undefined symbols). mamba-ssm and causal-conv1d (requirements/gpu-kernels.txt) compile CUDA
# extensions against the installed torch, so they need nvcc (CUDA toolkit) whose CUDA MAJOR version equals torch's
# (torch.version.cuda; checked below), and take several minutes. They are always built from source
# (MAMBA_FORCE_BUILD / CAUSAL_CONV1D_FORCE_BUILD): their setup.py would otherwise try to download a prebuilt wheel
# from GitHub and, without internet, abort on the URLError it does not catch (it catches HTTPError only).
# It ends with a check: import torch / fbgemm_gpu / torchrec, then tools/check_cuda_kernels.py, which FAILS the
# set-up when the Mamba CUDA kernels do not import (unless SKIP_MAMBA_KERNELS=1), and, when a GPU is present, one
# sharded training step of MDAF-Mamba on a small synthetic dataset.
set -euo pipefail
VENV="${1:-.venv-gpu}"
CUDA_VARIANT="${CUDA_VARIANT:-cu128}"
INDEX="https://download.pytorch.org/whl/${CUDA_VARIANT}"
cd "$(dirname "$0")/.."

test -x "$VENV/bin/python" || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --upgrade pip wheel setuptools packaging ninja
if "$PY" -m pip show -q fbgemm-gpu-cpu 2>/dev/null || "$PY" -c "import torch, sys; sys.exit('+cpu' not in torch.__version__)" 2>/dev/null; then
  echo "setup_gpu: $VENV has the CPU build of torch / fbgemm_gpu; uninstalling it first" >&2
  "$PY" -m pip uninstall -y fbgemm-gpu-cpu torch
fi
"$PY" -m pip install --index-url "$INDEX" -r requirements/gpu.txt
# Everything else of the CPU stack except the CPU-only torch / fbgemm-gpu-cpu pins.
grep -v -E '^(torch|fbgemm-gpu-cpu)==' requirements/cpu.txt > "$VENV/requirements-rest.txt"
"$PY" -m pip install -c requirements/gpu.txt -r "$VENV/requirements-rest.txt" -r requirements/dev.txt
"$PY" -m pip install --no-deps -r requirements/torchrec.txt
if [ -z "${SKIP_MAMBA_KERNELS:-}" ]; then
  NVCC_CUDA="$({ nvcc --version 2>/dev/null || true; } | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
  TORCH_CUDA="$("$PY" -c 'import torch; print((torch.version.cuda or "").split(".")[0])')"
  if [ -z "$NVCC_CUDA" ] || [ "$NVCC_CUDA" != "$TORCH_CUDA" ]; then
    echo "setup_gpu: error: nvcc's CUDA major (${NVCC_CUDA:-no nvcc on PATH}) must equal torch's (${TORCH_CUDA:-none})" \
      "to build mamba-ssm / causal-conv1d; install that CUDA toolkit, pick CUDA_VARIANT to match, or SKIP_MAMBA_KERNELS=1" >&2
    exit 1
  fi
  MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS:-4}" \
    "$PY" -m pip install --no-build-isolation -c requirements/gpu.txt -r requirements/gpu-kernels.txt
fi
"$PY" -m pip install --no-deps --no-build-isolation -e .

"$PY" - <<'PY'
import torch, fbgemm_gpu, torchrec  # noqa: F401
assert "+cpu" not in torch.__version__, f"CPU build of torch: {torch.__version__}"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU:", torch.cuda.is_available())
PY
if [ -z "${SKIP_MAMBA_KERNELS:-}" ]; then
  "$PY" tools/check_cuda_kernels.py
else
  echo "setup_gpu: SKIP_MAMBA_KERNELS set: the Mamba block uses its PyTorch scan"
fi
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  CHECK="$(mktemp -d)"
  "$VENV/bin/mdaf-rec" data synth --out "$CHECK/data" --rows 4000 --users 300 --items 800 --categories 30 --max-history 10
  "$VENV/bin/mdaf-rec" train --config configs/mdaf_mamba.yaml --data "$CHECK/data" --out "$CHECK/run" --epochs 1 \
    --set train.max_steps_per_epoch=1 --set train.batch_size=256 --set features.max_history=10
  echo "setup_gpu: one sharded training step on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))') ran"
  rm -rf "$CHECK"
else
  echo "setup_gpu: no GPU visible; the sharded-step check is skipped"
fi
