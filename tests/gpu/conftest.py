"""GPU tests: run on a bare CUDA machine with only torch and pytest installed (``tools/gpu_check.sh``
runs them with ``--confcutdir tests/gpu``, so ``tests/conftest.py`` and its TorchRec imports are not
loaded). In the CPU suite every test here is skipped (marked ``gpu``, CUDA required)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
for path in (TESTS.parent, TESTS):  # the project (mdaf_rec) and tests/device_guards.py, torch-only
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions while a test compares float32 CUDA with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
