#!/usr/bin/env bash
# GPU check for a bare CUDA machine: only a CUDA build of torch (and pytest) needed, no TorchRec.
#
#   bash tools/gpu_check.sh [OUT_DIR]          (default runs/gpu_check/; PYTHON=... to pick the interpreter)
#   SKIP_MAMBA_KERNELS=1 bash tools/gpu_check.sh   (without mamba-ssm / causal-conv1d: the PyTorch scan)
#
# 0. tools/check_cuda_kernels.py: the mamba-ssm / causal-conv1d CUDA kernels import; the check FAILS (exit 1,
#    naming the import error) when they do not, unless SKIP_MAMBA_KERNELS=1.
# 1. `pytest -m gpu tests/gpu`: MambaBlock, the Mamba4Rec / BST encoders, DCNv3, fusion + head on CUDA equal the
#    CPU (fp32 within 1e-4, bf16 autocast within 3 %), and the metrics' collectives on real 1-rank
#    `cpu:gloo,cuda:nccl` and `nccl` process groups. `--confcutdir tests/gpu` keeps tests/conftest.py (which
#    imports TorchRec) out.
# 2. tools/bench_gpu_branches.py: one forward + backward of each dense branch at batch 2048, history 50, width
#    128, in fp32 and bf16.
# Writes OUT_DIR/env.txt, OUT_DIR/pytest.txt, OUT_DIR/timings.md and OUT_DIR/timings.json; exits non-zero if a
# test failed. GPU_CHECK_TINY=1 runs the timing at toy sizes on whatever device there is (to check this script
# on a CPU machine, where the GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"  # mdaf_rec and tests/device_guards.py

"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}  CUDA {torch.version.cuda}  device: {name}  bf16: "
      f"{torch.cuda.is_available() and torch.cuda.is_bf16_supported()}  NCCL: {torch.distributed.is_nccl_available()}")
PY
"$PY" -c "import pytest" 2>/dev/null || { echo "pytest is missing: $PY -m pip install pytest" >&2; exit 2; }
if [ -z "${SKIP_MAMBA_KERNELS:-}" ]; then
  "$PY" tools/check_cuda_kernels.py 2>&1 | tee -a "$OUT/env.txt"
fi

status=0
"$PY" -m pytest -q -m gpu --confcutdir tests/gpu -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest.txt" \
  || status=$?
"$PY" tools/bench_gpu_branches.py --out "$OUT/timings.md" ${GPU_CHECK_TINY:+--tiny}
echo "gpu_check: tests exit status $status; figures in $OUT/timings.md"
exit "$status"
