"""The optional mamba-ssm / causal-conv1d CUDA kernels: a broken build is reported (the check tool fails, the
train-time log names the reason) instead of silently falling back to the slow scan. Simulated on CPU with
stand-in packages of the kernels' module names on PYTHONPATH."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from mdaf_rec.ops import cuda_kernels

REPO = Path(__file__).resolve().parents[1]

GOOD: Dict[str, str] = {
    "selective_scan_cuda.py": "",
    "causal_conv1d_cuda.py": "",
    "mamba_ssm/__init__.py": "",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/selective_scan_interface.py": "import selective_scan_cuda\n"
    "def selective_scan_fn(*a, **k): pass\ndef mamba_inner_fn(*a, **k): pass\n",
    "causal_conv1d/__init__.py": "import causal_conv1d_cuda\ndef causal_conv1d_fn(*a, **k): pass\n",
}
# What a wheel built against another CUDA / torch does on import.
BROKEN = {
    "OSError": 'raise OSError("libcudart.so.11.0: cannot open shared object file: No such file or directory")',
    "ImportError": 'raise ImportError("selective_scan_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")',
}


def _packages(root: Path, broken: str = "") -> Dict[str, str]:
    for name, text in GOOD.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(BROKEN[broken] if broken and name == "selective_scan_cuda.py" else text)
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    return env


def _run(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_check_passes_when_the_kernels_import(tmp_path: Path) -> None:
    proc = _run(_packages(tmp_path), "tools/check_cuda_kernels.py")
    assert proc.returncode == 0 and "importable" in proc.stdout, proc.stderr


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_build_fails_the_check_and_is_named_at_train_time(tmp_path: Path, broken: str) -> None:
    env = _packages(tmp_path, broken)
    proc = _run(env, "tools/check_cuda_kernels.py")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: the mamba-ssm / causal-conv1d CUDA kernels do not import (selective_scan_cuda: "
                                  f"{broken}: ")
    assert "nvcc's CUDA major must match" in proc.stderr and "Traceback" not in proc.stderr
    # The model still imports (an OSError used to escape the ImportError guard) and says what a CUDA run uses.
    code = "import mdaf_rec.models.mamba; from mdaf_rec.ops.cuda_kernels import mamba_backend; print(mamba_backend('cuda'))"
    proc = _run(env, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("the pure PyTorch scan on CUDA, several times slower: the mamba-ssm / causal-conv1d "
                                  f"CUDA kernels do not import (selective_scan_cuda: {broken}: "), proc.stdout


def test_the_backend_is_logged_loudly_when_a_cuda_run_falls_back(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cuda_kernels, "IMPORT_ERRORS", {"causal_conv1d": "ImportError: boom"})
    with caplog.at_level(logging.INFO, logger="mdaf_rec.ops.cuda_kernels"):
        cuda_kernels.log_mamba_backend("cuda")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "PyTorch scan on CUDA" in record.getMessage()
    assert "causal_conv1d: ImportError: boom" in record.getMessage()
    monkeypatch.setattr(cuda_kernels, "IMPORT_ERRORS", {})
    monkeypatch.setattr(cuda_kernels, "mamba_inner_fn", lambda *a: None)
    monkeypatch.setattr(cuda_kernels, "causal_conv1d_fn", lambda *a: None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mdaf_rec.ops.cuda_kernels"):
        cuda_kernels.log_mamba_backend("cuda")
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "mamba-ssm's CUDA kernels (the fused mamba_inner_fn" in record.getMessage()
    # mamba-ssm without causal-conv1d: its scan kernel, not the fused block; said so, loudly.
    monkeypatch.setattr(cuda_kernels, "IMPORT_ERRORS", {"causal_conv1d": "ModuleNotFoundError: no causal_conv1d"})
    monkeypatch.setattr(cuda_kernels, "causal_conv1d_fn", None)
    monkeypatch.setattr(cuda_kernels, "selective_scan_fn", lambda *a: None)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mdaf_rec.ops.cuda_kernels"):
        cuda_kernels.log_mamba_backend("cuda")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "selective scan kernel without the fused block" in record.getMessage()


def test_gpu_check_fails_when_the_kernels_do_not_import(tmp_path: Path) -> None:
    """``tools/gpu_check.sh`` stops at its first step (before the tests and timings) on this CPU machine, where
    mamba-ssm is not installed; ``SKIP_MAMBA_KERNELS=1`` is the way to check a machine without them."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("SKIP_MAMBA_KERNELS", None)
    proc = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CUDA kernels do not import (selective_scan_cuda: ModuleNotFoundError" in (tmp_path / "out" / "env.txt").read_text()
    assert not (tmp_path / "out" / "pytest.txt").exists()


@pytest.mark.parametrize("path", ["Dockerfile", "tools/setup_gpu.sh"])
def test_the_kernel_builds_compile_offline_and_fail_when_the_kernels_do_not_import(path: str) -> None:
    """Their setup.py catch only HTTPError when fetching a prebuilt wheel (offline: URLError aborts the build), so
    the builds force compiling, with a bounded MAX_JOBS; both then run the import check, which fails the build."""
    text = (REPO / path).read_text()
    for switch in ("MAMBA_FORCE_BUILD=TRUE", "CAUSAL_CONV1D_FORCE_BUILD=TRUE", "MAX_JOBS="):
        assert switch in text, switch
    checks = [line for line in text.splitlines() if "tools/check_cuda_kernels.py" in line and not line.startswith("#")]
    assert checks and not any("||" in line for line in checks), checks
    assert "set -euo pipefail" in text or path == "Dockerfile"
