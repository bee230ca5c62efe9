"""The dense modules and the metrics' collectives on CUDA (skipped without a GPU).

* MambaBlock, the Mamba4Rec and BST encoders, DCNv3 and the fusion + head on CUDA equal the CPU:
  outputs and every gradient within 1e-4 (relative to the tensor's scale) in float32 with TF32 off;
  outputs within 3 % of their scale under ``torch.autocast("cuda", bfloat16)`` (bf16 keeps 8
  significant bits; CPU bf16 autocast of the same cases measured 0.03-0.71 %), logits and gate float32.
* A real 1-rank process group from :func:`mdaf_rec.distributed.init_distributed` (``cpu:gloo,cuda:nccl``)
  and a plain ``nccl`` one run the metrics' collectives with CPU and CUDA rows; every tensor handed to a
  collective is on a device the backend takes, and CPU-side collectives (barrier, object broadcast,
  a CPU all_reduce) are legal.

Imports: torch, pytest and the dense modules only (numpy for the metrics test). ``tools/gpu_check.sh`` runs this
folder with ``--confcutdir tests/gpu``, so ``tests/conftest.py`` (which imports TorchRec) is not loaded, and with
the repository and ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mdaf_rec.models.bst import BSTEncoder
from mdaf_rec.models.dcnv3 import DCNv3
from mdaf_rec.models.fusion import GatedFusion
from mdaf_rec.models.head import PredictionHead
from mdaf_rec.models.mamba import Mamba4RecEncoder, MambaBlock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCH, LENGTH, DIM = 64, 51, 64
FP32_TOLERANCE = 1e-4  # max |cuda - cpu| / max |cpu|, outputs and gradients
BF16_TOLERANCE = 3e-2  # max |cuda bf16 - cpu fp32| / max |cpu fp32|, outputs

Inputs = Dict[str, torch.Tensor]


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions while a test compares float32 CUDA with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _inputs() -> Inputs:
    g = torch.Generator().manual_seed(0)
    return {
        "tokens": 0.5 * torch.randn(BATCH, LENGTH, DIM, generator=g),
        "lengths": torch.randint(1, LENGTH + 1, (BATCH,), generator=g),
        "fields": 0.1 * torch.randn(BATCH, 5, 16, generator=g),
        "static": torch.randn(BATCH, DIM, generator=g),
    }


class _FusionHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fusion = GatedFusion(DIM, mode="vector")
        self.head = PredictionHead(DIM, (128, 64), dropout=0.0)

    def forward(self, static: torch.Tensor, sequential: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fused, gate = self.fusion(static, sequential)
        return self.head(fused), gate


# name -> (module factory, forward from inputs returning the outputs to compare)
CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[nn.Module, Inputs], List[torch.Tensor]]]] = {
    "mamba_block": (lambda: MambaBlock(DIM, d_state=16, d_conv=4, expand=2), lambda m, x: [m(x["tokens"])]),
    "mamba4rec": (lambda: Mamba4RecEncoder(d_model=DIM, num_layers=2, dropout=0.0),
                  lambda m, x: [m(x["tokens"], x["lengths"])]),
    "bst": (lambda: BSTEncoder(d_model=DIM, num_layers=2, num_heads=4, dropout=0.0, max_len=LENGTH),
            lambda m, x: [m(x["tokens"], x["lengths"])]),
    "dcnv3": (lambda: DCNv3(num_fields=5, field_dim=16, num_deep_cross_layers=3, num_shallow_cross_layers=3,
                            deep_net_dropout=0.0, shallow_net_dropout=0.0, output_dim=DIM),
              lambda m, x: list(m(x["fields"], return_embedding=True))),
    "fusion_head": (_FusionHead, lambda m, x: list(m(x["static"], x["tokens"][:, -1]))),
}


def _run(module: nn.Module, forward: Callable, inputs: Inputs, device: torch.device,
         autocast: bool = False) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Outputs and the gradients (inputs, then parameters) of ``sum(outputs)``, on the CPU."""
    x = {k: v.to(device).requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = forward(module, x)
    sum(o.float().sum() for o in outputs).backward()
    grads = [t.grad for t in x.values() if t.grad is not None] + [p.grad for p in module.parameters()]
    return [o.detach().float().cpu() for o in outputs], [g.float().cpu() for g in grads]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("name", CASES)
def test_cuda_equals_cpu_in_fp32(name: str, exact_fp32: None) -> None:
    factory, forward = CASES[name]
    torch.manual_seed(0)
    cpu_module = factory().eval()
    cuda_module = copy.deepcopy(cpu_module).cuda()
    inputs = _inputs()
    cpu_out, cpu_grads = _run(cpu_module, forward, inputs, torch.device("cpu"))
    cuda_out, cuda_grads = _run(cuda_module, forward, inputs, torch.device("cuda"))
    assert len(cuda_grads) == len(cpu_grads)
    for i, (actual, expected) in enumerate(zip(cuda_out + cuda_grads, cpu_out + cpu_grads)):
        assert _relative_error(actual, expected) <= FP32_TOLERANCE, f"{name}: tensor {i}"


@pytest.mark.parametrize("name", CASES)
def test_bf16_autocast_on_cuda_stays_close_to_fp32(name: str, exact_fp32: None) -> None:
    factory, forward = CASES[name]
    torch.manual_seed(0)
    cpu_module = factory().eval()
    cuda_module = copy.deepcopy(cpu_module).cuda()
    inputs = _inputs()
    expected, _ = _run(cpu_module, forward, inputs, torch.device("cpu"))
    x = {k: v.cuda() for k, v in inputs.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        raw = forward(cuda_module, x)
    if name in ("dcnv3", "fusion_head"):  # logits and gate are computed in float32
        assert all(t.dtype == torch.float32 for t in raw[: 3 if name == "dcnv3" else 2])
    actual, grads = _run(cuda_module, forward, inputs, torch.device("cuda"), autocast=True)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert _relative_error(a, e) <= BF16_TOLERANCE, f"{name}: output {i}"
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_metric_collectives_on_one_rank_process_groups(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    pytest.importorskip("numpy")
    from device_guards import record_collectives
    from mdaf_rec.distributed import backend_device_types, init_distributed, shutdown_distributed
    from mdaf_rec.metrics import MetricAccumulator, _all_gather_rows

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    g = torch.Generator().manual_seed(1)
    probs, labels = torch.rand(100, generator=g), torch.randint(0, 2, (100,), generator=g).float()
    groups, gate = torch.randint(0, 7, (100,), generator=g), torch.rand(100, 1, generator=g)
    for backend in ("default", "nccl"):
        if backend == "default":
            env = init_distributed(timeout_s=120)  # a world of one, as a plain `mdaf-rec train` makes it
            assert env.backend == "cpu:gloo,cuda:nccl" and env.device.type == "cuda"
        else:
            dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        try:
            supported = backend_device_types(str(dist.get_backend()))
            for device in ("cpu", "cuda"):
                acc = MetricAccumulator()
                acc.update(*(t.to(device) for t in (probs, labels, groups, gate)))
                expected = acc.compute()
                rows, user_index, has_gate = acc._local_rows()
                with record_collectives() as calls:
                    all_rows, all_groups, gathered_gate = _all_gather_rows(rows, user_index, has_gate, None)
                assert calls and all(d.type in supported for _, devices in calls for d in devices), calls
                assert torch.equal(all_rows, rows.cpu()) and torch.equal(all_groups, user_index.cpu()) and gathered_gate
                assert expected["count"] == 100
            if "cpu" in supported:  # CPU-side collectives stay legal under cpu:gloo,cuda:nccl
                dist.barrier()
                objects = [{"plan": 1}]
                dist.broadcast_object_list(objects, src=0)
                total = torch.tensor([2.0], dtype=torch.float64)
                dist.all_reduce(total)
                assert objects == [{"plan": 1}] and total.item() == 2.0
            on_device = torch.tensor([3.0], device="cuda")
            dist.all_reduce(on_device)
            assert on_device.item() == 3.0
        finally:
            shutdown_distributed()
