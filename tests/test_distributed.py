"""Process-group set-up for GPU machines (checked on the CPU with CUDA patched in) and the devices of
every tensor the metrics hand to a collective."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

from device_guards import record_collectives
from mdaf_rec import distributed
from mdaf_rec.distributed import backend_device_types, collective_device, init_distributed
from mdaf_rec.metrics import MetricAccumulator


def test_cuda_machine_gets_gloo_for_cpu_tensors_and_nccl_for_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Dict[str, Any] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: calls["init"]["backend"])
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    env = init_distributed(timeout_s=60)
    assert calls["init"]["backend"] == "cpu:gloo,cuda:nccl" == env.backend
    assert (calls["init"]["rank"], calls["init"]["world_size"]) == (3, 4)
    assert calls["set_device"] == torch.device("cuda", 1) == env.device
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)


def test_cpu_machine_gets_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.default_backend() == "gloo"


def test_collective_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_device_types("gloo") == ("cpu",) and backend_device_types("nccl") == ("cuda",)
    assert backend_device_types("cpu:gloo,cuda:nccl") == ("cpu", "cuda")
    with pytest.raises(ValueError, match="unsupported torch.distributed backend 'mpi'"):
        backend_device_types("mpi")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 2)
    expected = {  # backend -> (device for CPU data, device for CUDA data)
        "gloo": (cpu, cpu),
        "nccl": (cuda, cuda),
        "cpu:gloo,cuda:nccl": (cpu, cuda),
    }
    for backend, (for_cpu, for_cuda) in expected.items():
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device(preferred=cpu) == for_cpu
        assert collective_device(preferred=cuda) == for_cuda
        assert collective_device() == for_cpu


def _fake_world_of_two(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """A 2-rank group whose other rank holds the same rows: ``all_gather`` copies the input."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)

    def all_gather(outputs: List[torch.Tensor], tensor: torch.Tensor, group: Any = None) -> None:
        for out in outputs:
            out.copy_(tensor)

    monkeypatch.setattr(dist, "all_gather", all_gather)


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:nccl"])
def test_metric_collectives_take_tensors_the_backend_supports(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    probs, labels = torch.rand(50, generator=g), torch.randint(0, 2, (50,), generator=g).float()
    groups, gate = torch.randint(0, 5, (50,), generator=g), torch.rand(50, 1, generator=g)
    single = MetricAccumulator()
    for _ in range(2):  # what one process holding both ranks' rows computes
        single.update(probs, labels, groups, gate)
    expected = single.compute()
    _fake_world_of_two(monkeypatch, backend)
    acc = MetricAccumulator()
    acc.update(probs, labels, groups, gate)
    with record_collectives() as calls:
        result = acc.compute()
    assert result == expected and result["count"] == 100
    assert [name for name, _ in calls] == ["all_gather"] * 3  # counts, rows, user indices
    supported = backend_device_types(backend)
    assert all(device.type in supported for _, devices in calls for device in devices), calls
