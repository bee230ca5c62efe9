"""The TorchX component ``launch/components.py:train``: the AppDef it builds, and one real ``torchx run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from test_train import REPO, TINY, _env

from launch.components import train
from mdaf_rec.data.synth import generate


def test_single_node_appdef() -> None:
    app = train("train.epochs=2", "model.gate=vector", config="configs/mdaf_bst.yaml", data="/data/synth",
                out="/runs/a", nproc_per_node=2, env={"FOO": "bar"})
    (role,) = app.roles
    assert role.num_replicas == 1 and role.entrypoint == "bash" and role.args[0] == "-c"
    cmd = role.args[1]
    assert cmd.startswith("torchrun ") and "--nnodes 1 --nproc_per_node 2" in cmd
    assert "--rdzv_endpoint localhost:0" in cmd  # single node: a free port
    assert cmd.endswith(
        "-m mdaf_rec.cli train --config configs/mdaf_bst.yaml --data /data/synth --out /runs/a "
        "--set train.epochs=2 --set model.gate=vector"
    )
    assert role.env["FOO"] == "bar" and role.env["PYTHONUNBUFFERED"] == "1"


def test_multi_node_gpu_appdef() -> None:
    app = train(nnodes=4, nproc_per_node=8, gpu=8, cpu=64, memMB=512_000, image="registry/mdaf:1", epochs=3,
                plan="plans/p32.json", rdzv_port=29555, max_retries=2)
    (role,) = app.roles
    assert role.num_replicas == 4 and role.image == "registry/mdaf:1" and role.max_retries == 2
    assert role.resource.gpu == 8 and role.resource.cpu == 64 and role.resource.memMB == 512_000
    cmd = role.args[1]
    assert "--nnodes 4 --nproc_per_node 8" in cmd and "${rank0_env}:=localhost}:29555" in cmd  # macro: rank 0's host
    assert "--epochs 3 --plan plans/p32.json" in cmd
    assert role.port_map == {"c10d": 29555}


def _gpu_job():
    return train("train.batch_size=16384", config="configs/mdaf_mamba.yaml", data="/mnt/data", out="/mnt/runs/m",
                 image="registry.example.com/mdaf-rec:cu128", nnodes=2, nproc_per_node=8, gpu=8, cpu=64, memMB=400_000)


def test_local_docker_dryrun_runs_the_image_with_the_gpus() -> None:
    pytest.importorskip("docker")  # TorchX's docker scheduler needs the client library, not a daemon, to dry-run
    from torchx.runner import get_runner

    with get_runner() as runner:
        job = runner.dryrun(_gpu_job(), "local_docker", cfg={}).request
    assert len(job.containers) == 2  # one container per node
    for container in job.containers:
        assert container.image == "registry.example.com/mdaf-rec:cu128"
        (request,) = container.kwargs["device_requests"]
        assert request["Count"] == 8 and ["compute", "utility"] in request["Capabilities"]
        assert "-m mdaf_rec.cli train --config configs/mdaf_mamba.yaml" in container.command[-1]


def test_kubernetes_dryrun_names_the_image_and_gpu_resources() -> None:
    pytest.importorskip("kubernetes")  # TorchX's Kubernetes scheduler needs the client (not in requirements/)
    from torchx.runner import get_runner

    with get_runner() as runner:
        info = runner.dryrun(_gpu_job(), "kubernetes", cfg={"queue": "default"})
    tasks = info.request.resource["spec"]["tasks"]
    assert len(tasks) == 2  # one Volcano task (pod) per node
    for task in tasks:
        (container,) = task["template"].spec.containers
        assert container.image == "registry.example.com/mdaf-rec:cu128"
        assert container.resources.limits["nvidia.com/gpu"] == "8" == container.resources.requests["nvidia.com/gpu"]


def test_bad_override_is_refused() -> None:
    with pytest.raises(ValueError, match="model.gate"):
        train("model.gate")


def _torchx() -> Optional[str]:
    """The ``torchx`` CLI: on PATH, or next to this interpreter (the virtualenv)."""
    beside = Path(sys.executable).parent / "torchx"
    return shutil.which("torchx") or (str(beside) if beside.exists() else None)


def test_torchx_local_cwd_two_processes_trains(tmp_path: Path) -> None:
    torchx = _torchx()
    if torchx is None:
        pytest.skip("torchx is not installed")
    data = tmp_path / "data"
    generate(data, rows=3000, users=300, items=800, categories=30, max_history=10, seed=3)
    env = _env()
    env["PATH"] = f"{Path(torchx).parent}{os.pathsep}{env['PATH']}"  # torchrun, for the job's `bash -c`
    cmd = [
        torchx, "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", "launch/components.py:train",
        "--nnodes", "1", "--nproc_per_node", "2", "--config", "configs/dnn.yaml", "--data", str(data),
        "--out", str(tmp_path / "run"), "--epochs", "1", *TINY,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 1 and 0.0 < metrics["val"]["auc"] <= 1.0


def test_a_job_without_gpus_is_refused_on_a_gpu_scheduler_unless_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--gpu`` defaults to 0: on Slurm / Kubernetes such a job used to train on CPU with gloo without a word.
    The component marks it; the workers refuse when they run under a scheduler and see no GPU."""
    import torch

    from mdaf_rec.distributed import NO_GPU_REQUESTED, check_gpu_request
    from mdaf_rec.errors import UserError

    assert train().roles[0].env[NO_GPU_REQUESTED] == "1"
    for app in (train(gpu=8, nproc_per_node=8), train(cpu_only=True), train(h="aws_p4d.24xlarge")):
        assert NO_GPU_REQUESTED not in app.roles[0].env
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for marker in ("SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(marker, raising=False)
    monkeypatch.setenv(NO_GPU_REQUESTED, "1")
    check_gpu_request()  # local_cwd / local_docker: CPU as asked
    for marker, scheduler in (("SLURM_JOB_ID", "Slurm"), ("KUBERNETES_SERVICE_HOST", "Kubernetes")):
        monkeypatch.setenv(marker, "4711")
        with pytest.raises(UserError, match=f"runs on {scheduler} without a GPU.*--gpu N .*--cpu_only True"):
            check_gpu_request()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        check_gpu_request()  # the GPUs came anyway (e.g. a named resource)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.delenv(NO_GPU_REQUESTED)
        check_gpu_request()  # --gpu N or --cpu_only True
        monkeypatch.setenv(NO_GPU_REQUESTED, "1")
        monkeypatch.delenv(marker)
