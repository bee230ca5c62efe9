"""Exits 1, naming each failure in one line, when the mamba-ssm / causal-conv1d CUDA kernels do not import.

    python tools/check_cuda_kernels.py

Run by tools/setup_gpu.sh (``make gpu-setup``), tools/gpu_check.sh and the Dockerfile build (none needs a GPU:
importing the kernels does not), so that a broken build stops there instead of training with the slow scan.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdaf_rec.ops.cuda_kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
